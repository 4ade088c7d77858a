"""The daemon's configuration: one dataclass tree with defaults, loaded from TOML.

`cripy config` prints `render_default()`; the daemon reads it back with `load()`. Every
field carries a comment (its `doc` metadata) that ends up in the printed TOML.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cripy.errors import InvalidArgumentError
from cripy.image.pinning import validate_patterns


class ConfigError(InvalidArgumentError):
    """A configuration file names an unknown key or gives a value of the wrong type."""


def _doc(text: str, *, merge_defaults: bool = False, **kwargs: Any) -> Any:
    """A field with its comment; `merge_defaults` (tables): entries read from a file are
    added to the default ones rather than replacing them all."""
    return field(metadata={"doc": text, "merge_defaults": merge_defaults}, **kwargs)


@dataclass
class RegistryHostConfig:
    """Settings for one registry host, keyed by its name as in image references."""

    mirrors: list[str] = _doc(
        "Endpoints tried in order before the registry itself, e.g. \"mirror.local:5000\" "
        "or \"http://10.0.0.1:5000\".",
        default_factory=list,
    )
    insecure: bool = _doc(
        "Talk plain HTTP to this registry (and to mirrors given without a scheme).",
        default=False,
    )


@dataclass
class ImageConfig:
    pull_concurrency: int = _doc("Layers of one image downloaded at the same time.", default=3)
    registry_timeout: float = _doc(
        "Seconds to wait for a registry to connect or send the next bytes.", default=30.0
    )
    max_layer_bytes: int = _doc(
        "Largest uncompressed size a single layer may unpack to (bytes); bounds "
        "decompression bombs.",
        default=32 * 1024**3,
    )
    allow_device_nodes: bool = _doc(
        "Whether image layers may create device nodes (refused with a clear error if not).",
        default=True,
    )
    pinned_images: list[str] = _doc(
        "Images the kubelet's image garbage collection must leave alone (reported as "
        "pinned): exact names, a trailing '*' (prefix glob), or '*' at both ends "
        "(keyword).",
        default_factory=list,
    )


#: A runtime handler's name: what a RuntimeClass's `handler` field holds (a DNS label).
HANDLER_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass
class RuntimeHandlerConfig:
    """One OCI runtime a pod can ask for by name (RunPodSandbox's runtime_handler, a
    RuntimeClass's handler)."""

    runtime_path: str = _doc("The OCI runtime binary (name looked up in PATH, or a path).",
                             default="runc")
    runtime_root: str = _doc(
        "The runtime's state directory (its --root); empty: <runroot>/oci/<handler name>.",
        default="")
    monitor_path: str = _doc("The container monitor (conmon) used with this runtime.",
                             default="conmon")


def _default_handlers() -> dict[str, RuntimeHandlerConfig]:
    return {
        "runc": RuntimeHandlerConfig(runtime_path="runc"),
        "crun": RuntimeHandlerConfig(runtime_path="/usr/bin/crun"),
    }


@dataclass
class RuntimeConfig:
    default_handler: str = _doc(
        "The handler of pods that name none (runtime_handler \"\"): a [runtime.handlers] "
        "table.", default="runc")
    runtime_path: str = _doc(
        "Deprecated: the default handler's runtime_path (empty: as in its table).", default="")
    conmon_path: str = _doc(
        "Deprecated: the default handler's monitor_path (empty: as in its table).", default="")
    cgroup_manager: str = _doc(
        "The cgroup driver: cgroupfs, or systemd (needs systemd as PID 1; containers run "
        "in cripy-<id>.scope units).", default="cgroupfs")
    conmon_cgroup: str = _doc(
        "systemd driver only: where each conmon's cripy-conmon-<id>.scope goes, \"pod\" "
        "(the pod's slice) or a slice such as \"system.slice\".", default="pod")
    seccomp_profile: str = _doc(
        "A seccomp profile file (docker JSON format) used for RuntimeDefault; empty: the "
        "built-in one.", default="")
    log_size_max: int = _doc(
        "Largest a container log file may grow (bytes) before it is rotated; -1: no limit.",
        default=-1,
    )
    enable_pod_events: bool = _doc(
        "PodSandboxStatus reports the pod's container statuses and when they were taken, "
        "as the kubelet's evented PLEG reads them (verbose requests always get them).",
        default=True)
    pod_cgroup_resources: bool = _doc(
        "Write the pod-level resources (RunPodSandbox's overhead + resources, "
        "UpdatePodSandboxResources) into the pod's own cgroup. Off: the kubelet sizes its "
        "pod cgroups itself before it sends them (and its sum leaves out containers without "
        "a limit), so they are only checked and recorded, as CRI-O and containerd do.",
        default=False)
    handlers: dict[str, RuntimeHandlerConfig] = _doc(
        "The runtime handlers, one table each: [runtime.handlers.NAME]. Tables given in a "
        "file are added to (or replace) the built-in runc and crun ones.",
        default_factory=_default_handlers, merge_defaults=True)

    def handler(self, name: str) -> RuntimeHandlerConfig:
        """The handler a pod's runtime_handler names ("" is the default one)."""
        return self.handlers[name or self.default_handler]


@dataclass
class StreamingConfig:
    address: str = _doc("Where the Exec/Attach/PortForward server listens.",
                        default="127.0.0.1")
    port: int = _doc("Its TCP port; 0 picks a free one at start.", default=10010)
    tls_cert_file: str = _doc("PEM certificate to serve HTTPS with (empty: plain HTTP).",
                              default="")
    tls_key_file: str = _doc("PEM private key for tls_cert_file.", default="")
    token_ttl: float = _doc("Seconds a streaming URL stays valid (it is single-use).",
                            default=60.0)


@dataclass
class MonitoringConfig:
    status_socket: str = _doc("The status API's unix socket (GET /info, /containers/ID ...).",
                              default="/run/cripy/cripy-status.sock")
    metrics_port: int = _doc("Prometheus metrics on 127.0.0.1:PORT; 0 turns them off.",
                             default=0)
    metrics_address: str = _doc("Address the metrics endpoint binds.", default="127.0.0.1")
    log_format: str = _doc("The daemon's own log lines: text (key=value) or json.",
                           default="text")


@dataclass
class NetworkConfig:
    cni_config_dir: str = _doc("Where CNI network configurations (.conflist/.conf) are read.",
                               default="/etc/cni/net.d")
    cni_plugin_dirs: list[str] = _doc(
        "Directories searched for CNI plugin binaries.",
        default_factory=lambda: ["/usr/lib/cni", "/opt/cni/bin"],
    )
    plugin_timeout: float = _doc("Seconds a CNI plugin may run before it is killed.",
                                 default=60.0)


@dataclass
class CdiConfig:
    spec_dirs: list[str] = _doc(
        "Directories of CDI spec files (*.json, *.yaml) that CDI device names resolve "
        "against; a later directory overrides an earlier one for the same device.",
        default_factory=lambda: ["/etc/cdi", "/var/run/cdi"],
    )


@dataclass
class Config:
    root: str = _doc("Persistent state: images, layers, container records.",
                     default="/var/lib/cripy")
    runroot: str = _doc("Volatile state: sockets, pinned namespaces, exit files.",
                        default="/run/cripy")
    listen: str = _doc("The CRI gRPC endpoint (unix socket, mode 0660).",
                       default="unix:///run/cripy/cripy.sock")
    log_level: str = _doc("One of debug, info, warning, error.", default="info")
    image: ImageConfig = field(default_factory=ImageConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    cdi: CdiConfig = field(default_factory=CdiConfig)
    registries: dict[str, RegistryHostConfig] = _doc(
        "Per-registry settings, one table per host: [registries.\"HOST[:PORT]\"].",
        default_factory=dict,
    )

    @property
    def socket_path(self) -> Path:
        return Path(endpoint_to_path(self.listen))

    def is_insecure(self, host: str) -> bool:
        entry = self.registries.get(host)
        return entry is not None and entry.insecure


LOG_LEVELS = ("debug", "info", "warning", "error")


def endpoint_to_path(endpoint: str) -> str:
    """`unix:///run/x.sock` or a bare path -> the socket path."""
    if endpoint.startswith("unix://"):
        return endpoint[len("unix://"):]
    if "://" in endpoint:
        raise ConfigError(f"listen: only unix:// endpoints are supported, got {endpoint!r}")
    return endpoint


# --- loading -------------------------------------------------------------------------


DEFAULT_CONFIG_FILE = "/etc/cripy/cripy.toml"
DEFAULT_CONFIG_DIR = "/etc/cripy/cripy.d"


def load(path: str | Path | None) -> Config:
    """Defaults, overlaid with the TOML file at `path` when given."""
    if path is None:
        return validate(Config())
    return load_files([Path(path)])


def node_config_files(path: str | Path | None = None,
                      config_dir: str | Path | None = None) -> list[Path]:
    """The files a daemon reads, in the order they are merged.

    Without `path`: /etc/cripy/cripy.toml if it exists, then the drop-ins of `config_dir`
    (default /etc/cripy/cripy.d, skipped when missing). With `path`: that file, then the
    drop-ins of `config_dir` only when one is given. Drop-ins are the *.toml files of the
    directory in lexical order of their names (hidden files skipped).
    """
    files: list[Path] = []
    if path is not None:
        files.append(Path(path))
    elif Path(DEFAULT_CONFIG_FILE).is_file():
        files.append(Path(DEFAULT_CONFIG_FILE))
    if config_dir is None and path is None:
        directory = Path(DEFAULT_CONFIG_DIR)
        if not directory.is_dir():
            return files
    elif config_dir is None:
        return files
    else:
        directory = Path(config_dir)
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise ConfigError(f"cannot read config directory {directory}: {exc.strerror}") from exc
    files += [p for p in entries
              if p.name.endswith(".toml") and not p.name.startswith(".") and p.is_file()]
    return files


def load_files(files: list[Path]) -> Config:
    """Defaults, overlaid with each file in turn: tables merge key by key, later files win.

    Each file is checked on its own first (unknown keys, wrong types), so an error names
    the file; a bad value is blamed on the last file that set the key.
    """
    merged: dict[str, Any] = {}
    parsed: list[tuple[Path, dict[str, Any]]] = []
    for path in files:
        data = _read_toml(path)
        try:
            _build(Config, data, "")
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        parsed.append((path, data))
        merge_tables(merged, data)
    try:
        return from_dict(merged)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        culprits = [path for path, data in parsed if _has_key(data, key)]
        if culprits:
            raise ConfigError(f"config file {culprits[-1]}: {exc}") from None
        raise


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


def _has_key(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def merge_tables(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """Deep-merge parsed TOML `extra` into `into`: tables merge, anything else replaces."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_tables(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def from_dict(data: dict[str, Any]) -> Config:
    """A validated Config from parsed TOML (unknown keys and wrong types are errors)."""
    return validate(_build(Config, data, ""))


def validate(config: Config) -> Config:
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, "
                          f"got {config.log_level!r}")
    if config.image.pull_concurrency < 1:
        raise ConfigError("image.pull_concurrency: must be at least 1")
    if config.image.registry_timeout <= 0:
        raise ConfigError("image.registry_timeout: must be positive")
    try:
        validate_patterns(config.image.pinned_images)
    except InvalidArgumentError as exc:
        raise ConfigError(f"image.pinned_images: {exc}") from None
    _validate_runtime(config.runtime)
    if config.runtime.log_size_max != -1 and config.runtime.log_size_max < 8192:
        raise ConfigError("runtime.log_size_max: must be -1 or at least 8192")
    if config.monitoring.log_format not in ("text", "json"):
        raise ConfigError(f"monitoring.log_format: must be text or json, "
                          f"got {config.monitoring.log_format!r}")
    if not 0 <= config.streaming.port < 65536:
        raise ConfigError(f"streaming.port: {config.streaming.port} is not a port")
    if bool(config.streaming.tls_cert_file) != bool(config.streaming.tls_key_file):
        raise ConfigError("streaming: tls_cert_file and tls_key_file go together")
    for directory in config.cdi.spec_dirs:
        if not directory.startswith("/"):
            raise ConfigError(f"cdi.spec_dirs: {directory!r} is not an absolute path")
    endpoint_to_path(config.listen)
    return config


def _validate_runtime(runtime: RuntimeConfig) -> None:
    if runtime.cgroup_manager not in ("cgroupfs", "systemd"):
        raise ConfigError("runtime.cgroup_manager: must be cgroupfs or systemd, "
                          f"got {runtime.cgroup_manager!r}")
    conmon_cgroup = runtime.conmon_cgroup
    if conmon_cgroup != "pod" and not (conmon_cgroup.endswith(".slice") and
                                       "/" not in conmon_cgroup and len(conmon_cgroup) > 6):
        raise ConfigError("runtime.conmon_cgroup: must be \"pod\" or a slice name such as "
                          f"system.slice, got {conmon_cgroup!r}")
    if conmon_cgroup != "pod" and runtime.cgroup_manager != "systemd":
        # cgroupfs keeps conmon in the daemon's cgroup: a slice here would be ignored.
        raise ConfigError(f"runtime.conmon_cgroup: {conmon_cgroup!r} needs "
                          "cgroup_manager = \"systemd\" (with cgroupfs conmon stays in the "
                          "daemon's cgroup)")
    for name, handler in runtime.handlers.items():
        if not HANDLER_NAME.fullmatch(name):
            raise ConfigError(f"runtime.handlers.{name}: a handler name must be a DNS label "
                              "(lower-case letters, digits and '-')")
        for key in ("runtime_path", "monitor_path"):
            if not getattr(handler, key):
                raise ConfigError(f"runtime.handlers.{name}.{key}: must not be empty")
        if handler.runtime_root and not handler.runtime_root.startswith("/"):
            raise ConfigError(f"runtime.handlers.{name}.runtime_root: must be an absolute "
                              f"path, got {handler.runtime_root!r}")
    if runtime.default_handler not in runtime.handlers:
        raise ConfigError(f"runtime.default_handler: {runtime.default_handler!r} is not a "
                          f"[runtime.handlers] table (configured: "
                          f"{', '.join(sorted(runtime.handlers))})")
    # The old single-runtime keys still work: they set the default handler's binaries.
    default = runtime.handlers[runtime.default_handler]
    if runtime.runtime_path:
        default.runtime_path = runtime.runtime_path
    if runtime.conmon_path:
        default.monitor_path = runtime.conmon_path


def _build(cls: type[Any], data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown config key {prefix}{key}")
        values[key] = _convert(hints[key], value, f"{prefix}{key}")
        spec = known[key]
        if spec.metadata.get("merge_defaults") and callable(spec.default_factory):
            values[key] = {**spec.default_factory(), **values[key]}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")  # type: ignore[arg-type]
    if origin is dict:
        _, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table")
        return {k: _convert(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        return [_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(hint, types.UnionType):
        raise AssertionError(f"union types are not supported in config ({key})")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, float, str) and (type(value) is not hint):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {_type_name(type(value))}")
    return value


def _type_name(t: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(t, getattr(t, "__name__", str(t)))


# --- printing ------------------------------------------------------------------------


def render_default() -> str:
    """The complete default configuration as commented TOML."""
    return render(Config())


def render(config: Config) -> str:
    """`config` as commented TOML that `load()` reads back to the same values."""
    lines = ["# cripy configuration.", ""]
    _render_table(config, [], lines)
    lines += [
        "# Per-registry settings, one table per host (as written in image references):",
        "# [registries.\"docker.io\"]",
        "# mirrors = [\"mirror.example:5000\"]",
        "# insecure = false",
        "",
    ]
    return "\n".join(lines)


def _render_table(obj: Any, path: list[str], lines: list[str]) -> None:
    tables = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            tables.append((f.name, value, ""))
            continue
        if isinstance(value, dict):
            for i, (name, entry) in enumerate(value.items()):
                doc = f.metadata.get("doc", "") if i == 0 and path else ""
                tables.append((f'{f.name}."{name}"', entry, doc))
            continue
        if f.metadata.get("doc"):
            lines.append(f"# {f.metadata['doc']}")
        lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    for name, value, doc in tables:
        if doc:
            lines.append(f"# {doc}")
        lines.append(f"[{'.'.join([*path, name])}]")
        _render_table(value, [*path, name], lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r}")

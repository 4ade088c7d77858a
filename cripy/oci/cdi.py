"""Container Device Interface (CDI): devices named `vendor.com/class=name`, resolved
against the spec files of the CDI spec directories and applied to an OCI spec.

A container asks for devices in ContainerConfig.CDI_devices and, as containerd also
honours, in annotations whose key starts with `cdi.k8s.io/` (a comma-separated list of
qualified names). Spec files (`*.json`, `*.yaml`; CDI versions 0.3.0 to 0.8.0) are read
from each directory in turn, a later directory overriding an earlier one for the same
device; two files of one directory defining the same device make it unusable.

Requesting a device applies its spec's `containerEdits` (once per spec) and then the
device's own: env, deviceNodes, mounts, hooks, additionalGids and intelRdt. A device
that cannot be resolved is an error naming it and the directories searched, never
silently dropped. Parsing and resolution are pure; `load` and `apply` touch the file
system and belong in a thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cripy.oci.spec import clean_container_path, order_mounts

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "cdi.k8s.io/"
#: The CDI spec versions read (major, minor); any patch level.
SUPPORTED_VERSIONS = tuple((0, minor) for minor in range(3, 9))
#: The OCI hooks a CDI hook may name.
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer",
              "poststart", "poststop")
#: Largest spec file read; a bigger one is refused, not truncated.
MAX_SPEC_BYTES = 4 << 20
RESCTRL = "/sys/fs/resctrl"

_VENDOR_OR_CLASS = re.compile(r"[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_DEVICE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")


class SpecError(ValueError):
    """A CDI spec file that is not valid CDI."""


# --- names ---------------------------------------------------------------------------


def parse_qualified_name(name: str) -> tuple[str, str, str]:
    """`vendor.com/class=device` -> (vendor, class, device); InvalidArgumentError if the
    name is not fully qualified or has characters CDI does not allow."""
    kind, sep, device = name.partition("=")
    vendor, slash, klass = kind.partition("/")
    if not (sep and slash and vendor and klass and device):
        raise InvalidArgumentError(
            f"CDI device name {name!r} is not fully qualified (vendor.com/class=name)")
    for part, what, pattern in ((vendor, "vendor", _VENDOR_OR_CLASS),
                                (klass, "class", _VENDOR_OR_CLASS),
                                (device, "device name", _DEVICE_NAME)):
        if not pattern.fullmatch(part):
            raise InvalidArgumentError(f"CDI device name {name!r}: invalid {what} {part!r}")
    return vendor, klass, device


def requested_devices(config: pb.ContainerConfig) -> list[str]:
    """The qualified devices a container asks for: CDI_devices first, then those of its
    `cdi.k8s.io/` annotations (by key), each once."""
    names = [d.name for d in config.CDI_devices]
    for key in sorted(config.annotations):
        if key.startswith(ANNOTATION_PREFIX):
            for name in config.annotations[key].split(","):
                try:
                    parse_qualified_name(name)
                except InvalidArgumentError as exc:
                    raise InvalidArgumentError(f"annotation {key}: {exc}") from None
                names.append(name)
    for name in names:
        parse_qualified_name(name)
    return list(dict.fromkeys(names))


# --- the spec model ------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceNode:
    path: str
    host_path: str
    type: str = ""
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    permissions: str = ""
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class MountEdit:
    host_path: str
    container_path: str
    type: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class HookEdit:
    hook_name: str
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True)
class Edits:
    """One `containerEdits` object."""

    env: tuple[str, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[MountEdit, ...] = ()
    hooks: tuple[HookEdit, ...] = ()
    additional_gids: tuple[int, ...] = ()
    intel_rdt: Mapping[str, Any] | None = None

    @property
    def empty(self) -> bool:
        return self == Edits()


@dataclass(frozen=True)
class Spec:
    """One CDI spec file."""

    path: str
    priority: int  # the index of its directory: higher wins
    version: str
    vendor: str
    klass: str
    edits: Edits
    devices: Mapping[str, Edits]

    @property
    def kind(self) -> str:
        return f"{self.vendor}/{self.klass}"


# --- parsing -------------------------------------------------------------------------


def _fields(obj: Any, where: str, allowed: Iterable[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise SpecError(f"{where}: expected an object")
    unknown = sorted(set(obj) - set(allowed))
    if "netDevices" in unknown:
        raise SpecError(f"{where}.netDevices: network devices need CDI 1.0, which is not "
                        "supported")
    if unknown:
        raise SpecError(f"{where}: unknown field {unknown[0]!r}")
    return obj


def _str(obj: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise SpecError(f"{where}.{key}: expected a string")
    if required and not value:
        raise SpecError(f"{where}.{key}: required")
    return value


def _int(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SpecError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    return value


def _strs(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}.{key}: expected a list of strings")
    return tuple(value)


def _env(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    env = _strs(obj, key, where)
    for entry in env:
        if entry.find("=") <= 0:
            raise SpecError(f"{where}.{key}: {entry!r} is not NAME=VALUE")
    return env


def _absolute(path: str, where: str) -> str:
    if not path.startswith("/") or "\x00" in path:
        raise SpecError(f"{where}: {path!r} is not an absolute path")
    return path


def _device_node(obj: Any, where: str) -> DeviceNode:
    _fields(obj, where, ("path", "hostPath", "type", "major", "minor", "fileMode",
                         "permissions", "uid", "gid"))
    path = _absolute(_str(obj, "path", where, required=True), f"{where}.path")
    host_path = _str(obj, "hostPath", where)
    kind = _str(obj, "type", where)
    if kind not in ("", "b", "c", "u", "p"):
        raise SpecError(f"{where}.type: {kind!r} is not one of b, c, u, p")
    permissions = _str(obj, "permissions", where)
    if permissions != "none" and permissions.strip("rwm"):
        raise SpecError(f"{where}.permissions: {permissions!r} is not a subset of rwm")
    return DeviceNode(
        path=path, host_path=_absolute(host_path, f"{where}.hostPath") if host_path else path,
        type=kind, major=_int(obj, "major", where) or 0, minor=_int(obj, "minor", where) or 0,
        file_mode=_int(obj, "fileMode", where), permissions=permissions,
        uid=_int(obj, "uid", where), gid=_int(obj, "gid", where))


def _mount(obj: Any, where: str) -> MountEdit:
    _fields(obj, where, ("hostPath", "containerPath", "type", "options"))
    return MountEdit(
        host_path=_absolute(_str(obj, "hostPath", where, required=True), f"{where}.hostPath"),
        container_path=_absolute(_str(obj, "containerPath", where, required=True),
                                 f"{where}.containerPath"),
        type=_str(obj, "type", where), options=_strs(obj, "options", where))


def _hook(obj: Any, where: str) -> HookEdit:
    _fields(obj, where, ("hookName", "path", "args", "env", "timeout"))
    name = _str(obj, "hookName", where, required=True)
    if name not in HOOK_NAMES:
        raise SpecError(f"{where}.hookName: {name!r} is not one of {', '.join(HOOK_NAMES)}")
    timeout = _int(obj, "timeout", where)
    if timeout == 0:
        raise SpecError(f"{where}.timeout: must be positive")
    return HookEdit(
        hook_name=name, path=_absolute(_str(obj, "path", where, required=True), f"{where}.path"),
        args=_strs(obj, "args", where), env=_env(obj, "env", where), timeout=timeout)


def _list(obj: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key) or []
    if not isinstance(value, list):
        raise SpecError(f"{where}.{key}: expected a list")
    return value


def parse_edits(obj: Any, where: str) -> Edits:
    """A `containerEdits` object."""
    if obj is None:
        return Edits()
    _fields(obj, where, ("env", "deviceNodes", "mounts", "hooks", "additionalGids",
                         "intelRdt"))
    gids = _list(obj, "additionalGids", where)
    if not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 2**32
               for g in gids):
        raise SpecError(f"{where}.additionalGids: expected a list of group IDs")
    rdt = obj.get("intelRdt")
    if rdt is not None:
        _fields(rdt, f"{where}.intelRdt", ("closID", "l3CacheSchema", "memBwSchema",
                                           "enableCMT", "enableMBM"))
        closid = _str(rdt, "closID", f"{where}.intelRdt")
        if closid != "/" and (closid in (".", "..") or "/" in closid or "\n" in closid):
            raise SpecError(f"{where}.intelRdt.closID: {closid!r} is not a valid name")
    return Edits(
        env=_env(obj, "env", where),
        device_nodes=tuple(_device_node(d, f"{where}.deviceNodes[{i}]")
                           for i, d in enumerate(_list(obj, "deviceNodes", where))),
        mounts=tuple(_mount(m, f"{where}.mounts[{i}]")
                     for i, m in enumerate(_list(obj, "mounts", where))),
        hooks=tuple(_hook(h, f"{where}.hooks[{i}]")
                    for i, h in enumerate(_list(obj, "hooks", where))),
        additional_gids=tuple(gids), intel_rdt=rdt)


def _version(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        raise SpecError(f"cdiVersion {text!r} is not a version (MAJOR.MINOR.PATCH)")
    version = (int(match[1]), int(match[2]))
    if version not in SUPPORTED_VERSIONS:
        raise SpecError(f"cdiVersion {text} is not supported (cripy reads 0.3.0 to 0.8.0)")
    return version


def _needed_version(raw: Mapping[str, Any], klass: str, edits: Sequence[Edits],
                    device_names: Sequence[str]) -> tuple[tuple[int, int], str]:
    """The oldest CDI version with every feature the spec uses, and the feature."""
    if any(e.additional_gids or e.intel_rdt is not None for e in edits):
        return (0, 7), "additionalGids or intelRdt"
    if raw.get("annotations") or any(d.get("annotations") for d in raw.get("devices") or []
                                     if isinstance(d, dict)) or "." in klass:
        return (0, 6), "annotations or a '.' in the class"
    if any(n.host_path != n.path for e in edits for n in e.device_nodes) or \
            any(name[:1].isdigit() for name in device_names):
        return (0, 5), "deviceNodes hostPath or a device name starting with a digit"
    if any(m.type for e in edits for m in e.mounts):
        return (0, 4), "a mount type"
    return (0, 3), ""


def _annotations(obj: Mapping[str, Any], where: str) -> None:
    value = obj.get("annotations") or {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SpecError(f"{where}.annotations: expected string keys and values")


def parse_spec(data: bytes, path: str, priority: int = 0) -> Spec:
    """A spec file's contents (JSON, or YAML for a `.yaml` file) -> Spec; SpecError if it
    is not valid CDI."""
    try:
        raw = yaml.safe_load(data) if path.endswith(".yaml") else json.loads(data)
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError(f"not valid {'YAML' if path.endswith('.yaml') else 'JSON'}: "
                        f"{str(exc).splitlines()[0]}") from None
    _fields(raw, "spec", ("cdiVersion", "kind", "annotations", "devices", "containerEdits"))
    version_text = _str(raw, "cdiVersion", "spec", required=True)
    version = _version(version_text)
    kind = _str(raw, "kind", "spec", required=True)
    vendor, slash, klass = kind.partition("/")
    if not (slash and _VENDOR_OR_CLASS.fullmatch(vendor) and _VENDOR_OR_CLASS.fullmatch(klass)):
        raise SpecError(f"kind {kind!r} is not vendor.com/class")
    _annotations(raw, "spec")
    edits = parse_edits(raw.get("containerEdits"), "containerEdits")
    devices: dict[str, Edits] = {}
    for i, device in enumerate(_list(raw, "devices", "spec")):
        where = f"devices[{i}]"
        _fields(device, where, ("name", "annotations", "containerEdits"))
        name = _str(device, "name", where, required=True)
        if not _DEVICE_NAME.fullmatch(name):
            raise SpecError(f"{where}.name: {name!r} is not a valid device name")
        if name in devices:
            raise SpecError(f"device {name!r} is defined twice")
        _annotations(device, where)
        device_edits = parse_edits(device.get("containerEdits"), f"{where}.containerEdits")
        if device_edits.empty:
            raise SpecError(f"{where} ({name}): its containerEdits are empty")
        devices[name] = device_edits
    if not devices:
        raise SpecError("the spec defines no devices")
    needed, feature = _needed_version(raw, klass, [edits, *devices.values()], list(devices))
    if needed > version:
        raise SpecError(f"cdiVersion {version_text} is too old for {feature} "
                        f"(needs {needed[0]}.{needed[1]}.0)")
    return Spec(path=path, priority=priority, version=version_text, vendor=vendor,
                klass=klass, edits=edits, devices=devices)


# --- the registry of spec directories --------------------------------------------------


@dataclass
class Registry:
    """Every device of the spec directories, with what went wrong reading them."""

    dirs: tuple[str, ...]
    specs: list[Spec] = field(default_factory=list)
    devices: dict[str, tuple[Spec, Edits]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # spec file -> why it is skipped
    conflicts: dict[str, str] = field(default_factory=dict)  # device -> the two files

    def add(self, spec: Spec) -> None:
        """Add a spec read from a directory no earlier than the ones added before."""
        self.specs.append(spec)
        for name, edits in spec.devices.items():
            qualified = f"{spec.kind}={name}"
            other = self.devices.get(qualified)
            if other is not None and other[0].priority == spec.priority:
                self.conflicts[qualified] = f"defined in both {other[0].path} and {spec.path}"
            else:  # new, or from a later directory: that one wins
                self.conflicts.pop(qualified, None)
            self.devices[qualified] = (spec, edits)

    def resolve(self, names: Sequence[str], *, applied: Sequence[str] = ()
                ) -> list[tuple[str, Edits]]:
        """The edits to apply for `names`, labelled: each spec's own edits once (before
        its first device's), then the devices'. NotFoundError names what is missing.
        `applied`: devices already applied to the spec; their edits, and their specs' own
        edits, are left out."""
        wanted = [name for name in dict.fromkeys(names) if name not in applied]
        missing = [name for name in wanted
                   if name not in self.devices or name in self.conflicts]
        if missing:
            raise NotFoundError(self._missing_message(missing))
        out: list[tuple[str, Edits]] = []
        seen = {self.devices[name][0].path for name in applied if name in self.devices}
        for name in wanted:
            spec, edits = self.devices[name]
            if spec.path not in seen:
                seen.add(spec.path)
                out.append((f"CDI spec {spec.path}", spec.edits))
            out.append((f"CDI device {name}", edits))
        return out

    def _missing_message(self, missing: Sequence[str]) -> str:
        reasons = []
        for name in missing:
            kind = name.partition("=")[0]
            files = [s.path for s in self.specs if s.kind == kind]
            if name in self.conflicts:
                why = f"ambiguous: {self.conflicts[name]}"
            elif files:
                why = f"not in {', '.join(files)}"
            else:
                why = f"no spec of kind {kind}"
            reasons.append(f"{name} ({why})")
        message = (f"CDI device{'s' if len(missing) > 1 else ''} not found: "
                   f"{'; '.join(reasons)}; spec dirs searched: {', '.join(self.dirs)}")
        if self.errors:
            skipped = "; ".join(f"{path}: {why}" for path, why in sorted(self.errors.items()))
            message += f"; invalid specs skipped: {skipped}"
        return message


def load(dirs: Sequence[str]) -> Registry:
    """Read every spec file of `dirs` (missing directories are fine); files that are not
    valid CDI are skipped and noted in `errors`."""
    registry = Registry(tuple(dirs))
    for priority, directory in enumerate(dirs):
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            registry.errors[directory] = f"cannot read the directory: {exc.strerror}"
            continue
        for entry in entries:
            if not entry.name.endswith((".json", ".yaml")) or entry.is_dir():
                continue
            try:
                with open(entry.path, "rb") as f:
                    data = f.read(MAX_SPEC_BYTES + 1)
                if len(data) > MAX_SPEC_BYTES:
                    raise SpecError(f"larger than {MAX_SPEC_BYTES} bytes")
                registry.add(parse_spec(data, entry.path, priority))
            except OSError as exc:
                registry.errors[entry.path] = f"cannot read it: {exc.strerror}"
            except SpecError as exc:
                registry.errors[entry.path] = str(exc)
    for path, why in registry.errors.items():
        log.warning("CDI spec %s skipped: %s", path, why)
    return registry


# --- applying edits to an OCI spec -----------------------------------------------------


def _host_node(node: DeviceNode, label: str) -> DeviceNode:
    """The node with its type and numbers filled from the host's node where missing."""
    if node.type and (node.major or node.type == "p"):
        return node
    try:
        st = os.lstat(node.host_path)
    except FileNotFoundError:
        raise NotFoundError(f"{label}: host device node {node.host_path} does not exist") \
            from None
    except OSError as exc:
        raise FailedPreconditionError(
            f"{label}: host device node {node.host_path}: {exc.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        kind = "b"
    elif stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISFIFO(st.st_mode):
        kind = "p"
    else:
        raise FailedPreconditionError(f"{label}: {node.host_path} is not a device node")
    if node.type and node.type != kind and not (node.type == "u" and kind == "c"):
        raise FailedPreconditionError(
            f"{label}: {node.path} is of type {node.type!r} but host node {node.host_path} "
            f"is {kind!r}")
    major, minor = (node.major, node.minor) if node.major or kind == "p" else \
        (os.major(st.st_rdev), os.minor(st.st_rdev))
    return DeviceNode(node.path, node.host_path, node.type or kind, major, minor,
                      node.file_mode, node.permissions, node.uid, node.gid)


def _set_env(process: dict[str, Any], entries: Iterable[str]) -> None:
    env: list[str] = process.setdefault("env", [])
    for entry in entries:
        key = entry.split("=", 1)[0]
        env[:] = [e for e in env if e.split("=", 1)[0] != key]
        env.append(entry)


def _apply_nodes(spec: dict[str, Any], nodes: Iterable[DeviceNode], label: str) -> None:
    linux = spec.setdefault("linux", {})
    devices: list[dict[str, Any]] = linux.setdefault("devices", [])
    rules: list[dict[str, Any]] = linux.setdefault("resources", {}).setdefault("devices", [])
    user = spec.get("process", {}).get("user", {})
    for raw in nodes:
        node = _host_node(raw, label)
        path = clean_container_path(node.path, f"{label} device path")
        entry: dict[str, Any] = {"path": path, "type": node.type}
        if node.type != "p":
            entry.update(major=node.major, minor=node.minor)
        if node.file_mode is not None:
            entry["fileMode"] = node.file_mode
        # Owned by the container's user unless the spec says otherwise (as CDI does).
        for key, given, default in (("uid", node.uid, user.get("uid", 0)),
                                    ("gid", node.gid, user.get("gid", 0))):
            if given is not None:
                entry[key] = given
            elif default > 0:
                entry[key] = default
        devices[:] = [d for d in devices if d.get("path") != path]
        devices.append(entry)
        if node.type in ("b", "c", "u") and node.permissions != "none":
            rules.append({"allow": True, "type": "c" if node.type == "u" else node.type,
                          "major": node.major, "minor": node.minor,
                          "access": node.permissions or "rwm"})


def _apply_mounts(spec: dict[str, Any], mounts: Iterable[MountEdit], label: str) -> None:
    current: list[dict[str, Any]] = spec.setdefault("mounts", [])
    for m in mounts:
        dest = clean_container_path(m.container_path, f"{label} mount containerPath")
        bind = m.type == "bind" or bool({"bind", "rbind"} & set(m.options))
        if bind and not os.path.exists(m.host_path):
            raise NotFoundError(f"{label}: mount hostPath {m.host_path} does not exist")
        current[:] = [c for c in current if c.get("destination") != dest]
        entry: dict[str, Any] = {"destination": dest, "source": m.host_path,
                                 "options": list(m.options)}
        entry["type"] = m.type or ("bind" if bind else "none")
        current.append(entry)
    order_mounts(current)


def _apply_hooks(spec: dict[str, Any], hooks: Iterable[HookEdit], label: str) -> None:
    for h in hooks:
        if not os.path.isfile(h.path):
            raise NotFoundError(f"{label}: {h.hook_name} hook {h.path} does not exist")
        entry: dict[str, Any] = {"path": h.path}
        if h.args:
            entry["args"] = list(h.args)
        if h.env:
            entry["env"] = list(h.env)
        if h.timeout is not None:
            entry["timeout"] = h.timeout
        spec.setdefault("hooks", {}).setdefault(h.hook_name, []).append(entry)


def apply(spec: dict[str, Any], edits: Sequence[tuple[str, Edits]]) -> None:
    """Apply resolved edits to an OCI spec in place (stats host device nodes)."""
    process = spec.setdefault("process", {})
    for label, e in edits:
        _set_env(process, e.env)
        _apply_nodes(spec, e.device_nodes, label)
        _apply_mounts(spec, e.mounts, label)
        _apply_hooks(spec, e.hooks, label)
        if e.additional_gids:
            user = process.setdefault("user", {"uid": 0, "gid": 0})
            gids: list[int] = user.setdefault("additionalGids", [])
            gids += [g for g in e.additional_gids if g != 0 and g not in gids]
        if e.intel_rdt is not None:
            if not os.path.isdir(os.path.join(RESCTRL, "info")):
                raise FailedPreconditionError(
                    f"{label}: intelRdt needs resctrl, which is not mounted at {RESCTRL}")
            spec.setdefault("linux", {})["intelRdt"] = dict(e.intel_rdt)


def inject(spec: dict[str, Any], config: pb.ContainerConfig, spec_dirs: Sequence[str]) -> None:
    """Resolve the container's CDI devices against `spec_dirs` and apply them to `spec`
    (blocking: reads the spec files and stats host nodes)."""
    names = requested_devices(config)
    if not names:
        return
    registry = load(spec_dirs)
    apply(spec, registry.resolve(names))
    log.info("container %s: CDI devices %s", config.metadata.name, ", ".join(names))

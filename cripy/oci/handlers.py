"""Runtime handlers: the OCI runtimes a pod can ask for by name (its RuntimeClass).

Each handler is a runtime binary (runc, crun), the state directory it is run with
(`--root`) and the monitor (conmon) that runs it. They are probed once at start: a
handler whose binary is missing, or that cannot work on this host, stays configured but
refuses pods with the reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cripy.config import RuntimeConfig
from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.oci.cgroups import HostCgroups
from cripy.oci.features import HandlerFeatures, KernelFeatures, combine, runtime_features

log = logging.getLogger(__name__)

VERSION_TIMEOUT = 10.0

H = TypeVar("H")


@dataclass(frozen=True)
class RuntimeHandler:
    name: str
    runtime_path: str  # absolute when found in PATH
    root: Path  # the runtime's --root
    monitor_path: str
    #: "runc", "crun", ... from `--version`; "" when it could not be run
    flavor: str = ""
    version: str = ""
    #: why this host cannot run containers with this handler (pods asking for it are
    #: refused); "" when it can
    problem: str = ""
    #: what was wrong with the binaries at start (logged; a container create reports
    #: it again if it is still so then); "" when they were fine
    binary_problem: str = ""
    #: recursive read-only mounts and user namespaces with this runtime on this host
    features: HandlerFeatures = HandlerFeatures()

    def report(self) -> dict[str, object]:
        """What Status (verbose) tells of this handler: usable here or why not."""
        return {"name": self.name, "runtime_path": self.runtime_path, "flavor": self.flavor,
                "version": self.version, "usable": not (self.problem or self.binary_problem),
                "problem": self.problem or self.binary_problem,
                "features": self.features.report()}

    def check_usable(self) -> None:
        if self.problem:
            raise FailedPreconditionError(
                f"runtime handler {self.name!r} cannot run containers on this host: "
                f"{self.problem}")


def _resolve(binary: str) -> str:
    """conmon wants the runtime as a path, not a name to look up."""
    if os.sep in binary:
        return binary
    return shutil.which(binary) or binary


def runtime_version(path: str) -> tuple[str, str, str]:
    """(flavor, version, problem) from `<runtime> --version` ("runc version 1.1.5")."""
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True,
                              timeout=VERSION_TIMEOUT, check=False)
    except OSError as exc:
        return "", "", f"its runtime {path} cannot be run ({exc.strerror})"
    except subprocess.TimeoutExpired:
        return "", "", f"its runtime {path} did not answer --version in {VERSION_TIMEOUT:g}s"
    first = (proc.stdout.strip().splitlines() or [""])[0].split()
    if proc.returncode != 0 or len(first) < 3 or first[1] != "version":
        return "", "", f"its runtime {path} does not look like an OCI runtime (--version: " \
                       f"{(proc.stdout or proc.stderr).strip()[:100]!r})"
    return first[0], first[2], ""


def host_problem(flavor: str, host: HostCgroups, cgroup_driver: str) -> str:
    """Why a runtime of `flavor` cannot work on `host` with `cgroup_driver`, or ""."""
    if flavor == "crun":
        if host.mode == "hybrid" and host.v2_controllers:
            return ("crun refuses hybrid cgroup hierarchies: this host has cgroup v1 "
                    "controllers plus a cgroup v2 hierarchy holding "
                    f"{' '.join(host.v2_controllers)}; crun needs pure cgroup v2 (or v1)")
        if cgroup_driver == "systemd" and not host.dbus:
            return ("crun's systemd cgroup mode talks to systemd over the D-Bus system bus, "
                    "and /run/dbus/system_bus_socket is missing")
    return ""


def probe_handler(name: str, runtime_path: str, monitor_path: str, root: Path,
                  host: HostCgroups, cgroup_driver: str,
                  kernel: KernelFeatures | None = None) -> RuntimeHandler:
    """One handler's binaries and features; `kernel` (probed once for all handlers)
    None leaves the features unprobed (reported unsupported)."""
    path = _resolve(runtime_path)
    monitor = _resolve(monitor_path)
    flavor, version, binary_problem = runtime_version(path)
    if not binary_problem and not os.access(monitor, os.X_OK):
        binary_problem = f"its monitor {monitor} is not an executable file"
    problem = host_problem(flavor, host, cgroup_driver)
    features = HandlerFeatures()
    if kernel is not None:
        features = combine(problem or binary_problem, kernel,
                           runtime_features(path, flavor, version))
    return RuntimeHandler(name, path, root, monitor, flavor, version, problem,
                          binary_problem, features)


def probe_handlers(config: RuntimeConfig, state_dir: Path, host: HostCgroups,
                   kernel: KernelFeatures | None = None) -> dict[str, RuntimeHandler]:
    """Every configured handler, probed; problems are logged, not raised."""
    found: dict[str, RuntimeHandler] = {}
    for name, entry in config.handlers.items():
        root = Path(entry.runtime_root) if entry.runtime_root else state_dir / name
        handler = probe_handler(name, entry.runtime_path, entry.monitor_path, root, host,
                                config.cgroup_manager, kernel)
        if handler.problem or handler.binary_problem:
            log.warning("runtime handler %s is unusable: %s", name,
                        handler.problem or handler.binary_problem)
        else:
            log.info("runtime handler %s: %s %s (%s)", name, handler.flavor, handler.version,
                     handler.runtime_path)
        for feature, value in (("recursive read-only mounts",
                                handler.features.recursive_read_only),
                               ("user namespaces", handler.features.user_namespaces)):
            log.info("runtime handler %s: %s %s", name, feature,
                     "supported" if value.supported else f"unsupported: {value.reason}")
        found[name] = handler
    return found


def select(handlers: Mapping[str, H], default: str, name: str) -> H:
    """The handler a runtime_handler field names ("" is the default): a RuntimeHandler,
    or its config."""
    handler = handlers.get(name or default)
    if handler is None:
        raise InvalidArgumentError(
            f"unknown runtime handler {name!r}: configured are "
            f"{', '.join(sorted(handlers))} (\"\" is {default})")
    return handler

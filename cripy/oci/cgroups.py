"""cgroup drivers: where a container's cgroup is, and who makes it.

The kubelet makes the pod-level cgroups (the parents) and hands the pod's one to
RunPodSandbox as `cgroup_parent`; the runtime makes one leaf per container below it.
With the cgroupfs driver the parent is a path ("/kubepods/burstable/pod<uid>") and runc
makes the directory "<parent>/cripy-<id>". With the systemd driver the parent is a slice
("kubepods-burstable-pod<uid>.slice", or the kubelet's expanded form
"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice") and runc,
in its systemd cgroup mode, asks systemd for a transient unit "cripy-<id>.scope" in that
slice. conmon then gets a "cripy-conmon-<id>.scope" of its own (in the pod's slice, or
the slice `[runtime] conmon_cgroup` names), so a restart of the daemon's own unit never
touches it.

Host facts (cgroup layout, whether systemd runs) are probed once at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cripy.errors import FailedPreconditionError, InvalidArgumentError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_CGROUPFS_PARENT = "/cripy"
#: Where pods without a cgroup_parent go with the systemd driver (as CRI-O does).
DEFAULT_SLICE = "system.slice"
CONTAINER_PREFIX = "cripy"
CONMON_PREFIX = "cripy-conmon"

_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
#: A unit name's characters (systemd allows these unescaped).
_UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.\\-]+")
_SLICE_SUFFIX = ".slice"


# --- host facts ------------------------------------------------------------------------


@dataclass(frozen=True)
class HostCgroups:
    """What this host's cgroups look like, probed once at start."""

    #: "unified" (cgroup v2 only), "hybrid" (v1 controllers plus a v2 hierarchy at
    #: /sys/fs/cgroup/unified) or "legacy" (v1 only)
    mode: str
    #: controllers the v2 hierarchy holds (in hybrid mode: those no v1 hierarchy took)
    v2_controllers: tuple[str, ...]
    #: systemd is PID 1 (/run/systemd/system exists, as sd_booted() checks)
    systemd: bool
    #: the D-Bus system bus socket exists (crun's systemd mode talks to systemd over it)
    dbus: bool

    @property
    def cgroup_v2(self) -> bool:
        return self.mode == "unified"

    def describe(self) -> str:
        controllers = " ".join(self.v2_controllers) or "none"
        return (f"cgroups {self.mode} (v2 controllers: {controllers}), "
                f"systemd {'running' if self.systemd else 'not PID 1'}, "
                f"D-Bus system bus {'present' if self.dbus else 'absent'}")


def probe_host(root: Path = CGROUP_ROOT, run: Path = Path("/run")) -> HostCgroups:
    """The host's cgroup layout and init system (a few stat calls and two small reads)."""
    if (root / "cgroup.controllers").exists():
        mode, v2 = "unified", root
    elif (root / "unified" / "cgroup.controllers").exists():
        mode, v2 = "hybrid", root / "unified"
    else:
        mode, v2 = "legacy", None
    controllers: tuple[str, ...] = ()
    if v2 is not None:
        with contextlib.suppress(OSError):
            controllers = tuple((v2 / "cgroup.controllers").read_text().split())
    return HostCgroups(
        mode=mode,
        v2_controllers=controllers,
        systemd=(run / "systemd" / "system").is_dir(),
        dbus=(run / "dbus" / "system_bus_socket").exists(),
    )


# --- slices ----------------------------------------------------------------------------


def expand_slice(name: str) -> str:
    """The cgroup path of a systemd slice: each "-" opens a level, as systemd (and
    the kubelet) lay slices out. "kubepods-burstable-pod1.slice" ->
    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice";
    "-.slice" is the root slice, "/"."""
    if name == "-.slice":
        return "/"
    stem = name.removesuffix(_SLICE_SUFFIX)
    if not name.endswith(_SLICE_SUFFIX) or not stem or "/" in name \
            or not _UNIT_CHARS.fullmatch(name):
        raise InvalidArgumentError(f"{name!r:.120} is not a systemd slice name")
    parts = stem.split("-")
    if any(not p for p in parts):
        raise InvalidArgumentError(
            f"slice {name!r:.120} has an empty level (a leading, trailing or double '-')")
    path = ""
    for i in range(len(parts)):
        path += "/" + "-".join(parts[: i + 1]) + _SLICE_SUFFIX
    return path


def _check_id(container_id: str) -> str:
    if not _ID.fullmatch(container_id):
        raise InvalidArgumentError(f"container id {container_id!r:.80} is not valid")
    return container_id


def _clean_path(path: str) -> str:
    if "\x00" in path or ".." in path.split("/"):
        raise InvalidArgumentError(f"cgroup_parent {path!r:.120} contains '..' or a NUL")
    return "/" + "/".join(p for p in path.split("/") if p not in ("", "."))


# --- drivers ---------------------------------------------------------------------------


class CgroupDriver(Protocol):
    """What the OCI spec, the runtime calls and the stats need to know of a driver."""

    #: the name RuntimeConfig reports and `[runtime] cgroup_manager` holds
    name: str
    #: global flags for every runc/crun command
    runtime_args: tuple[str, ...]

    def parent(self, cgroup_parent: str) -> str:
        """The pod's parent in this driver's form ("" gives the default); a parent of
        the other driver's kind is an InvalidArgumentError naming both."""
        ...

    def cgroups_path(self, cgroup_parent: str, container_id: str) -> str:
        """The OCI spec's linux.cgroupsPath of a container."""
        ...

    def container_dir(self, cgroup_parent: str, container_id: str, runtime: str = "") -> str:
        """The cgroup of the container's processes as a path below the cgroup root
        ("/a/b"); `runtime` is the OCI runtime's kind ("runc", "crun")."""
        ...

    def pod_dir(self, cgroup_parent: str) -> str:
        """The pod's parent cgroup as a path below the cgroup root."""
        ...

    def monitor_prefix(self, cgroup_parent: str, container_id: str) -> list[str]:
        """What conmon's command line starts with: empty, or a command that places it."""
        ...

    async def cleanup(self, container_id: str) -> None:
        """Remove what the driver left of a deleted container (after `runc delete`)."""
        ...


class CgroupfsDriver:
    """cgroup directories made by runc itself under a path parent. conmon stays in the
    daemon's own cgroup."""

    name = "cgroupfs"
    runtime_args: tuple[str, ...] = ()

    def parent(self, cgroup_parent: str) -> str:
        parent = cgroup_parent or DEFAULT_CGROUPFS_PARENT
        if parent.rstrip("/").endswith(_SLICE_SUFFIX):
            raise InvalidArgumentError(
                f"cgroup_parent {parent!r:.120} is a systemd slice, but the cgroup driver is "
                "cgroupfs: give a path such as /kubepods/burstable/pod<uid> (or set "
                "[runtime] cgroup_manager = \"systemd\")")
        if not parent.startswith("/"):
            raise InvalidArgumentError(
                f"cgroup_parent {parent!r:.120} must be an absolute path with the cgroupfs "
                "cgroup driver")
        return _clean_path(parent)

    def cgroups_path(self, cgroup_parent: str, container_id: str) -> str:
        return self.container_dir(cgroup_parent, container_id)

    def container_dir(self, cgroup_parent: str, container_id: str, runtime: str = "") -> str:
        parent = self.parent(cgroup_parent).rstrip("/")
        return f"{parent}/{CONTAINER_PREFIX}-{_check_id(container_id)}"

    def pod_dir(self, cgroup_parent: str) -> str:
        return self.parent(cgroup_parent)

    def monitor_prefix(self, cgroup_parent: str, container_id: str) -> list[str]:
        return []

    async def cleanup(self, container_id: str) -> None:
        return None  # runc delete removed the directories


class SystemdDriver:
    """Transient scope units made through systemd: runc/crun in systemd cgroup mode for
    the container, `systemd-run --scope` for its conmon."""

    name = "systemd"
    runtime_args: tuple[str, ...] = ("--systemd-cgroup",)
    command_timeout = 30.0

    def __init__(self, conmon_cgroup: str = "pod", systemctl: str = "systemctl",
                 systemd_run: str = "systemd-run", cgroup_v2: bool = True) -> None:
        self.conmon_cgroup = conmon_cgroup
        self.systemctl = systemctl
        self.systemd_run = systemd_run
        self.cgroup_v2 = cgroup_v2

    def parent(self, cgroup_parent: str) -> str:
        """The slice name; the kubelet's expanded form must expand back to itself."""
        parent = cgroup_parent or DEFAULT_SLICE
        base = parent.rstrip("/").rsplit("/", 1)[-1]
        if not base.endswith(_SLICE_SUFFIX):
            raise InvalidArgumentError(
                f"cgroup_parent {parent!r:.120} is a cgroupfs path, but the cgroup driver is "
                "systemd: give a slice such as kubepods-burstable-pod<uid>.slice (or set "
                "[runtime] cgroup_manager = \"cgroupfs\")")
        expanded = expand_slice(base)
        if "/" in parent and parent.rstrip("/") != expanded:
            raise InvalidArgumentError(
                f"cgroup_parent {parent!r:.120} is not where systemd puts slice {base!r} "
                f"({expanded}); the systemd cgroup driver needs the slice's own path")
        return base

    def cgroups_path(self, cgroup_parent: str, container_id: str) -> str:
        # runc's and crun's systemd form "slice:prefix:name" -> unit "prefix-name.scope"
        return f"{self.parent(cgroup_parent)}:{CONTAINER_PREFIX}:{_check_id(container_id)}"

    def container_dir(self, cgroup_parent: str, container_id: str, runtime: str = "") -> str:
        scope = f"{self.pod_dir(cgroup_parent).rstrip('/')}/{scope_unit(container_id)}"
        # crun (systemd mode, cgroup v2) runs the container in a "container" child of its
        # scope, and sets the limits there.
        return f"{scope}/container" if runtime == "crun" and self.cgroup_v2 else scope

    def pod_dir(self, cgroup_parent: str) -> str:
        return expand_slice(self.parent(cgroup_parent))

    def monitor_slice(self, cgroup_parent: str) -> str:
        return self.parent(cgroup_parent) if self.conmon_cgroup == "pod" else self.conmon_cgroup

    def monitor_prefix(self, cgroup_parent: str, container_id: str) -> list[str]:
        # systemd-run --scope execs the command itself (same pid, environment and open
        # files) once the scope holds it; conmon's double fork stays in the scope.
        return [self.systemd_run, "--scope", "--quiet", "--collect",
                f"--unit={conmon_unit(container_id)}",
                f"--slice={self.monitor_slice(cgroup_parent)}", "--"]

    async def cleanup(self, container_id: str) -> None:
        units = [scope_unit(container_id), conmon_unit(container_id)]
        loaded = [unit for unit, state in (await self.unit_states(units)).items()
                  if state[0] == "loaded"]
        if not loaded:
            return
        log.info("stopping leftover units %s", " ".join(loaded))
        await self._systemctl("stop", "--", *loaded)
        await self._systemctl("reset-failed", "--", *loaded)

    async def unit_states(self, units: list[str]) -> dict[str, tuple[str, str]]:
        """unit -> (LoadState, ActiveState), as `systemctl show` tells."""
        rc, out = await self._systemctl("show", "--property=Id,LoadState,ActiveState",
                                        "--", *units)
        states: dict[str, tuple[str, str]] = {}
        for block, unit in zip(out.split("\n\n"), units, strict=False):
            fields = dict(line.partition("=")[::2] for line in block.splitlines() if line)
            states[unit] = (fields.get("LoadState", "not-found"),
                            fields.get("ActiveState", "inactive"))
        return states

    async def set_properties(self, unit: str, properties: list[str]) -> None:
        """`systemctl set-property --runtime` (kept until reboot); raises on failure."""
        errors: list[str] = []
        rc, _ = await self._systemctl("set-property", "--runtime", "--", unit, *properties,
                                      errors=errors)
        if rc != 0:
            raise FailedPreconditionError(
                f"systemctl set-property {unit} {' '.join(properties)} failed: "
                f"{''.join(errors) or f'exit status {rc}'}")

    async def _systemctl(self, *args: str, errors: list[str] | None = None
                         ) -> tuple[int, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.systemctl, *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            log.warning("cannot run %s: %s", self.systemctl, exc)
            return 127, ""
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.command_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("systemctl %s did not finish in %gs", args[0], self.command_timeout)
            return 124, ""
        if proc.returncode and args[0] != "reset-failed":
            log.warning("systemctl %s: %s", " ".join(args),
                        err.decode(errors="replace").strip())
            if errors is not None:
                errors.append(err.decode(errors="replace").strip())
        return proc.returncode or 0, out.decode(errors="replace")


def scope_unit(container_id: str) -> str:
    return f"{CONTAINER_PREFIX}-{_check_id(container_id)}.scope"


def conmon_unit(container_id: str) -> str:
    return f"{CONMON_PREFIX}-{_check_id(container_id)}.scope"


def make_driver(name: str, host: HostCgroups, *, conmon_cgroup: str = "pod") -> CgroupDriver:
    """The driver `[runtime] cgroup_manager` names, if this host can have it."""
    if name == "cgroupfs":
        return CgroupfsDriver()
    if name != "systemd":
        raise FailedPreconditionError(f"unknown cgroup driver {name!r}")
    if not host.systemd:
        raise FailedPreconditionError(
            "[runtime] cgroup_manager = \"systemd\" needs systemd as PID 1, and this host "
            f"has none (/run/systemd/system is missing; PID 1 is {_pid1_name()}): use "
            "cgroup_manager = \"cgroupfs\"")
    tools = {tool: shutil.which(tool) for tool in ("systemctl", "systemd-run")}
    missing = [tool for tool, path in tools.items() if path is None]
    if missing:
        raise FailedPreconditionError(
            f"the systemd cgroup driver needs {' and '.join(missing)}, not found in PATH")
    return SystemdDriver(conmon_cgroup, systemctl=tools["systemctl"] or "systemctl",
                         systemd_run=tools["systemd-run"] or "systemd-run",
                         cgroup_v2=host.cgroup_v2)


def _pid1_name() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip() or "unknown"
    except OSError:
        return "unknown"

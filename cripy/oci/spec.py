"""OCI runtime spec (config.json for runc 1.1) from CRI container and sandbox configs.

Everything in the CRI request and in the image is untrusted: every path, name and number
is checked here and refused with an InvalidArgumentError naming the field and value.
Where the CRI is silent the behaviour follows containerd / CRI-O (default capabilities,
mounts, devices, masked paths, how image Entrypoint/Cmd merge with command/args).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cripy.oci import apparmor, seccomp
from cripy.oci.cgroups import DEFAULT_CGROUPFS_PARENT, CgroupDriver, CgroupfsDriver
from cripy.oci.features import HandlerFeatures
from cripy.oci.user import ProcessUser, resolve_user
from cripy.oci.userns import PodUserns, container_userns, idmap_mount, spec_entries

log = logging.getLogger(__name__)

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CGROUP_PARENT = DEFAULT_CGROUPFS_PARENT
INFRA_OOM_SCORE_ADJ = -998  # what kubelet has always given the pause container

# Linux capability numbers (include/uapi/linux/capability.h).
CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        ]
    )
}
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# /proc files runc lets a bind mount cover (lxcfs-style); anything else under /proc is
# refused by runc, so refuse it here with a clearer message.
_PROC_MOUNT_ALLOWED = frozenset(
    {
        "/proc/cpuinfo",
        "/proc/diskstats",
        "/proc/meminfo",
        "/proc/stat",
        "/proc/swaps",
        "/proc/uptime",
        "/proc/loadavg",
        "/proc/slabinfo",
        "/proc/net/dev",
    }
)

# Character devices every container gets (runc creates the nodes itself).
_DEFAULT_CHAR_DEVICES: tuple[tuple[int, int | None], ...] = (
    (1, 3),  # /dev/null
    (1, 5),  # /dev/zero
    (1, 7),  # /dev/full
    (1, 8),  # /dev/random
    (1, 9),  # /dev/urandom
    (5, 0),  # /dev/tty
    (5, 1),  # /dev/console
    (5, 2),  # /dev/ptmx
    (136, None),  # /dev/pts/*
)
# Not walked for privileged containers: runc mounts its own, or they are not devices.
_SKIP_DEV_DIRS = frozenset(
    {"/dev/pts", "/dev/shm", "/dev/fd", "/dev/mqueue", "/dev/.lxc", "/dev/.lxd-mounts"}
    | {"/dev/.udev"}
)
_SKIP_DEV_FILES = frozenset({"/dev/console", "/dev/ptmx"})

_IPC_SYSCTLS = ("kernel.shm", "kernel.msg", "fs.mqueue.")
_SYSCTL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,254}")
_CPUSET = re.compile(r"\d{1,5}(-\d{1,5})?(,\d{1,5}(-\d{1,5})?)*")
_PAGE_SIZE = re.compile(r"\d{1,5}[KMGT]B")
_UNIFIED_KEY = re.compile(r"[a-z][a-z0-9_]*\.[a-z0-9_.]+")
_PROPAGATION = {
    pb.PROPAGATION_PRIVATE: "rprivate",
    pb.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    pb.PROPAGATION_BIDIRECTIONAL: "rshared",
}


@dataclass
class SpecContext:
    container_id: str
    sandbox_id: str
    rootfs: Path  # the container's mounted rootfs (/etc/passwd and /etc/group are read here)
    network_ns: str | None  # pinned network ns path; None = host network
    ipc_ns: str | None  # pinned IPC ns path; None = host IPC
    uts_ns: str | None  # pinned UTS ns path; None = host UTS
    pod_pid_ns: str | None = None  # /proc/<infra pid>/ns/pid for NamespaceMode POD
    target_pid_ns: str | None = None  # for NamespaceMode TARGET
    pod_files: dict[str, str] = field(default_factory=dict)  # container path -> host file
    shm_path: str | None = None  # the pod's /dev/shm; None binds the host's (host IPC)
    oom_score_adj_min: int = -1000  # lowest value this daemon can set
    cgroup_v2: bool = False
    cgroups: CgroupDriver = field(default_factory=CgroupfsDriver)  # the cgroup driver
    default_seccomp_profile: str = ""  # a profile file for RuntimeDefault; "": built in
    apparmor: apparmor.AppArmorHost = field(default_factory=apparmor.AppArmorHost)  # probed once
    userns: PodUserns | None = None  # the pod's own user namespace; None: the node's
    handler: str = ""  # the pod's runtime handler, as named in errors
    features: HandlerFeatures = HandlerFeatures()  # what it can do here, probed once


# --- small validators ------------------------------------------------------------------


def clean_container_path(path: str, what: str) -> str:
    """An absolute path without '..' components, with '//' and '.' collapsed."""
    if not path.startswith("/") or "\x00" in path or ".." in path.split("/"):
        raise InvalidArgumentError(f"{what} {path!r} must be an absolute path without '..'")
    return "/" + "/".join(c for c in path.split("/") if c not in ("", "."))


def _non_negative(value: int, what: str) -> int:
    if value < 0:
        raise InvalidArgumentError(f"{what} {value} must not be negative")
    return value


def _depth(path: str) -> int:
    return 0 if path == "/" else path.rstrip("/").count("/")


def order_mounts(mounts: list[dict[str, Any]]) -> None:
    """Parents before children, as the runtime mounts them in order; stable, so equal
    depths keep their order."""
    mounts.sort(key=lambda m: _depth(str(m.get("destination", ""))))


# --- capabilities ----------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def available_capabilities() -> frozenset[str]:
    """Capabilities the kernel knows and this daemon holds in its bounding set.

    "ALL" and privileged mean these: runc cannot grant a capability the daemon (its
    ancestor) lacks, e.g. CAP_SYS_RESOURCE on nodes that run cripy without it.
    """
    last = max(CAPABILITIES.values())
    with contextlib.suppress(OSError, ValueError):
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text().strip())
    mask = (1 << 64) - 1
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapBnd:"):
                mask = int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(n for n, b in CAPABILITIES.items() if b <= last and mask & (1 << b))


def _cap_name(name: str, what: str) -> str:
    n = name.strip().upper()
    if n == "ALL":
        return n
    if not n.startswith("CAP_"):
        n = "CAP_" + n
    if n not in CAPABILITIES:
        raise InvalidArgumentError(f"{what}: unknown capability {name!r}")
    return n


def _sorted_caps(caps: Iterable[str]) -> list[str]:
    return sorted(set(caps), key=CAPABILITIES.__getitem__)


def build_capabilities(caps: pb.Capability, *, privileged: bool, uid: int) -> dict[str, list[str]]:
    """OCI process.capabilities.

    Order (containerd's): the default set; add ALL; drop ALL; single adds; ambient adds
    (into every set); single drops (from every set). So drop ALL + add X gives only X and
    add ALL + drop X gives everything but X.

    Inheritable holds only the ambient caps: the kernel requires an ambient cap to be in
    inheritable and permitted, and anything more there would let file-capability binaries
    pick caps up across execve (CVE-2022-24769); runc accepts any subset.

    A non-root process loses effective and permitted caps at its execve anyway; they are
    cleared up front (as docker and containerd do) so the first exec already runs without
    e.g. CAP_DAC_OVERRIDE. Ambient caps survive the execve, so they stay.
    """
    if privileged:
        bounding = set(available_capabilities())
        ambient: set[str] = set()
    else:
        adds = [_cap_name(c, "add_capabilities") for c in caps.add_capabilities]
        drops = [_cap_name(c, "drop_capabilities") for c in caps.drop_capabilities]
        amb = [_cap_name(c, "add_ambient_capabilities") for c in caps.add_ambient_capabilities]
        if "ALL" in amb:
            raise InvalidArgumentError("add_ambient_capabilities: 'ALL' is not allowed")
        bounding = set(DEFAULT_CAPABILITIES)
        if "ALL" in adds:
            bounding = set(available_capabilities())
        if "ALL" in drops:
            bounding = set()
        bounding.update(c for c in adds if c != "ALL")
        bounding.update(amb)
        ambient = set(amb)
        for c in drops:
            bounding.discard(c)
            ambient.discard(c)
    effective = bounding if uid == 0 else ambient
    return {
        "bounding": _sorted_caps(bounding),
        "effective": _sorted_caps(effective),
        "permitted": _sorted_caps(effective),
        "inheritable": _sorted_caps(ambient),
        "ambient": _sorted_caps(ambient),
    }


# --- process -------------------------------------------------------------------------


def _image_section(image_config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(image_config, Mapping):
        raise InvalidArgumentError("image config must be a JSON object")
    section = image_config.get("config") or {}
    if not isinstance(section, dict):
        raise InvalidArgumentError("image config 'config' must be a JSON object")
    return section


def _image_str_list(section: Mapping[str, Any], key: str) -> list[str]:
    value = section.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgumentError(f"image config {key} must be a list of strings")
    return value


def _image_str(section: Mapping[str, Any], key: str) -> str:
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"image config {key} must be a string")
    return value


def process_args(config: pb.ContainerConfig, section: Mapping[str, Any]) -> list[str]:
    """kubelet semantics: command replaces Entrypoint; args replace Cmd, and a command
    without args drops Cmd (Cmd belongs to the Entrypoint it replaced)."""
    entrypoint = _image_str_list(section, "Entrypoint")
    cmd = _image_str_list(section, "Cmd")
    command = list(config.command) or entrypoint
    if config.args:
        args = list(config.args)
    elif config.command:
        args = []
    else:
        args = cmd
    result = command + args
    if not result:
        raise InvalidArgumentError("no command specified")
    for a in result:
        if "\x00" in a:
            raise InvalidArgumentError(f"command/args entry {a!r:.80} contains a NUL byte")
    return result


def _env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


def process_env(
    config: pb.ContainerConfig, section: Mapping[str, Any], hostname: str | None
) -> list[str]:
    """HOSTNAME, then the image's Env, then config.envs, later keys overriding earlier."""
    env: dict[str, str] = {}
    if hostname:
        env["HOSTNAME"] = hostname
    for entry in _image_str_list(section, "Env"):
        key, sep, value = entry.partition("=")
        # A malformed image entry cannot be passed on; skip it rather than fail the pod.
        if not sep or not key or "\x00" in entry:
            log.warning("ignoring malformed image Env entry %r", entry[:80])
            continue
        env[key] = value
    for kv in config.envs:
        if not kv.key or "=" in kv.key or "\x00" in kv.key:
            raise InvalidArgumentError(f"env key {kv.key!r:.80} is not a valid name")
        if "\x00" in kv.value:
            raise InvalidArgumentError(f"env {kv.key!r:.80} value contains a NUL byte")
        env[kv.key] = kv.value
    env.setdefault("PATH", DEFAULT_PATH)
    return [f"{k}={v}" for k, v in env.items()]


def process_cwd(config: pb.ContainerConfig, section: Mapping[str, Any]) -> str:
    if config.working_dir:
        wd = config.working_dir
        if not wd.startswith("/") or "\x00" in wd:
            raise InvalidArgumentError(f"working_dir {wd!r} must be an absolute path")
        return wd
    wd = _image_str(section, "WorkingDir")
    if not wd or "\x00" in wd:
        return "/"
    # Relative image WorkingDirs exist in the wild; they mean relative to "/".
    return wd if wd.startswith("/") else "/" + wd


def _oom_score_adj(value: int, ctx: SpecContext) -> int:
    if not -1000 <= value <= 1000:
        raise InvalidArgumentError(f"oom_score_adj {value} is out of range -1000..1000")
    if value < ctx.oom_score_adj_min:
        log.warning(
            "container %s: oom_score_adj %d raised to %d, the lowest this daemon may set",
            ctx.container_id,
            value,
            ctx.oom_score_adj_min,
        )
        return ctx.oom_score_adj_min
    return value


def _hostname(ctx: SpecContext, sandbox: pb.PodSandboxConfig) -> str:
    """The pod's hostname for $HOSTNAME: the pod's /etc/hostname file when we wrote one."""
    host_file = ctx.pod_files.get("/etc/hostname")
    if host_file:
        try:
            with open(host_file, "rb") as f:
                name = f.read(256).decode("utf-8", "replace").strip()
            if name and "\x00" not in name:
                return name
        except OSError:
            pass
    if ctx.uts_ns is None:
        return os.uname().nodename
    return sandbox.hostname or sandbox.metadata.name


# --- mounts --------------------------------------------------------------------------


def _mount(dest: str, typ: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": dest, "type": typ, "source": source, "options": options}


def _default_mounts(ctx: SpecContext, *, privileged: bool, readonly: bool) -> list[dict[str, Any]]:
    sys_mode = "rw" if privileged else "ro"
    mounts = [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", sys_mode]),
        _mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            ["nosuid", "noexec", "nodev", "relatime", sys_mode],
        ),
        _mount(
            "/dev/shm",
            "bind",
            ctx.shm_path or "/dev/shm",
            ["rbind", "rprivate", "nosuid", "noexec", "nodev"],
        ),
    ]
    for dest, source in sorted(ctx.pod_files.items()):
        dest = clean_container_path(dest, "pod file")
        opts = ["rbind", "rprivate", "nosuid", "nodev", "noexec"]
        opts.append("ro" if readonly else "rw")
        mounts.append(_mount(dest, "bind", source, opts))
    return mounts


def _unescape_mountinfo(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _source_mount(path: str) -> tuple[str, set[str]] | None:
    """(mount point, propagation tags) of the host mount holding `path`; None if unknown.

    The tags are the mountinfo optional fields without their peer numbers: "shared",
    "master", "propagate_from", "unbindable".
    """
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read(16 << 20).splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[str, set[str]] | None = None
    for line in lines:
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        point = _unescape_mountinfo(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        # Later lines are mounted on top of earlier ones at the same point.
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, {t.split(":")[0] for t in fields[6:sep]})
    return best


def _check_propagation(host_path: str, propagation: int) -> None:
    if propagation == pb.PROPAGATION_PRIVATE:
        return
    found = _source_mount(host_path)
    if found is None:
        log.warning("cannot tell the propagation of the mount holding %s", host_path)
        return
    point, tags = found
    if propagation == pb.PROPAGATION_BIDIRECTIONAL and "shared" not in tags:
        raise FailedPreconditionError(
            f"mount host_path {host_path!r} is on mount {point!r}, which is not shared: "
            "bidirectional propagation needs a shared mount"
        )
    if propagation == pb.PROPAGATION_HOST_TO_CONTAINER and not tags & {"shared", "master"}:
        raise FailedPreconditionError(
            f"mount host_path {host_path!r} is on mount {point!r}, which is neither shared nor "
            "slave: host-to-container propagation needs one of them"
        )


def _cri_mount(m: pb.Mount, ctx: SpecContext) -> dict[str, Any]:
    if m.image.image or m.image.image_ref:
        raise InvalidArgumentError(
            f"mount {m.container_path!r}: image volumes are mounted before the spec is built")
    dest = clean_container_path(m.container_path, "mount container_path")
    if dest == "/":
        raise InvalidArgumentError("mount container_path '/' would replace the rootfs")
    if (dest == "/proc" or dest.startswith("/proc/")) and dest not in _PROC_MOUNT_ALLOWED:
        raise InvalidArgumentError(f"mount container_path {dest!r}: /proc cannot be covered")
    src = m.host_path
    if not src.startswith("/") or "\x00" in src:
        raise InvalidArgumentError(f"mount host_path {src!r} must be an absolute path")
    try:
        os.stat(src)
    except FileNotFoundError:
        raise NotFoundError(f"mount host_path {src!r} does not exist") from None
    except OSError as e:
        raise InvalidArgumentError(f"mount host_path {src!r}: {e.strerror}") from None
    if m.uidMappings or m.gidMappings:
        raise InvalidArgumentError(
            f"mount {dest!r}: per-mount uidMappings/gidMappings are not supported (in a pod "
            "with a user namespace every mount is idmapped with the pod's mappings)")
    if m.propagation not in _PROPAGATION:
        raise InvalidArgumentError(f"mount {dest!r}: unknown propagation {m.propagation}")
    _check_propagation(src, m.propagation)
    options = ["rbind", _PROPAGATION[m.propagation], "ro" if m.readonly else "rw"]
    if m.recursive_read_only:
        if not m.readonly or m.propagation != pb.PROPAGATION_PRIVATE:
            raise InvalidArgumentError(
                f"mount {dest!r}: recursive_read_only needs readonly and private propagation"
            )
        rro = ctx.features.recursive_read_only
        if not rro.supported:
            raise FailedPreconditionError(
                f"mount {dest!r}: runtime handler {ctx.handler!r} cannot make recursive "
                f"read-only mounts here: {rro.reason}")
        options.append("rro")
    mount = _mount(dest, "bind", src, options)
    return idmap_mount(mount, ctx.userns) if ctx.userns else mount


def build_mounts(
    config: pb.ContainerConfig, ctx: SpecContext, *, privileged: bool, readonly: bool
) -> tuple[list[dict[str, Any]], str | None]:
    """All mounts, parents before children, and the rootfsPropagation they need."""
    cri = [_cri_mount(m, ctx) for m in config.mounts]
    dests = [m["destination"] for m in cri]
    seen: set[str] = set()
    for d in dests:
        if d in seen:
            raise InvalidArgumentError(f"mount container_path {d!r} is given twice")
        seen.add(d)
    # A CRI mount replaces the default one at the same place; one over /dev replaces
    # everything the runtime would put under /dev.
    defaults = [
        m
        for m in _default_mounts(ctx, privileged=privileged, readonly=readonly)
        if m["destination"] not in seen
        and not ("/dev" in seen and m["destination"].startswith("/dev/"))
    ]
    mounts = sorted(defaults + cri, key=lambda m: _depth(m["destination"]))
    propagation: str | None = None
    opts = {o for m in cri for o in m["options"]}
    if "rshared" in opts:
        propagation = "rshared"  # a shared bind needs a shared parent
    elif "rslave" in opts:
        propagation = "rslave"
    return mounts, propagation


# --- devices -------------------------------------------------------------------------


def _device_entry(path: str, st: os.stat_result) -> dict[str, Any]:
    return {
        "path": path,
        "type": "c" if stat.S_ISCHR(st.st_mode) else "b",
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "fileMode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def host_devices(root: str = "/dev") -> list[dict[str, Any]]:
    """Every char/block device under /dev (privileged containers); unreadable ones skipped."""
    out: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) not in _SKIP_DEV_DIRS)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if path in _SKIP_DEV_FILES:
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and st.st_rdev:
                out.append(_device_entry(path, st))
    return out


def _default_device_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        {"allow": False, "access": "rwm"},
        # mknod of any node is harmless when it cannot then be opened.
        {"allow": True, "type": "c", "access": "m"},
        {"allow": True, "type": "b", "access": "m"},
    ]
    for major, minor in _DEFAULT_CHAR_DEVICES:
        rule: dict[str, Any] = {"allow": True, "type": "c", "major": major, "access": "rwm"}
        if minor is not None:
            rule["minor"] = minor
        rules.append(rule)
    return rules


def build_devices(
    config: pb.ContainerConfig, *, privileged: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(linux.devices, linux.resources.devices)."""
    devices: dict[str, dict[str, Any]] = {}
    if privileged:
        devices = {d["path"]: d for d in host_devices()}
        rules: list[dict[str, Any]] = [{"allow": True, "access": "rwm"}]
    else:
        rules = _default_device_rules()
    for d in config.devices:
        dest = clean_container_path(d.container_path, "device container_path")
        if not d.host_path.startswith("/") or "\x00" in d.host_path:
            raise InvalidArgumentError(f"device host_path {d.host_path!r} must be absolute")
        perms = d.permissions or "rwm"
        if any(c not in "rwm" for c in perms) or len(set(perms)) != len(perms):
            raise InvalidArgumentError(
                f"device {d.host_path!r}: permissions {d.permissions!r} must be a subset of 'rwm'"
            )
        try:
            st = os.stat(d.host_path)
        except FileNotFoundError:
            raise NotFoundError(f"device host_path {d.host_path!r} does not exist") from None
        except OSError as e:
            raise InvalidArgumentError(f"device host_path {d.host_path!r}: {e.strerror}") from None
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise InvalidArgumentError(f"device host_path {d.host_path!r} is not a device")
        entry = _device_entry(dest, st)
        devices[dest] = entry
        if not privileged:
            rules.append(
                {
                    "allow": True,
                    "type": entry["type"],
                    "major": entry["major"],
                    "minor": entry["minor"],
                    "access": perms,
                }
            )
    return list(devices.values()), rules


# --- resources -----------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _swap_accounting(cgroup_v2: bool) -> bool:
    """Whether memory+swap limits can be written (v1 needs swap accounting enabled)."""
    if not cgroup_v2:
        return os.path.exists("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes")
    # On v2 the swap files exist in every non-root cgroup when swap accounting is on.
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
        rel = next(line[3:] for line in own if line.startswith("0::"))
    except (OSError, StopIteration):
        return True
    if rel in ("", "/"):
        return True
    return os.path.exists(f"/sys/fs/cgroup{rel}/memory.swap.max")


def host_cgroup_v2() -> bool:
    return os.path.exists("/sys/fs/cgroup/cgroup.controllers")


def resources_to_oci(
    res: pb.LinuxContainerResources, cgroup_v2: bool | None = None
) -> dict[str, Any]:
    """OCI linux.resources (without devices) from CRI resources; also the body of
    `runc update --resources` for UpdateContainerResources. Zero/empty means unset."""
    if cgroup_v2 is None:
        cgroup_v2 = host_cgroup_v2()
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if _non_negative(res.cpu_shares, "cpu_shares"):
        cpu["shares"] = res.cpu_shares
    if _non_negative(res.cpu_quota, "cpu_quota"):
        cpu["quota"] = res.cpu_quota
    if _non_negative(res.cpu_period, "cpu_period"):
        cpu["period"] = res.cpu_period
    for name, value, key in (
        ("cpuset_cpus", res.cpuset_cpus, "cpus"),
        ("cpuset_mems", res.cpuset_mems, "mems"),
    ):
        if value:
            if not _CPUSET.fullmatch(value):
                raise InvalidArgumentError(f"{name} {value!r:.80} is not a CPU/node list")
            cpu[key] = value
    if cpu:
        out["cpu"] = cpu
    memory: dict[str, Any] = {}
    limit = _non_negative(res.memory_limit_in_bytes, "memory_limit_in_bytes")
    swap = _non_negative(res.memory_swap_limit_in_bytes, "memory_swap_limit_in_bytes")
    if limit:
        memory["limit"] = limit
    if swap and limit and swap < limit:
        raise InvalidArgumentError(
            f"memory_swap_limit_in_bytes {swap} is below memory_limit_in_bytes {limit}"
        )
    # OCI "swap" is memory+swap: equal to the limit means no swap, which kubelets expect.
    want_swap = swap or limit
    if want_swap:
        if _swap_accounting(cgroup_v2):
            memory["swap"] = want_swap
        elif swap:
            log.warning("swap accounting is off on this node; memory_swap_limit ignored")
    if memory:
        out["memory"] = memory
    hugepages = []
    for hp in res.hugepage_limits:
        if not _PAGE_SIZE.fullmatch(hp.page_size):
            raise InvalidArgumentError(f"hugepage page_size {hp.page_size!r:.40} is not like '2MB'")
        hugepages.append({"pageSize": hp.page_size, "limit": hp.limit})
    if hugepages:
        out["hugepageLimits"] = hugepages
    if res.unified:
        if not cgroup_v2:
            raise InvalidArgumentError("unified resources need cgroup v2; this node uses v1")
        unified = {}
        for key, value in sorted(res.unified.items()):
            if not _UNIFIED_KEY.fullmatch(key) or ".." in key:
                raise InvalidArgumentError(f"unified key {key!r:.80} is not a cgroup file name")
            if "\x00" in value or "\n" in value:
                raise InvalidArgumentError(f"unified {key!r} value contains a NUL or newline")
            unified[key] = value
        out["unified"] = unified
    return out


# --- sysctls, namespaces, cgroups ----------------------------------------------------


def build_sysctls(
    sysctls: Mapping[str, str], *, host_network: bool, host_ipc: bool
) -> dict[str, str]:
    """Only namespaced sysctls, and only those whose namespace the pod owns."""
    out: dict[str, str] = {}
    for key, value in sorted(sysctls.items()):
        if not _SYSCTL_NAME.fullmatch(key) or ".." in key or "//" in key:
            raise InvalidArgumentError(f"sysctl {key!r:.80} is not a valid name")
        if "\x00" in value or "\n" in value:
            raise InvalidArgumentError(f"sysctl {key!r} value contains a NUL or newline")
        # Both "net.ipv4.ip_forward" and "net/ipv4/ip_forward" spellings are in use.
        dotted = key.replace("/", ".")
        if dotted.startswith("net."):
            if host_network:
                raise InvalidArgumentError(f"sysctl {key!r} is not allowed with host network")
        elif dotted == "kernel.sem" or dotted.startswith(_IPC_SYSCTLS):
            if host_ipc:
                raise InvalidArgumentError(f"sysctl {key!r} is not allowed with host IPC")
        else:
            raise InvalidArgumentError(f"sysctl {key!r} is not namespaced; it cannot be set")
        out[key] = value
    return out


def cgroups_path(sandbox: pb.PodSandboxConfig, container_id: str,
                 driver: CgroupDriver | None = None) -> str:
    """linux.cgroupsPath: "<cgroup_parent or /cripy>/cripy-<id>" with the cgroupfs
    driver, "<slice>:cripy:<id>" (unit cripy-<id>.scope) with the systemd one."""
    return (driver or CgroupfsDriver()).cgroups_path(sandbox.linux.cgroup_parent, container_id)


def _namespaces(
    config: pb.ContainerConfig, ctx: SpecContext, *, privileged: bool
) -> list[dict[str, str]]:
    nso = config.linux.security_context.namespace_options
    container_userns(nso, ctx.userns)
    namespaces = [{"type": "mount"}]
    for typ, path in (("user", ctx.userns and ctx.userns.path), ("network", ctx.network_ns),
                      ("ipc", ctx.ipc_ns), ("uts", ctx.uts_ns)):
        if path:
            namespaces.append({"type": typ, "path": path})
    mode = nso.pid
    if mode == pb.CONTAINER:
        namespaces.append({"type": "pid"})
    elif mode == pb.POD:
        if not ctx.pod_pid_ns:
            raise FailedPreconditionError(
                f"sandbox {ctx.sandbox_id} has no PID namespace to share (pid mode POD)"
            )
        namespaces.append({"type": "pid", "path": ctx.pod_pid_ns})
    elif mode == pb.TARGET:
        if not ctx.target_pid_ns:
            raise FailedPreconditionError(
                f"target container {nso.target_id!r:.80} has no PID namespace (pid mode TARGET)"
            )
        namespaces.append({"type": "pid", "path": ctx.target_pid_ns})
    elif mode != pb.NODE:
        raise InvalidArgumentError(f"unknown pid namespace mode {mode}")
    if ctx.cgroup_v2 and not privileged:
        namespaces.append({"type": "cgroup"})
    return namespaces


def _paths(values: Sequence[str], defaults: Sequence[str], what: str) -> list[str]:
    if not values:
        return list(defaults)
    return [clean_container_path(p, what) for p in values]


# --- seccomp -------------------------------------------------------------------------


def build_seccomp(
    sc: pb.LinuxContainerSecurityContext, bounding: Sequence[str], default_path: str = ""
) -> dict[str, Any] | None:
    """The OCI seccomp section, or None for unconfined.

    Unset means Unconfined, as the CRI says (kubelet sends RuntimeDefault when wanted).
    RuntimeDefault is the profile at `default_path` when the node configures one.
    """

    def runtime_default() -> dict[str, Any]:
        if default_path:
            return seccomp.load_localhost_profile(default_path)
        return seccomp.default_profile()

    profile: dict[str, Any]
    if sc.HasField("seccomp"):
        kind = sc.seccomp.profile_type
        if kind == pb.SecurityProfile.Unconfined:
            return None
        if kind == pb.SecurityProfile.RuntimeDefault:
            profile = runtime_default()
        elif kind == pb.SecurityProfile.Localhost:
            profile = seccomp.load_localhost_profile(sc.seccomp.localhost_ref)
        else:
            raise InvalidArgumentError(f"unknown seccomp profile_type {kind}")
    elif sc.seccomp_profile_path:
        legacy = sc.seccomp_profile_path
        if legacy == "unconfined":
            return None
        if legacy in ("runtime/default", "docker/default"):
            profile = runtime_default()
        elif legacy.startswith("localhost/"):
            profile = seccomp.load_localhost_profile(legacy.removeprefix("localhost/"))
        else:
            raise InvalidArgumentError(f"seccomp_profile_path {legacy!r:.200} is not supported")
    else:
        return None
    return seccomp.to_oci(profile, bounding)


# --- the specs -----------------------------------------------------------------------


def _user(config: pb.ContainerConfig, section: Mapping[str, Any], rootfs: Path) -> ProcessUser:
    sc = config.linux.security_context
    return resolve_user(
        rootfs,
        run_as_user=sc.run_as_user.value if sc.HasField("run_as_user") else None,
        run_as_username=sc.run_as_username,
        run_as_group=sc.run_as_group.value if sc.HasField("run_as_group") else None,
        supplemental_groups=list(sc.supplemental_groups),
        strict_groups=sc.supplemental_groups_policy == pb.Strict,
        image_user=_image_str(section, "User"),
    )


def build_container_spec(
    config: pb.ContainerConfig,
    sandbox: pb.PodSandboxConfig,
    image_config: dict[str, Any],
    ctx: SpecContext,
) -> dict[str, Any]:
    section = _image_section(image_config)
    sc = config.linux.security_context
    privileged = sc.privileged
    if privileged and not sandbox.linux.security_context.privileged:
        raise InvalidArgumentError(
            f"container {config.metadata.name!r} is privileged but its sandbox is not"
        )
    readonly = sc.readonly_rootfs
    user = _user(config, section, ctx.rootfs)
    caps = build_capabilities(sc.capabilities, privileged=privileged, uid=user.uid)

    process: dict[str, Any] = {
        "terminal": config.tty,
        "user": user.to_oci(),
        "args": process_args(config, section),
        "env": process_env(config, section, _hostname(ctx, sandbox)),
        "cwd": process_cwd(config, section),
        "capabilities": caps,
        "noNewPrivileges": sc.no_new_privs,
    }
    if config.linux.HasField("resources"):
        process["oomScoreAdj"] = _oom_score_adj(config.linux.resources.oom_score_adj, ctx)
    apparmor_profile = apparmor.container_profile(sc, privileged=privileged, host=ctx.apparmor)
    if apparmor_profile is not None:
        process["apparmorProfile"] = apparmor_profile

    mounts, root_propagation = build_mounts(config, ctx, privileged=privileged, readonly=readonly)
    devices, device_rules = build_devices(config, privileged=privileged)
    resources = resources_to_oci(config.linux.resources, ctx.cgroup_v2)
    resources["devices"] = device_rules

    linux: dict[str, Any] = {
        "cgroupsPath": cgroups_path(sandbox, ctx.container_id, ctx.cgroups),
        "namespaces": _namespaces(config, ctx, privileged=privileged),
        "resources": resources,
        "devices": devices,
    }
    if ctx.userns:
        linux.update(spec_entries(ctx.userns))
    sysctls = build_sysctls(
        sandbox.linux.sysctls, host_network=ctx.network_ns is None, host_ipc=ctx.ipc_ns is None
    )
    if sysctls:
        linux["sysctl"] = sysctls
    if root_propagation:
        linux["rootfsPropagation"] = root_propagation
    if not privileged:
        linux["maskedPaths"] = _paths(sc.masked_paths, DEFAULT_MASKED_PATHS, "masked path")
        linux["readonlyPaths"] = _paths(sc.readonly_paths, DEFAULT_READONLY_PATHS, "readonly path")
        profile = build_seccomp(sc, caps["bounding"], ctx.default_seccomp_profile)
        if profile is not None:
            linux["seccomp"] = profile

    annotations = dict(config.annotations)
    annotations.update(
        {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": config.metadata.name,
            "io.kubernetes.cri.sandbox-id": ctx.sandbox_id,
            "io.kubernetes.cri.sandbox-name": sandbox.metadata.name,
            "io.kubernetes.cri.sandbox-namespace": sandbox.metadata.namespace,
            "io.kubernetes.cri.sandbox-uid": sandbox.metadata.uid,
            "io.kubernetes.cri.image-name": config.image.image,
        }
    )
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": str(ctx.rootfs), "readonly": readonly},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    }


def build_infra_spec(
    sandbox: pb.PodSandboxConfig, ctx: SpecContext, infra_rootfs: Path
) -> dict[str, Any]:
    """The pod's infra container: catatonit holding the PID namespace, nothing else.

    No capabilities, read-only root, no_new_privs, the default seccomp profile whatever
    the pod asks for (catatonit's needs are fixed), the pod's run_as_user/group if given.
    """
    psc = sandbox.linux.security_context
    user = resolve_user(
        infra_rootfs,
        run_as_user=psc.run_as_user.value if psc.HasField("run_as_user") else None,
        run_as_group=psc.run_as_group.value if psc.HasField("run_as_group") else None,
        supplemental_groups=list(psc.supplemental_groups),
        strict_groups=True,
    )
    no_caps: dict[str, list[str]] = {
        k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")
    }
    namespaces: list[dict[str, str]] = [{"type": "mount"}]
    for typ, path in (("user", ctx.userns and ctx.userns.path), ("network", ctx.network_ns),
                      ("ipc", ctx.ipc_ns), ("uts", ctx.uts_ns)):
        if path:
            namespaces.append({"type": typ, "path": path})
    # A host-PID pod keeps its infra in the host PID namespace too.
    if psc.namespace_options.pid != pb.NODE:
        namespaces.append({"type": "pid"})
    if ctx.cgroup_v2:
        namespaces.append({"type": "cgroup"})
    mounts = [
        m
        for m in _default_mounts(ctx, privileged=False, readonly=True)
        if m["destination"] in ("/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/dev/shm")
    ]
    linux: dict[str, Any] = {
        "cgroupsPath": cgroups_path(sandbox, ctx.container_id, ctx.cgroups),
        "namespaces": namespaces,
        "resources": {"devices": _default_device_rules()},
        "maskedPaths": list(DEFAULT_MASKED_PATHS),
        "readonlyPaths": list(DEFAULT_READONLY_PATHS),
        "seccomp": seccomp.to_oci(seccomp.default_profile(), []),
    }
    if ctx.userns:
        linux.update(spec_entries(ctx.userns))
    sysctls = build_sysctls(
        sandbox.linux.sysctls, host_network=ctx.network_ns is None, host_ipc=ctx.ipc_ns is None
    )
    if sysctls:
        linux["sysctl"] = sysctls
    annotations = dict(sandbox.annotations)
    annotations.update(
        {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": ctx.sandbox_id,
            "io.kubernetes.cri.sandbox-name": sandbox.metadata.name,
            "io.kubernetes.cri.sandbox-namespace": sandbox.metadata.namespace,
            "io.kubernetes.cri.sandbox-uid": sandbox.metadata.uid,
        }
    )
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": user.to_oci(),
            "args": ["/catatonit", "-P"],
            "env": [f"PATH={DEFAULT_PATH}"],
            "cwd": "/",
            "capabilities": no_caps,
            "noNewPrivileges": True,
            "oomScoreAdj": max(INFRA_OOM_SCORE_ADJ, ctx.oom_score_adj_min),
        },
        "root": {"path": str(infra_rootfs), "readonly": True},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    }


def validate_log_path(log_directory: str, log_path: str) -> Path:
    """The container's log file: log_directory / log_path, which may not leave the directory."""
    if not log_directory.startswith("/") or "\x00" in log_directory:
        raise InvalidArgumentError(f"log_directory {log_directory!r} must be an absolute path")
    if ".." in log_directory.split("/"):
        raise InvalidArgumentError(f"log_directory {log_directory!r} must not contain '..'")
    if not log_path or log_path.startswith("/") or "\x00" in log_path:
        raise InvalidArgumentError(
            f"log_path {log_path!r} must be a relative path inside log_directory"
        )
    parts = [c for c in log_path.split("/") if c not in ("", ".")]
    if ".." in log_path.split("/") or not parts or log_path.endswith("/"):
        raise InvalidArgumentError(
            f"log_path {log_path!r} must name a file inside log_directory, without '..'"
        )
    return Path(log_directory).joinpath(*parts)

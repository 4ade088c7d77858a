"""The cgroup counters only the kubelet's cadvisor-style metrics need (ListPodSandboxMetrics):
CFS throttling, block I/O per device, the memory extras, the pids limit, and open file
descriptors and sockets of the cgroup's processes. Read as cadvisor (through runc's
libcontainer) reads them, on cgroup v1 and v2.

What is read where (v1 | v2):

- CFS periods, throttled periods and time: cpu.stat nr_periods, nr_throttled,
  throttled_time (ns) | cpu.stat nr_periods, nr_throttled, throttled_usec
- block I/O per device: blkio.io_service_bytes_recursive and io_serviced_recursive, else
  the blkio.bfq.* or blkio.throttle.* ones, the first that lists devices (runc's order) |
  io.stat rbytes, wbytes, dbytes, rios, wios, dios
- memory failcnt: memory.failcnt | memory.events "max"
- kernel memory: memory.kmem.usage_in_bytes | memory.stat "kernel" (before 5.18 the sum of
  its parts)
- mapped files: memory.stat total_mapped_file | memory.stat file_mapped
- max usage: memory.max_usage_in_bytes | memory.peak (kernel 5.19+; else 0)
- swap limit: memory.memsw.limit_in_bytes | memory.swap.max
- threads max: pids.max | pids.max
- file descriptors and sockets: /proc/PID/fd of every process in cgroup.procs | the same
- CFS bursts: cpu.stat nr_bursts, burst_time (ns) | cpu.stat nr_bursts, burst_usec
- active / inactive file pages: memory.stat total_active_file, total_inactive_file |
  memory.stat active_file, inactive_file
- memory reservation: memory.soft_limit_in_bytes | memory.min
- open files limit: "Max open files" (soft) in /proc/PID/limits of the lowest PID | the same

Everything here blocks; it runs in the stats threads.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cripy.runtime.stats import CGROUP_ROOT, _flat_keyed, _read, _single

_V1_CPU = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
#: v1 blkio files in runc's order: CFQ, then BFQ, then the throttle layer's own counters
_V1_BLKIO = ("blkio.io_service_bytes_recursive", "blkio.bfq.io_service_bytes_recursive",
             "blkio.throttle.io_service_bytes_recursive")
#: io.stat keys -> (kind, operation) as libcontainer names them
_IO_STAT_KEYS = {"rbytes": ("bytes", "Read"), "wbytes": ("bytes", "Write"),
                 "dbytes": ("bytes", "Discard"), "rios": ("ios", "Read"),
                 "wios": ("ios", "Write"), "dios": ("ios", "Discard")}
#: memory.stat parts of kernel memory on v2 kernels without the "kernel" key
_V2_KERNEL_PARTS = ("kernel_stack", "pagetables", "sec_pagetables", "percpu", "sock",
                    "vmalloc", "slab")


@dataclass(frozen=True)
class DeviceIo:
    """Block I/O of a cgroup on one device: bytes and operations by operation name
    ("Read", "Write", and on v1 "Sync", "Async", "Discard", "Total")."""

    major: int
    minor: int
    device: str  # "/dev/<name>", or "" when the kernel does not know the device
    bytes: dict[str, int] = field(default_factory=dict)
    ios: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtraStats:
    cfs_periods: int = 0
    cfs_throttled_periods: int = 0
    cfs_throttled_ns: int = 0
    memory_failcnt: int = 0
    memory_kernel: int = 0
    memory_mapped_file: int = 0
    memory_max_usage: int = 0
    swap_limit: int = 0  # 0: unlimited or not accounted (as the memory limit metric)
    threads_max: int = 0  # 0: unlimited ("infinity if value is zero", as cadvisor says)
    file_descriptors: int = 0
    sockets: int = 0
    io: tuple[DeviceIo, ...] = ()
    cfs_bursts: int = 0
    cfs_burst_ns: int = 0
    memory_active_file: int = 0
    memory_inactive_file: int = 0
    memory_reservation: int = 0  # 0: none
    max_open_files: int | None = None  # soft RLIMIT_NOFILE of the first process; None: unknown


# --- parsing (pure) -----------------------------------------------------------------------


def _device(text: str) -> tuple[int, int] | None:
    major, sep, minor = text.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        return None
    return int(major), int(minor)


def parse_blkio_v1(text: str) -> dict[tuple[int, int], dict[str, int]]:
    """blkio.*io_service_bytes / io_serviced: "8:0 Read 4096" lines and a last
    "Total N" line (skipped) -> {(major, minor): {operation: value}}."""
    out: dict[tuple[int, int], dict[str, int]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3 or not fields[2].isdigit():
            continue
        device = _device(fields[0])
        if device is not None:
            out.setdefault(device, {})[fields[1]] = int(fields[2])
    return out


def parse_io_stat(text: str) -> dict[tuple[int, int], tuple[dict[str, int], dict[str, int]]]:
    """io.stat: "8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0" lines ->
    {(major, minor): ({operation: bytes}, {operation: ios})}."""
    out: dict[tuple[int, int], tuple[dict[str, int], dict[str, int]]] = {}
    for line in text.splitlines():
        fields = line.split()
        device = _device(fields[0]) if fields else None
        if device is None:
            continue
        sizes: dict[str, int] = {}
        counts: dict[str, int] = {}
        for item in fields[1:]:
            key, _, value = item.partition("=")
            if key in _IO_STAT_KEYS and value.isdigit():
                kind, operation = _IO_STAT_KEYS[key]
                (sizes if kind == "bytes" else counts)[operation] = int(value)
        out[device] = (sizes, counts)
    return out


def count_fds(fd_targets: list[str]) -> tuple[int, int]:
    """(descriptors, sockets) of readlink()s of /proc/PID/fd entries."""
    return len(fd_targets), sum(1 for t in fd_targets if t.startswith("socket:"))


# --- device names -------------------------------------------------------------------------

_names: dict[tuple[int, int], str] = {}
_names_lock = threading.Lock()


def device_name(major: int, minor: int, sys_dev: Path = Path("/sys/dev/block")) -> str:
    """"/dev/<name>" of a block device from its uevent (as cadvisor names devices), or ""."""
    key = (major, minor)
    with _names_lock:
        if key in _names:
            return _names[key]
    name = ""
    text = _read(sys_dev / f"{major}:{minor}" / "uevent") or ""
    for line in text.splitlines():
        if line.startswith("DEVNAME="):
            name = "/dev/" + line.removeprefix("DEVNAME=")
    with _names_lock:
        _names[key] = name
    return name


# --- reading ------------------------------------------------------------------------------


def _procs(directory: Path) -> list[int]:
    return [int(line) for line in (_read(directory / "cgroup.procs") or "").split()
            if line.isdigit()]


def open_files(pids: list[int], proc: Path = Path("/proc")) -> tuple[int, int]:
    """(file descriptors, sockets) the processes hold; processes that end meanwhile, or
    that cannot be read, count for nothing."""
    targets: list[str] = []
    for pid in pids:
        fd_dir = proc / str(pid) / "fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                targets.append(os.readlink(fd_dir / name))
            except OSError:
                continue
    return count_fds(targets)


def parse_max_open_files(limits: str) -> int | None:
    """The soft "Max open files" of a /proc/PID/limits text; None if absent or unlimited."""
    for line in limits.splitlines():
        if line.startswith("Max open files"):
            soft = line.removeprefix("Max open files").split()[0]
            return int(soft) if soft.isdigit() else None
    return None


def max_open_files(pids: list[int], proc: Path = Path("/proc")) -> int | None:
    """The soft open-files limit of the cgroup's first process (as cadvisor's ulimits)."""
    for pid in sorted(pids):
        text = _read(proc / str(pid) / "limits")
        if text is not None:
            return parse_max_open_files(text)
    return None


def _devices(table: dict[tuple[int, int], tuple[dict[str, int], dict[str, int]]]
             ) -> tuple[DeviceIo, ...]:
    return tuple(DeviceIo(major, minor, device_name(major, minor), sizes, counts)
                 for (major, minor), (sizes, counts) in sorted(table.items()))


def read_extra_stats(cgroups_path: str, root: Path = CGROUP_ROOT,
                     proc: Path = Path("/proc")) -> ExtraStats | None:
    """The extra counters of `cgroups_path` ("/a/b" below the cgroup root), or None when
    the cgroup is gone."""
    parts = [p for p in cgroups_path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        return None
    relative = Path(*parts)
    if (root / "cgroup.controllers").exists():
        return _read_v2(root / relative, proc)
    return _read_v1(root, relative, proc)


def _read_v2(directory: Path, proc: Path) -> ExtraStats | None:
    if not directory.is_dir():
        return None
    cpu = _flat_keyed(directory / "cpu.stat")
    memory = _flat_keyed(directory / "memory.stat")
    kernel = memory.get("kernel")
    if kernel is None:
        kernel = sum(memory.get(k, 0) for k in _V2_KERNEL_PARTS)
    procs = _procs(directory)
    fds, sockets = open_files(procs, proc)
    return ExtraStats(
        cfs_periods=cpu.get("nr_periods", 0),
        cfs_throttled_periods=cpu.get("nr_throttled", 0),
        cfs_throttled_ns=cpu.get("throttled_usec", 0) * 1000,
        memory_failcnt=_flat_keyed(directory / "memory.events").get("max", 0),
        memory_kernel=kernel,
        memory_mapped_file=memory.get("file_mapped", 0),
        memory_max_usage=(_single(directory / "memory.peak") or 0),
        swap_limit=_single(directory / "memory.swap.max") or 0,
        threads_max=_single(directory / "pids.max") or 0,
        file_descriptors=fds,
        sockets=sockets,
        io=_devices(parse_io_stat(_read(directory / "io.stat") or "")),
        cfs_bursts=cpu.get("nr_bursts", 0),
        cfs_burst_ns=cpu.get("burst_usec", 0) * 1000,
        memory_active_file=memory.get("active_file", 0),
        memory_inactive_file=memory.get("inactive_file", 0),
        memory_reservation=_single(directory / "memory.min") or 0,
        max_open_files=max_open_files(procs, proc),
    )


def _read_v1(root: Path, relative: Path, proc: Path) -> ExtraStats | None:
    cpu_dir = next((root / c / relative for c in _V1_CPU if (root / c / relative).is_dir()),
                   None)
    memory_dir, pids_dir, blkio_dir = (root / c / relative for c in ("memory", "pids", "blkio"))
    present = [d for d in (memory_dir, pids_dir, cpu_dir, blkio_dir)
               if d is not None and d.is_dir()]
    if not present:
        return None
    cpu = _flat_keyed(cpu_dir / "cpu.stat") if cpu_dir is not None else {}
    memory = _flat_keyed(memory_dir / "memory.stat")
    procs = _procs(present[0])
    fds, sockets = open_files(procs, proc)

    def total(key: str) -> int:
        return memory.get(f"total_{key}", memory.get(key, 0))

    return ExtraStats(
        cfs_periods=cpu.get("nr_periods", 0),
        cfs_throttled_periods=cpu.get("nr_throttled", 0),
        cfs_throttled_ns=cpu.get("throttled_time", 0),
        memory_failcnt=(_single(memory_dir / "memory.failcnt") or 0),
        memory_kernel=(_single(memory_dir / "memory.kmem.usage_in_bytes") or 0),
        memory_mapped_file=total("mapped_file"),
        memory_max_usage=(_single(memory_dir / "memory.max_usage_in_bytes") or 0),
        swap_limit=_single(memory_dir / "memory.memsw.limit_in_bytes") or 0,
        threads_max=_single(pids_dir / "pids.max") or 0,
        file_descriptors=fds,
        sockets=sockets,
        io=_read_blkio_v1(blkio_dir),
        cfs_bursts=cpu.get("nr_bursts", 0),
        cfs_burst_ns=cpu.get("burst_time", 0),
        memory_active_file=total("active_file"),
        memory_inactive_file=total("inactive_file"),
        memory_reservation=_single(memory_dir / "memory.soft_limit_in_bytes") or 0,
        max_open_files=max_open_files(procs, proc),
    )


def _read_blkio_v1(directory: Path) -> tuple[DeviceIo, ...]:
    for name in _V1_BLKIO:
        sizes = parse_blkio_v1(_read(directory / name) or "")
        if sizes:
            ios_name = name.replace("io_service_bytes", "io_serviced")
            counts = parse_blkio_v1(_read(directory / ios_name) or "")
            return _devices({dev: (ops, counts.get(dev, {})) for dev, ops in sizes.items()})
    return ()

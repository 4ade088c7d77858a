"""Resource usage readers: cgroup v1 / v2 counters, /proc/net/dev inside a pod's network
namespace, and writable-layer disk usage (cached: walking a layer is slow).

Everything here blocks; the server runs it in threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from cripy.fsutil import disk_usage

CGROUP_ROOT = Path("/sys/fs/cgroup")
CLONE_NEWNET = 0x40000000
UNLIMITED = 1 << 62  # v1 says "no limit" with a page-rounded 2**63 - 1
LAYER_USAGE_TTL = 2.0  # seconds a writable layer's measured usage is reused
_V1_CPUACCT = ("cpuacct", "cpu,cpuacct", "cpuacct,cpu")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


# --- cgroups ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PressureLine:
    """One line of a cgroup v2 *.pressure file: stall percentages and the total."""

    avg10: float
    avg60: float
    avg300: float
    total_ns: int


@dataclass(frozen=True)
class Pressure:
    """Pressure stall information of one resource ("some" and, where given, "full")."""

    some: PressureLine
    full: PressureLine | None = None


def parse_pressure(text: str) -> Pressure | None:
    """`some avg10=0.12 avg60=0.05 avg300=0.01 total=12345` lines (total in microseconds);
    None when there is no "some" line."""
    lines: dict[str, PressureLine] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        try:
            fields = dict(item.split("=", 1) for item in rest.split())
            lines[kind] = PressureLine(float(fields["avg10"]), float(fields["avg60"]),
                                       float(fields["avg300"]), int(fields["total"]) * 1000)
        except (KeyError, ValueError):
            continue
    if "some" not in lines:
        return None
    return Pressure(lines["some"], lines.get("full"))


@dataclass(frozen=True)
class CgroupStats:
    """One sample of a cgroup's counters (bytes, nanoseconds, counts)."""

    cpu_usage_ns: int
    memory_usage: int
    memory_working_set: int  # usage - inactive file pages, as the kubelet and cadvisor count
    memory_rss: int
    page_faults: int
    major_page_faults: int
    pids: int  # tasks (threads) in the cgroup and below
    timestamp_ns: int
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    memory_cache: int = 0
    memory_limit: int | None = None  # None: unlimited
    swap_usage: int | None = None  # None: not accounted
    swap_limit: int | None = None
    oom_kills: int = 0
    processes: int = 0  # processes directly in this cgroup (cgroup.procs)
    # pressure stall information (cgroup v2 with PSI in the kernel), else None
    cpu_pressure: Pressure | None = None
    memory_pressure: Pressure | None = None
    io_pressure: Pressure | None = None

    @property
    def memory_available(self) -> int | None:
        if self.memory_limit is None:
            return None
        return max(self.memory_limit - self.memory_working_set, 0)


def read_cgroup_stats(cgroups_path: str, root: Path = CGROUP_ROOT) -> CgroupStats | None:
    """The counters of `cgroups_path` (a cgroupfs path such as "/cripy/cripy-<id>"), or
    None when the cgroup does not exist (the container is not running)."""
    parts = [p for p in cgroups_path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        return None
    relative = Path(*parts)
    if (root / "cgroup.controllers").exists():
        return _read_v2(root / relative)
    return _read_v1(root, relative)


def combine(samples: Iterable[CgroupStats]) -> CgroupStats | None:
    """The sum of several cgroups' counters (a pod as its containers); limits are dropped."""
    items = list(samples)
    if not items:
        return None
    swaps = [s.swap_usage for s in items if s.swap_usage is not None]
    return CgroupStats(
        cpu_usage_ns=sum(s.cpu_usage_ns for s in items),
        memory_usage=sum(s.memory_usage for s in items),
        memory_working_set=sum(s.memory_working_set for s in items),
        memory_rss=sum(s.memory_rss for s in items),
        page_faults=sum(s.page_faults for s in items),
        major_page_faults=sum(s.major_page_faults for s in items),
        pids=sum(s.pids for s in items),
        timestamp_ns=max(s.timestamp_ns for s in items),
        cpu_user_ns=sum(s.cpu_user_ns for s in items),
        cpu_system_ns=sum(s.cpu_system_ns for s in items),
        memory_cache=sum(s.memory_cache for s in items),
        swap_usage=sum(swaps) if swaps else None,
        oom_kills=sum(s.oom_kills for s in items),
        processes=sum(s.processes for s in items),
    )


def _read_v2(directory: Path) -> CgroupStats | None:
    if not directory.is_dir():
        return None
    timestamp = time.time_ns()
    cpu = _flat_keyed(directory / "cpu.stat")
    memory = _flat_keyed(directory / "memory.stat")
    usage = _single(directory / "memory.current") or 0
    swap = _single(directory / "memory.swap.current")
    return CgroupStats(
        cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
        memory_usage=usage,
        memory_working_set=max(usage - memory.get("inactive_file", 0), 0),
        memory_rss=memory.get("anon", 0),
        page_faults=memory.get("pgfault", 0),
        major_page_faults=memory.get("pgmajfault", 0),
        pids=_single(directory / "pids.current") or 0,
        timestamp_ns=timestamp,
        cpu_user_ns=cpu.get("user_usec", 0) * 1000,
        cpu_system_ns=cpu.get("system_usec", 0) * 1000,
        memory_cache=memory.get("file", 0),
        memory_limit=_single(directory / "memory.max"),
        swap_usage=swap,
        swap_limit=_single(directory / "memory.swap.max") if swap is not None else None,
        oom_kills=_flat_keyed(directory / "memory.events").get("oom_kill", 0),
        processes=_count_lines(directory / "cgroup.procs"),
        cpu_pressure=_pressure(directory / "cpu.pressure"),
        memory_pressure=_pressure(directory / "memory.pressure"),
        io_pressure=_pressure(directory / "io.pressure"),
    )


def _pressure(path: Path) -> Pressure | None:
    text = _read(path)  # absent where the kernel has no PSI (or it is off: psi=0)
    return parse_pressure(text) if text else None


def _read_v1(root: Path, relative: Path) -> CgroupStats | None:
    cpuacct = next((root / c / relative for c in _V1_CPUACCT if (root / c / relative).is_dir()),
                   None)
    memory_dir = root / "memory" / relative
    pids_dir = root / "pids" / relative
    present = [d for d in (cpuacct, memory_dir, pids_dir) if d is not None and d.is_dir()]
    if not present:
        return None
    timestamp = time.time_ns()
    cpu_usage = user = system = 0
    if cpuacct is not None:
        cpu_usage = _single(cpuacct / "cpuacct.usage") or 0
        user_ns, system_ns = (_single(cpuacct / "cpuacct.usage_user"),
                              _single(cpuacct / "cpuacct.usage_sys"))
        if user_ns is not None and system_ns is not None:
            user, system = user_ns, system_ns
        else:  # older kernels: cpuacct.stat in clock ticks
            ticks = _flat_keyed(cpuacct / "cpuacct.stat")
            per_tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
            user, system = ticks.get("user", 0) * per_tick, ticks.get("system", 0) * per_tick
    stat = _flat_keyed(memory_dir / "memory.stat")

    def total(key: str) -> int:  # hierarchical counters where the kernel has them
        return stat.get(f"total_{key}", stat.get(key, 0))

    usage = _single(memory_dir / "memory.usage_in_bytes") or 0
    limit = _single(memory_dir / "memory.limit_in_bytes")
    memsw = _single(memory_dir / "memory.memsw.usage_in_bytes")
    memsw_limit = _single(memory_dir / "memory.memsw.limit_in_bytes")
    return CgroupStats(
        cpu_usage_ns=cpu_usage,
        memory_usage=usage,
        memory_working_set=max(usage - total("inactive_file"), 0),
        memory_rss=total("rss"),
        page_faults=total("pgfault"),
        major_page_faults=total("pgmajfault"),
        pids=_single(pids_dir / "pids.current") or 0,
        timestamp_ns=timestamp,
        cpu_user_ns=user,
        cpu_system_ns=system,
        memory_cache=total("cache"),
        memory_limit=limit,
        swap_usage=max(memsw - usage, 0) if memsw is not None else None,
        swap_limit=(memsw_limit - limit
                    if memsw_limit is not None and limit is not None else None),
        oom_kills=_flat_keyed(memory_dir / "memory.oom_control").get("oom_kill", 0),
        processes=_count_lines(present[0] / "cgroup.procs"),
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):  # absent, or the cgroup went away (ENODEV)
        return None


def _single(path: Path) -> int | None:
    """A one-number file; None when absent or unlimited ("max", or v1's huge number)."""
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if not text.isdigit():
        return None
    value = int(text)
    return None if value >= UNLIMITED else value


def _flat_keyed(path: Path) -> dict[str, int]:
    """"key value" lines (memory.stat, cpu.stat, ...); other lines are skipped."""
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            out[fields[0]] = int(fields[1])
    return out


def _count_lines(path: Path) -> int:
    return sum(1 for line in (_read(path) or "").splitlines() if line.strip())


# --- network ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InterfaceStats:
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


def parse_net_dev(text: str) -> dict[str, InterfaceStats]:
    """/proc/net/dev: two header lines, then "name: 8 receive and 8 transmit counters"."""
    out: dict[str, InterfaceStats] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 16 or not all(f.isdigit() for f in fields[:16]):
            continue
        v = [int(f) for f in fields[:16]]
        name = name.strip()
        out[name] = InterfaceStats(name, rx_bytes=v[0], rx_packets=v[1], rx_errors=v[2],
                                   rx_dropped=v[3], tx_bytes=v[8], tx_packets=v[9],
                                   tx_errors=v[10], tx_dropped=v[11])
    return out


def read_net_dev(netns_path: str) -> dict[str, InterfaceStats]:
    """Interface counters as seen inside the network namespace pinned at `netns_path`.
    Raises OSError."""
    result = read_net_devs([netns_path])[0]
    if isinstance(result, OSError):
        raise result
    return result


def read_net_devs(netns_paths: list[str]) -> list[dict[str, InterfaceStats] | OSError]:
    """`read_net_dev` of each path, in order; an OSError in place of what failed.

    One fresh thread joins each namespace in turn, reads its own
    /proc/thread-self/net/dev and ends, so no thread of the daemon is ever left in a pod's
    namespace (and 110 pods cost one thread, not 110).
    """
    outcome: list[list[dict[str, InterfaceStats] | OSError] | BaseException] = []

    def worker() -> None:
        found: list[dict[str, InterfaceStats] | OSError] = []
        try:
            for path in netns_paths:
                try:
                    found.append(_read_in_netns(path))
                except OSError as exc:
                    found.append(exc)
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
        else:
            outcome.append(found)

    thread = threading.Thread(target=worker, name="cripy-netns-stats", daemon=True)
    thread.start()
    thread.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _read_in_netns(netns_path: str) -> dict[str, InterfaceStats]:
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # CLONE_NEWNET makes the kernel refuse anything but a network namespace file.
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns_path}: {os.strerror(err)}")
    finally:
        os.close(fd)
    with open("/proc/thread-self/net/dev") as f:
        return parse_net_dev(f.read())


# --- writable layers ----------------------------------------------------------------------


def layer_usage(upper: Path) -> tuple[int, int]:
    """(bytes, inodes) a container's writable layer uses; (0, 0) when it is gone."""
    if not upper.is_dir():
        return 0, 0
    return disk_usage(upper)


@dataclass(frozen=True)
class LayerUsage:
    used_bytes: int
    inodes_used: int
    timestamp_ns: int  # when it was measured


class LayerUsageCache:
    """Writable-layer usage per container, measured at most once every `ttl` seconds.

    Thread-safe; a walk runs outside the lock, so two callers may measure at once.
    """

    def __init__(self, ttl: float = LAYER_USAGE_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, LayerUsage]] = {}

    def get(self, key: str, upper: Path) -> LayerUsage:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and now - entry[0] < self.ttl:
            return entry[1]
        used, inodes = layer_usage(upper)
        usage = LayerUsage(used, inodes, time.time_ns())
        with self._lock:
            self._entries[key] = (now, usage)
        return usage

    def prune(self, keep: Collection[str]) -> None:
        """Forget every key not in `keep` (removed containers)."""
        with self._lock:
            for key in [k for k in self._entries if k not in keep]:
                del self._entries[key]


# --- CPU rate -----------------------------------------------------------------------------


class CpuRates:
    """usage_nano_cores from successive cumulative CPU samples of each object.

    Samples closer than `min_window_ns` to the last one reuse its rate, so a burst of
    calls does not turn into noise. Thread-safe.
    """

    def __init__(self, min_window_ns: int = 100_000_000) -> None:
        self.min_window_ns = min_window_ns
        self._lock = threading.Lock()
        self._last: dict[str, tuple[int, int, int | None]] = {}  # key -> (ts, usage, rate)

    def update(self, key: str, usage_ns: int, timestamp_ns: int) -> int | None:
        with self._lock:
            last = self._last.get(key)
            if last is not None:
                then, used, rate = last
                elapsed = timestamp_ns - then
                if 0 <= elapsed < self.min_window_ns:
                    return rate
                if elapsed > 0 and usage_ns >= used:
                    rate = (usage_ns - used) * 1_000_000_000 // elapsed
                    self._last[key] = (timestamp_ns, usage_ns, rate)
                    return rate
            # first sample, or the counter went back (a new cgroup): start over
            self._last[key] = (timestamp_ns, usage_ns, None)
            return None

    def prune(self, keep: Collection[str]) -> None:
        with self._lock:
            for key in [k for k in self._last if k not in keep]:
                del self._last[key]

"""The metrics-only cgroup readers (CFS throttling, block I/O, memory extras, pids limit,
open fds and sockets) against fake cgroup v1 / v2 and /proc trees, and the cadvisor
metrics built from them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cripy.api import api_pb2 as pb
from cripy.runtime import cgroup_metrics
from cripy.runtime.cgroup_metrics import (
    DeviceIo,
    ExtraStats,
    count_fds,
    device_name,
    open_files,
    parse_blkio_v1,
    parse_io_stat,
    parse_max_open_files,
    read_extra_stats,
)
from cripy.runtime.stats import Pressure, PressureLine
from cripy.server import cadvisor
from tests.unit.test_stats import container_sample, sample_stats, write_files

CGROUP = "/kubepods/pod1/cripy-abc"
V1_BYTES = """\
254:0 Read 4194304
254:0 Write 8388608
254:0 Sync 12582912
254:0 Async 0
254:0 Discard 0
254:0 Total 12582912
7:3 Read 512
7:3 Write 0
7:3 Total 512
Total 12583424
"""
V1_IOS = "254:0 Read 8\n254:0 Write 16\n254:0 Total 24\nTotal 24\n"
IO_STAT = ("254:0 rbytes=4194304 wbytes=8388608 rios=8 wios=16 dbytes=0 dios=0\n"
           "7:3 rbytes=512 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")


LIMITS = """\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 524288               files
Max processes             63711                63711                processes
"""


def fake_proc(root: Path, fds: dict[int, list[str]]) -> Path:
    for pid, targets in fds.items():
        fd_dir = root / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        for n, target in enumerate(targets):
            os.symlink(target, fd_dir / str(n))
        (root / str(pid) / "limits").write_text(LIMITS.replace("1024", str(pid)))
    return root


PROCESS_FDS = {4242: ["/dev/null", "socket:[1001]", "pipe:[7]", "socket:[1002]"],
               4243: ["/dev/null", "anon_inode:[eventfd]"]}


def v1_tree(root: Path) -> Path:
    rel = CGROUP.lstrip("/")
    for controller in ("cpu,cpuacct", "memory", "pids", "blkio"):
        (root / controller).mkdir(parents=True)
    write_files(root / "cpu,cpuacct" / rel, {
        "cpu.stat": "nr_periods 100\nnr_throttled 40\nthrottled_time 2500000000\n"
                    "nr_bursts 7\nburst_time 3000000000\n"})
    write_files(root / "memory" / rel, {
        "cgroup.procs": "4242\n4243\n",
        "memory.stat": "mapped_file 4096\ntotal_mapped_file 8192\ncache 0\n"
                       "active_file 10\ntotal_active_file 20\ntotal_inactive_file 30\n",
        "memory.soft_limit_in_bytes": "9223372036854771712\n",
        "memory.failcnt": "3\n",
        "memory.kmem.usage_in_bytes": "1234567\n",
        "memory.max_usage_in_bytes": "50000000\n",
        "memory.memsw.limit_in_bytes": "9223372036854771712\n",
    })
    write_files(root / "pids" / rel, {"pids.max": "1024\n"})
    write_files(root / "blkio" / rel, {
        # no CFQ, an empty BFQ: the throttle layer's counters are the ones read
        "blkio.bfq.io_service_bytes_recursive": "Total 0\n",
        "blkio.throttle.io_service_bytes_recursive": V1_BYTES,
        "blkio.throttle.io_serviced_recursive": V1_IOS,
    })
    return root


def v2_tree(root: Path, *, kernel_key: bool = True, peak: bool = True) -> Path:
    stat = ("anon 1000\nfile_mapped 8192\nkernel_stack 100\nslab 200\nsock 50\n"
            "active_file 20\ninactive_file 30\n")
    files = {
        "cgroup.procs": "4242\n4243\n",
        "cpu.stat": "usage_usec 10\nnr_periods 100\nnr_throttled 40\nthrottled_usec 2500000\n"
                    "nr_bursts 7\nburst_usec 3000000\n",
        "memory.min": "4096\n",
        "memory.stat": ("kernel 777\n" if kernel_key else "") + stat,
        "memory.events": "low 0\nhigh 0\nmax 3\noom 0\noom_kill 0\n",
        "memory.swap.max": "max\n",
        "pids.max": "max\n",
        "io.stat": IO_STAT,
    }
    if peak:
        files["memory.peak"] = "50000000\n"
    write_files(root, {"cgroup.controllers": "cpu io memory pids\n"})
    write_files(root / CGROUP.lstrip("/"), files)
    return root


def test_parse_blkio_v1_skips_the_grand_total() -> None:
    table = parse_blkio_v1(V1_BYTES)
    assert table[(254, 0)] == {"Read": 4194304, "Write": 8388608, "Sync": 12582912,
                               "Async": 0, "Discard": 0, "Total": 12582912}
    assert table[(7, 3)] == {"Read": 512, "Write": 0, "Total": 512}
    assert parse_blkio_v1("Total 0\n") == {}
    assert parse_blkio_v1("garbage\nx:y Read 1\n8:0 Read many\n") == {}


def test_parse_io_stat_names_operations_as_libcontainer() -> None:
    table = parse_io_stat(IO_STAT + "8:16 rbytes=1 unknown=5 wios=x\n\n")
    assert table[(254, 0)] == ({"Read": 4194304, "Write": 8388608, "Discard": 0},
                               {"Read": 8, "Write": 16, "Discard": 0})
    assert table[(8, 16)] == ({"Read": 1}, {})


def test_parse_max_open_files() -> None:
    assert parse_max_open_files(LIMITS) == 1024
    assert parse_max_open_files(LIMITS.replace("1024  ", "unlimited")) is None
    assert parse_max_open_files("") is None


def test_count_fds_and_sockets(tmp_path: Path) -> None:
    assert count_fds(["/dev/null", "socket:[1]", "socket:[2]", "pipe:[3]"]) == (4, 2)
    proc = fake_proc(tmp_path, PROCESS_FDS)
    assert open_files([4242, 4243, 99999], proc) == (6, 2)  # 99999: gone, counts nothing


def test_device_names_come_from_sysfs(tmp_path: Path) -> None:
    write_files(tmp_path / "254:0", {"uevent": "MAJOR=254\nMINOR=0\nDEVNAME=vda\n"})
    cgroup_metrics._names.clear()
    assert device_name(254, 0, tmp_path) == "/dev/vda"
    assert device_name(9, 9, tmp_path) == ""  # unknown to the kernel
    cgroup_metrics._names.clear()


def test_v1_extra_stats(tmp_path: Path) -> None:
    root = v1_tree(tmp_path / "cgroup")
    proc = fake_proc(tmp_path / "proc", PROCESS_FDS)
    extra = read_extra_stats(CGROUP, root, proc)
    assert extra is not None
    assert (extra.cfs_periods, extra.cfs_throttled_periods, extra.cfs_throttled_ns) == \
        (100, 40, 2_500_000_000)
    assert extra.memory_failcnt == 3
    assert extra.memory_kernel == 1234567
    assert extra.memory_mapped_file == 8192  # the hierarchical total
    assert extra.memory_max_usage == 50_000_000
    assert extra.swap_limit == 0  # the kernel's "unlimited"
    assert extra.threads_max == 1024
    assert (extra.file_descriptors, extra.sockets) == (6, 2)
    loop, vda = extra.io  # sorted by device number
    assert (vda.major, vda.minor, loop.major, loop.minor) == (254, 0, 7, 3)
    assert vda.bytes["Read"] == 4194304 and vda.bytes["Write"] == 8388608
    assert vda.ios == {"Read": 8, "Write": 16, "Total": 24}
    assert loop.ios == {}
    assert (extra.cfs_bursts, extra.cfs_burst_ns) == (7, 3_000_000_000)
    assert (extra.memory_active_file, extra.memory_inactive_file) == (20, 30)
    assert extra.memory_reservation == 0  # unlimited
    assert extra.max_open_files == 4242  # the lowest PID's soft limit
    assert read_extra_stats("/kubepods/gone", root, proc) is None
    assert read_extra_stats("/../etc", root, proc) is None


def test_v2_extra_stats(tmp_path: Path) -> None:
    root = v2_tree(tmp_path / "cgroup")
    proc = fake_proc(tmp_path / "proc", PROCESS_FDS)
    extra = read_extra_stats(CGROUP, root, proc)
    assert extra is not None
    assert (extra.cfs_periods, extra.cfs_throttled_periods, extra.cfs_throttled_ns) == \
        (100, 40, 2_500_000_000)  # throttled_usec * 1000
    assert extra.memory_failcnt == 3  # memory.events "max"
    assert extra.memory_kernel == 777
    assert extra.memory_mapped_file == 8192
    assert extra.memory_max_usage == 50_000_000
    assert (extra.swap_limit, extra.threads_max) == (0, 0)  # "max": unlimited
    assert (extra.file_descriptors, extra.sockets) == (6, 2)
    assert [(d.major, d.minor, d.bytes["Read"], d.ios["Write"]) for d in extra.io] == \
        [(7, 3, 512, 0), (254, 0, 4194304, 16)]
    assert (extra.cfs_bursts, extra.cfs_burst_ns) == (7, 3_000_000_000)  # burst_usec * 1000
    assert (extra.memory_active_file, extra.memory_inactive_file) == (20, 30)
    assert extra.memory_reservation == 4096  # memory.min
    assert extra.max_open_files == 4242
    assert read_extra_stats("/kubepods/gone", root, proc) is None


def test_v2_older_kernels_sum_kernel_memory_and_have_no_peak(tmp_path: Path) -> None:
    root = v2_tree(tmp_path / "cgroup", kernel_key=False, peak=False)
    extra = read_extra_stats(CGROUP, root, tmp_path / "proc")
    assert extra is not None
    assert extra.memory_kernel == 350  # kernel_stack + slab + sock
    assert extra.memory_max_usage == 0
    assert extra.file_descriptors == 0  # no /proc entries to read


def test_metrics_of_the_extras_follow_cadvisor() -> None:
    sample = container_sample(sample_stats())
    sample.extra = ExtraStats(
        cfs_periods=100, cfs_throttled_periods=40, cfs_throttled_ns=2_600_000_000,
        memory_failcnt=3, memory_kernel=777, memory_mapped_file=8192,
        memory_max_usage=50_000_000, swap_limit=1 << 30, threads_max=1024,
        file_descriptors=6, sockets=2, cfs_bursts=7, cfs_burst_ns=3_100_000_000,
        memory_active_file=20, memory_inactive_file=30, memory_reservation=4096,
        max_open_files=1024,
        io=(DeviceIo(254, 0, "/dev/vda", {"Read": 4096, "Write": 8192, "Total": 12288},
                     {"Read": 1, "Write": 2, "Total": 3}),))
    descriptors = {m.name: m for m in cadvisor.METRICS.values()}
    metrics = cadvisor._container_metrics(sample, 1_700_000_000 * 10**9).metrics
    values = {(m.name, tuple(m.label_values[6:])): m for m in metrics}
    for m in metrics:
        spec = descriptors[m.name]
        assert len(m.label_values) == 6 + len(spec.extra_labels), m.name
        assert m.metric_type == spec.kind

    def value(name: str, *labels: str) -> int:
        return int(values[(name, labels)].value.value)

    assert value("container_cpu_cfs_periods_total") == 100
    assert value("container_cpu_cfs_throttled_periods_total") == 40
    assert value("container_cpu_cfs_throttled_seconds_total") == 2
    assert value("container_memory_failcnt") == 3
    assert value("container_memory_kernel_usage") == 777
    assert value("container_memory_mapped_file") == 8192
    assert value("container_memory_max_usage_bytes") == 50_000_000
    assert value("container_spec_memory_swap_limit_bytes") == 1 << 30
    assert value("container_threads_max") == 1024
    assert value("container_file_descriptors") == 6
    assert value("container_sockets") == 2
    assert value("container_cpu_cfs_burst_periods_total") == 7
    assert value("container_cpu_cfs_burst_seconds_total") == 3
    assert value("container_memory_total_active_file_bytes") == 20
    assert value("container_memory_total_inactive_file_bytes") == 30
    assert value("container_spec_memory_reservation_limit_bytes") == 4096
    assert value("container_ulimits_soft", "max_open_files") == 1024
    assert not any(name.startswith("container_pressure_") for name, *_ in values)  # no PSI
    assert value("container_fs_reads_bytes_total", "/dev/vda") == 4096
    assert value("container_fs_writes_bytes_total", "/dev/vda") == 8192
    assert value("container_fs_reads_total", "/dev/vda") == 1
    assert value("container_fs_writes_total", "/dev/vda") == 2
    for operation, expected in (("Read", 4096), ("Write", 8192), ("Total", 12288)):
        assert value("container_blkio_device_usage_total",
                     "/dev/vda", "254", "0", operation) == expected
    kinds = {name: values[(name, ())].metric_type for name in
             ("container_memory_failcnt", "container_sockets", "container_threads_max")}
    assert kinds == {"container_memory_failcnt": pb.COUNTER, "container_sockets": pb.GAUGE,
                     "container_threads_max": pb.GAUGE}
    assert descriptors["container_blkio_device_usage_total"].descriptor.label_keys[6:] == \
        ["device", "major", "minor", "operation"]


def test_pressure_metrics_where_the_kernel_has_psi() -> None:
    full = PressureLine(0.0, 0.0, 0.0, 2_500_000_000)
    some = PressureLine(1.0, 0.5, 0.1, 4_200_000_000)
    stats = dataclasses.replace(sample_stats(), cpu_pressure=Pressure(some, full),
                                memory_pressure=Pressure(some, full),
                                io_pressure=Pressure(some))
    metrics = cadvisor._container_metrics(container_sample(stats), 1).metrics
    values = {m.name: m.value.value for m in metrics if m.name.startswith("container_pressure")}
    assert values == {
        "container_pressure_cpu_waiting_seconds_total": 4,  # "some"
        "container_pressure_cpu_stalled_seconds_total": 2,  # "full"
        "container_pressure_memory_waiting_seconds_total": 4,
        "container_pressure_memory_stalled_seconds_total": 2,
        "container_pressure_io_waiting_seconds_total": 4,  # no "full" line: no stalled
    }

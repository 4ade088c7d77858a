"""Stats readers against fake cgroup v1 / v2 trees, /proc/net/dev in a real netns, the
writable-layer cache, CPU rates, and the CRI messages and metrics built from them."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from cripy.api import api_pb2 as pb
from cripy.fsutil import disk_usage
from cripy.runtime import usage
from cripy.runtime.container import ContainerManager
from cripy.runtime.sandbox import SandboxManager
from cripy.runtime.stats import (
    CgroupStats,
    CpuRates,
    InterfaceStats,
    LayerUsage,
    LayerUsageCache,
    Pressure,
    PressureLine,
    combine,
    layer_usage,
    parse_net_dev,
    parse_pressure,
    read_cgroup_stats,
    read_net_dev,
    read_net_devs,
)
from cripy.server import cadvisor
from cripy.server import stats as server_stats

CGROUP = "/kubepods/pod1234/cripy-abc"
V1_UNLIMITED = "9223372036854771712"

V1_MEMORY_STAT = """\
cache 9330688
rss 8876032
rss_huge 0
shmem 0
mapped_file 7684096
dirty 20480
writeback 0
swap 0
pgpgin 73657
pgpgout 69212
pgfault 114774
pgmajfault 3
inactive_anon 0
active_anon 8876032
inactive_file 4096000
active_file 5234688
unevictable 0
hierarchical_memory_limit 9223372036854771712
hierarchical_memsw_limit 9223372036854771712
total_cache 9330688
total_rss 8876032
total_rss_huge 0
total_shmem 0
total_mapped_file 7684096
total_dirty 20480
total_writeback 0
total_swap 0
total_pgpgin 73657
total_pgpgout 69212
total_pgfault 114774
total_pgmajfault 3
total_inactive_anon 0
total_active_anon 8876032
total_inactive_file 4096000
total_active_file 5234688
total_unevictable 0
"""

V2_MEMORY_STAT = """\
anon 8876032
file 9330688
kernel 1220608
kernel_stack 65536
pagetables 167936
sec_pagetables 0
percpu 0
sock 0
vmalloc 0
shmem 0
file_mapped 7684096
file_dirty 20480
file_writeback 0
swapcached 0
anon_thp 0
inactive_anon 0
active_anon 8876032
inactive_file 4096000
active_file 5234688
unevictable 0
slab_reclaimable 512000
slab_unreclaimable 307200
slab 819200
workingset_refault_anon 0
workingset_refault_file 0
pgscan 0
pgsteal 0
pgfault 114774
pgmajfault 3
pgrefill 0
pgactivate 12
pgdeactivate 0
pglazyfree 0
pglazyfreed 0
thp_fault_alloc 0
thp_collapse_alloc 0
"""


def write_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_text(content)


def v1_tree(root: Path, *, usage: int = 18_300_000, limit: str = V1_UNLIMITED,
            memory_stat: str = V1_MEMORY_STAT, cpuacct: str = "cpuacct") -> Path:
    rel = CGROUP.lstrip("/")
    for controller in ("cpu", "cpuacct", "memory", "pids", "blkio", "devices"):
        (root / controller).mkdir(parents=True, exist_ok=True)  # mounts exist for all
    write_files(root / cpuacct / rel, {
        "cpuacct.usage": "2500000000\n",
        "cpuacct.usage_user": "1800000000\n",
        "cpuacct.usage_sys": "700000000\n",
        "cpuacct.stat": "user 180\nsystem 70\n",
        "cgroup.procs": "4242\n4243\n",
    })
    write_files(root / "memory" / rel, {
        "memory.usage_in_bytes": f"{usage}\n",
        "memory.limit_in_bytes": f"{limit}\n",
        "memory.memsw.usage_in_bytes": f"{usage + 4096}\n",
        "memory.memsw.limit_in_bytes": f"{V1_UNLIMITED}\n",
        "memory.stat": memory_stat,
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        "cgroup.procs": "4242\n4243\n",
    })
    write_files(root / "pids" / rel, {"pids.current": "3\n", "cgroup.procs": "4242\n4243\n"})
    return root


def v2_tree(root: Path, *, usage: int = 18_300_000, memory_max: str = "max") -> Path:
    write_files(root, {"cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n"})
    write_files(root / CGROUP.lstrip("/"), {
        "cgroup.procs": "4242\n",
        "cpu.stat": textwrap.dedent("""\
            usage_usec 2500000
            user_usec 1800000
            system_usec 700000
            nr_periods 0
            nr_throttled 0
            throttled_usec 0
            nr_bursts 0
            burst_usec 0
            """),
        "memory.current": f"{usage}\n",
        "memory.max": f"{memory_max}\n",
        "memory.stat": V2_MEMORY_STAT,
        "memory.swap.current": "8192\n",
        "memory.swap.max": "max\n",
        "memory.events": "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n",
        "pids.current": "2\n",
    })
    return root


# --- cgroup v1 ----------------------------------------------------------------------------


def test_v1_every_field(tmp_path: Path) -> None:
    root = v1_tree(tmp_path)
    stats = read_cgroup_stats(CGROUP, root)
    assert stats is not None
    assert stats.cpu_usage_ns == 2_500_000_000
    assert stats.cpu_user_ns == 1_800_000_000
    assert stats.cpu_system_ns == 700_000_000
    assert stats.memory_usage == 18_300_000
    assert stats.memory_working_set == 18_300_000 - 4_096_000  # usage - total_inactive_file
    assert stats.memory_rss == 8_876_032
    assert stats.memory_cache == 9_330_688
    assert stats.page_faults == 114_774
    assert stats.major_page_faults == 3
    assert stats.pids == 3
    assert stats.processes == 2
    assert stats.oom_kills == 2
    assert stats.memory_limit is None  # the kernel's "unlimited"
    assert stats.memory_available is None
    assert stats.swap_usage == 4096
    assert stats.swap_limit is None
    assert abs(stats.timestamp_ns - time.time_ns()) < 10**10


def test_v1_prefers_hierarchical_totals(tmp_path: Path) -> None:
    stat = V1_MEMORY_STAT.replace("total_rss 8876032", "total_rss 10000000") \
        .replace("total_inactive_file 4096000", "total_inactive_file 5000000") \
        .replace("total_pgfault 114774", "total_pgfault 200000")
    stats = read_cgroup_stats(CGROUP, v1_tree(tmp_path, memory_stat=stat))
    assert stats is not None
    assert stats.memory_rss == 10_000_000
    assert stats.memory_working_set == 18_300_000 - 5_000_000
    assert stats.page_faults == 200_000


def test_v1_working_set_is_floored_at_zero(tmp_path: Path) -> None:
    stats = read_cgroup_stats(CGROUP, v1_tree(tmp_path, usage=1_000_000))
    assert stats is not None
    assert stats.memory_usage == 1_000_000
    assert stats.memory_working_set == 0  # inactive_file (4096000) > usage


def test_v1_limit_gives_available_bytes(tmp_path: Path) -> None:
    stats = read_cgroup_stats(CGROUP, v1_tree(tmp_path, limit="268435456"))
    assert stats is not None
    assert stats.memory_limit == 268_435_456
    assert stats.memory_available == 268_435_456 - (18_300_000 - 4_096_000)


def test_v1_combined_cpu_cpuacct_mount_and_tick_stat(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, cpuacct="cpu,cpuacct")
    cpu_dir = root / "cpu,cpuacct" / CGROUP.lstrip("/")
    (cpu_dir / "cpuacct.usage_user").unlink()  # an older kernel: only cpuacct.stat
    (cpu_dir / "cpuacct.usage_sys").unlink()
    stats = read_cgroup_stats(CGROUP, root)
    assert stats is not None
    per_tick = 10**9 // os.sysconf("SC_CLK_TCK")
    assert stats.cpu_usage_ns == 2_500_000_000
    assert stats.cpu_user_ns == 180 * per_tick
    assert stats.cpu_system_ns == 70 * per_tick


def test_v1_missing_cgroup_and_bad_paths(tmp_path: Path) -> None:
    root = v1_tree(tmp_path)
    assert read_cgroup_stats("/kubepods/pod1234/cripy-gone", root) is None
    assert read_cgroup_stats("/kubepods/../kubepods/pod1234/cripy-abc", root) is None
    assert read_cgroup_stats("/", root) is None


def test_v1_partial_controllers(tmp_path: Path) -> None:
    root = tmp_path
    write_files(root / "memory" / CGROUP.lstrip("/"), {
        "memory.usage_in_bytes": "5000000\n", "memory.stat": V1_MEMORY_STAT})
    (root / "cpuacct").mkdir()
    stats = read_cgroup_stats(CGROUP, root)
    assert stats is not None
    assert (stats.cpu_usage_ns, stats.pids, stats.memory_usage) == (0, 0, 5_000_000)
    assert stats.memory_working_set == 5_000_000 - 4_096_000


# --- cgroup v2 ----------------------------------------------------------------------------


def test_v2_every_field(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    stats = read_cgroup_stats(CGROUP, root)
    assert stats is not None
    assert stats.cpu_usage_ns == 2_500_000_000  # usage_usec * 1000
    assert stats.cpu_user_ns == 1_800_000_000
    assert stats.cpu_system_ns == 700_000_000
    assert stats.memory_usage == 18_300_000
    assert stats.memory_working_set == 18_300_000 - 4_096_000  # memory.current - inactive_file
    assert stats.memory_rss == 8_876_032  # anon
    assert stats.memory_cache == 9_330_688  # file
    assert stats.page_faults == 114_774
    assert stats.major_page_faults == 3
    assert stats.pids == 2
    assert stats.processes == 1
    assert stats.oom_kills == 1
    assert stats.memory_limit is None  # "max"
    assert stats.swap_usage == 8192
    assert stats.swap_limit is None


def test_v2_pressure_stall_information(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    cgroup = root / CGROUP.lstrip("/")
    write_files(cgroup, {
        "cpu.pressure": "some avg10=1.50 avg60=0.75 avg300=0.25 total=123456\n"
                        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        "memory.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"
                           "full avg10=0.00 avg60=0.00 avg300=0.00 total=3\n",
        "io.pressure": "some avg10=2.00 avg60=1.00 avg300=0.50 total=99\n",
    })
    stats = read_cgroup_stats(CGROUP, root)
    assert stats is not None
    assert stats.cpu_pressure == Pressure(PressureLine(1.5, 0.75, 0.25, 123_456_000),
                                          PressureLine(0.0, 0.0, 0.0, 0))
    assert stats.memory_pressure is not None and stats.memory_pressure.full is not None
    assert stats.memory_pressure.full.total_ns == 3000
    assert stats.io_pressure == Pressure(PressureLine(2.0, 1.0, 0.5, 99_000))
    # without PSI in the kernel the files are absent: no pressure, the rest as before
    without = read_cgroup_stats(CGROUP, v2_tree(tmp_path / "nopsi"))
    assert without is not None and without.cpu_pressure is None


def test_parse_pressure_skips_what_it_cannot_read() -> None:
    assert parse_pressure("") is None
    assert parse_pressure("full avg10=0.00 avg60=0.00 avg300=0.00 total=1\n") is None
    assert parse_pressure("some avg10=x avg60=0 avg300=0 total=1\n") is None
    parsed = parse_pressure("some avg10=0.10 avg60=0.20 avg300=0.30 total=5\nbogus\n")
    assert parsed == Pressure(PressureLine(0.1, 0.2, 0.3, 5000))


def test_v2_working_set_floor_and_limit(tmp_path: Path) -> None:
    stats = read_cgroup_stats(CGROUP, v2_tree(tmp_path, usage=4_000_000,
                                              memory_max="134217728"))
    assert stats is not None
    assert stats.memory_working_set == 0
    assert stats.memory_limit == 134_217_728
    assert stats.memory_available == 134_217_728


def test_v2_missing_cgroup(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    assert read_cgroup_stats("/kubepods/pod1234/cripy-gone", root) is None
    # a v2 root is never mistaken for v1 controller directories
    (root / "memory" / CGROUP.lstrip("/")).mkdir(parents=True)
    assert read_cgroup_stats("/kubepods/pod1234/cripy-gone", root) is None


def test_combine_sums_counters_and_drops_limits() -> None:
    a = CgroupStats(100, 1000, 800, 500, 10, 1, 2, 5, cpu_user_ns=60, cpu_system_ns=40,
                    memory_cache=300, memory_limit=4096, swap_usage=None, oom_kills=1,
                    processes=1)
    b = CgroupStats(50, 3000, 2000, 1500, 20, 2, 3, 9, cpu_user_ns=30, cpu_system_ns=20,
                    memory_cache=700, memory_limit=8192, swap_usage=64, oom_kills=0,
                    processes=2)
    total = combine([a, b])
    assert total == CgroupStats(150, 4000, 2800, 2000, 30, 3, 5, 9, cpu_user_ns=90,
                                cpu_system_ns=60, memory_cache=1000, memory_limit=None,
                                swap_usage=64, oom_kills=1, processes=3)
    assert combine([]) is None


# --- network ------------------------------------------------------------------------------

NET_DEV = "\n".join([  # the kernel's layout, long lines and all
    "Inter-|   Receive                                                |  Transmit",
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs"
    " drop fifo colls carrier compressed",
    "    lo:    1296      16    0    0    0     0          0         0     1296      16    0"
    "    0    0     0       0          0",
    "  eth0:123456789012  987654    1    2    0     0          0         5 98765432   54321"
    "    3    4    0     0       0          0",
    "veth1234:0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0",  # no space after the colon
    "garbage line",
]) + "\n"


def test_parse_net_dev() -> None:
    stats = parse_net_dev(NET_DEV)
    assert set(stats) == {"lo", "eth0", "veth1234"}
    assert stats["eth0"] == InterfaceStats("eth0", rx_bytes=123456789012, rx_packets=987654,
                                           rx_errors=1, rx_dropped=2, tx_bytes=98765432,
                                           tx_packets=54321, tx_errors=3, tx_dropped=4)
    assert stats["lo"].rx_bytes == stats["lo"].tx_bytes == 1296


def test_read_net_dev_refuses_what_is_not_a_netns(tmp_path: Path) -> None:
    plain = tmp_path / "not-a-namespace"
    plain.write_text("")
    with pytest.raises(OSError):
        read_net_dev(str(plain))
    with pytest.raises(OSError):
        read_net_dev("/proc/self/ns/uts")  # a namespace, but not a network one
    with pytest.raises(FileNotFoundError):
        read_net_dev(str(tmp_path / "missing"))


def test_read_net_devs_reports_each_failure_in_its_place(tmp_path: Path) -> None:
    plain = tmp_path / "not-a-namespace"
    plain.write_text("")
    found = read_net_devs([str(tmp_path / "missing"), str(plain), "/proc/self/ns/uts"])
    assert isinstance(found[0], FileNotFoundError)
    assert all(isinstance(f, OSError) for f in found)
    assert read_net_devs([]) == []


# --- writable layers ----------------------------------------------------------------------


def test_layer_usage_matches_disk_usage(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "big").write_bytes(os.urandom(256 * 1024))
    (upper / "small").write_text("x")
    used, inodes = layer_usage(upper)
    assert (used, inodes) == disk_usage(upper)
    assert used >= 256 * 1024 and inodes == 3
    assert layer_usage(tmp_path / "gone") == (0, 0)


def test_layer_usage_cache_reuses_until_the_ttl(tmp_path: Path) -> None:
    now = [100.0]
    cache = LayerUsageCache(ttl=5.0, clock=lambda: now[0])
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "a").write_bytes(b"a" * 8192)
    first = cache.get("c1", upper)
    assert first.inodes_used == 1 and first.used_bytes >= 8192
    (upper / "b").write_bytes(b"b" * 65536)
    now[0] += 4.9
    assert cache.get("c1", upper) == first  # still fresh: no walk
    now[0] += 0.2
    second = cache.get("c1", upper)
    assert second.inodes_used == 2 and second.used_bytes >= first.used_bytes + 65536
    assert second.timestamp_ns >= first.timestamp_ns
    cache.prune({"other"})
    (upper / "b").unlink()
    assert cache.get("c1", upper).inodes_used == 1  # forgotten, so measured again


# --- CPU rates ----------------------------------------------------------------------------


def test_cpu_rates() -> None:
    rates = CpuRates(min_window_ns=100_000_000)
    s = 10**9
    assert rates.update("c", 5 * s, 1000 * s) is None  # first sample
    assert rates.update("c", 5 * s + s // 2, 1001 * s) == 500_000_000  # half a core
    assert rates.update("c", 9 * s, 1001 * s + 1000) == 500_000_000  # too soon: kept
    assert rates.update("c", 7 * s + s // 2, 1003 * s) == 1_000_000_000
    assert rates.update("c", 1 * s, 1004 * s) is None  # counter went back: start over
    assert rates.update("c", 2 * s, 1005 * s) == 1_000_000_000
    rates.prune(set())
    assert rates.update("c", 3 * s, 1006 * s) is None


# --- CRI messages and metrics -------------------------------------------------------------


def container_sample(cgroup: CgroupStats | None) -> usage.ContainerSample:
    ref = usage.ContainerRef(
        id="c" * 64,
        attributes=pb.ContainerAttributes(id="c" * 64,
                                          metadata=pb.ContainerMetadata(name="app")),
        cgroup=CGROUP, upper=Path("/nonexistent"), mountpoint="/var/lib/cripy/containers",
        labels=("app", "c" * 64, "busybox:latest", "k8s_app_web", "default", "web"),
        resources=pb.LinuxContainerResources(memory_limit_in_bytes=1 << 28, cpu_shares=512),
        started_at=1_700_000_000 * 10**9)
    return usage.ContainerSample(ref, cgroup, LayerUsage(1 << 20, 7, 42),
                                         fs=os.statvfs("/"))


def sample_stats() -> CgroupStats:
    return CgroupStats(3 * 10**9, 20_000_000, 16_000_000, 9_000_000, 1000, 2, 4,
                       1_700_000_000 * 10**9, memory_limit=1 << 28, swap_usage=0)


def test_container_stats_message() -> None:
    message = server_stats._container_stats(container_sample(sample_stats()))
    assert message.attributes.metadata.name == "app"
    assert message.cpu.usage_core_nano_seconds.value == 3 * 10**9
    assert message.memory.working_set_bytes.value == 16_000_000
    assert message.memory.usage_bytes.value == 20_000_000
    assert message.memory.rss_bytes.value == 9_000_000
    assert message.memory.available_bytes.value == (1 << 28) - 16_000_000
    assert message.memory.page_faults.value == 1000
    assert message.memory.major_page_faults.value == 2
    assert message.writable_layer.used_bytes.value == 1 << 20
    assert message.writable_layer.inodes_used.value == 7
    assert message.writable_layer.fs_id.mountpoint == "/var/lib/cripy/containers"
    assert not message.HasField("io") and not message.cpu.HasField("psi")
    pressure = Pressure(PressureLine(1.5, 0.75, 0.25, 4000), PressureLine(0.5, 0.25, 0.125, 2000))
    with_psi = dataclasses.replace(sample_stats(), cpu_pressure=pressure,
                                   memory_pressure=pressure, io_pressure=pressure)
    message = server_stats._container_stats(container_sample(with_psi))
    for psi in (message.cpu.psi, message.memory.psi, message.io.psi):
        assert (psi.Some.Total, psi.Some.Avg10, psi.Some.Avg60, psi.Some.Avg300) == \
            (4000, 1.5, 0.75, 0.25)
        assert (psi.Full.Total, psi.Full.Avg10) == (2000, 0.5)
    assert message.io.timestamp == with_psi.timestamp_ns
    stopped = server_stats._container_stats(container_sample(None))
    assert not stopped.HasField("cpu") and not stopped.HasField("memory")
    assert stopped.writable_layer.used_bytes.value == 1 << 20


def test_pod_stats_message_and_metrics_follow_the_descriptors() -> None:
    container = container_sample(sample_stats())
    pod_ref = usage.PodRef(
        id="p" * 64, attributes=pb.PodSandboxAttributes(id="p" * 64), netns="/x", cgroup=None,
        labels=("POD", "p" * 64, "", "k8s_web_default_uid_0", "default", "web"),
        containers=[container.ref])
    network = parse_net_dev(NET_DEV)
    pod = usage.PodSample(pod_ref, sample_stats(), network, 77, [container])

    stats = server_stats._pod_stats(pod)
    linux = stats.linux
    assert linux.network.default_interface.name == "eth0"
    assert linux.network.default_interface.rx_bytes.value == 123456789012
    assert linux.network.default_interface.tx_errors.value == 3
    assert sorted(i.name for i in linux.network.interfaces) == ["eth0", "veth1234"]
    assert linux.process.process_count.value == 4
    assert linux.memory.working_set_bytes.value == 16_000_000
    assert [c.attributes.id for c in linux.containers] == ["c" * 64]

    descriptors = {d.name: list(d.label_keys) for d in (
        m.descriptor for m in cadvisor.METRICS.values())}
    for name in ("container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
                 "container_memory_rss", "container_memory_usage_bytes",
                 "container_network_receive_bytes_total",
                 "container_network_transmit_bytes_total", "container_fs_usage_bytes",
                 "container_threads", "container_processes"):
        assert name in descriptors
    assert descriptors["container_memory_rss"] == list(cadvisor.BASE_LABELS)
    assert descriptors["container_network_receive_bytes_total"][-1] == "interface"

    metrics = cadvisor.pod_metrics(pod)
    everything = [*metrics.metrics, *metrics.container_metrics[0].metrics]
    for metric in everything:
        assert len(metric.label_values) == len(descriptors[metric.name]), metric.name
        assert metric.timestamp > 0
    values = {(m.name, tuple(m.label_values[6:])): m.value.value for m in everything}
    assert values[("container_network_receive_bytes_total", ("eth0",))] == 123456789012
    assert ("container_network_receive_bytes_total", ("lo",)) not in values
    assert values[("container_cpu_usage_seconds_total", ("total",))] == 3
    assert values[("container_memory_working_set_bytes", ())] == 16_000_000
    assert values[("container_fs_usage_bytes", ())] == 1 << 20
    assert values[("container_threads", ())] == 4
    assert values[("container_spec_memory_limit_bytes", ())] == 1 << 28
    assert values[("container_memory_failures_total", ("pgmajfault", "container"))] == 2
    assert metrics.container_metrics[0].metrics[0].label_values[:6] == [
        "app", "c" * 64, "busybox:latest", "k8s_app_web", "default", "web"]


def test_container_filesystems_sums_every_writable_layer(tmp_path: Path) -> None:
    root = tmp_path / "containers"
    for cid, size in (("a" * 64, 64 * 1024), ("b" * 64, 128 * 1024)):
        upper = root / cid / "upper"
        upper.mkdir(parents=True)
        (upper / "file").write_bytes(b"x" * size)
    manager = cast(ContainerManager, SimpleNamespace(
        layers_root=root, upper_dir=lambda cid: root / cid / "upper",
        all=lambda: [SimpleNamespace(id="a" * 64), SimpleNamespace(id="b" * 64)]))
    usage.layer_cache.prune(set())
    collector = usage.StatsCollector(manager, cast(SandboxManager, None))
    [total] = asyncio.run(server_stats.container_filesystems(collector))
    assert total.fs_id.mountpoint == str(tmp_path / "containers")
    assert total.used_bytes.value >= 192 * 1024
    assert total.inodes_used.value == 2
    assert total.timestamp > 0

"""Load: a soak of pod+container cycles from concurrent clients, and a burst of pods.

Afterwards nothing may be left (mounts, namespaces, veths, cgroups, conmons, file
descriptors, records) and the daemon's memory may not have grown by 10% or more.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from tests.support.daemon import Daemon
from tests.support.pods import (
    Node,
    bridge_network,
    container_config,
    leftovers,
    pod_config,
    remove_cgroup,
)
from tests.support.registry import Registry

CYCLES = 200
CLIENTS = 8
BURST = 50


@pytest.fixture(scope="module")
def load_node(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
              images: Any) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("load")
    daemon = Daemon(tmp / "daemon", insecure_registries=[registry.host])
    with bridge_network(daemon.cni_dir, tmp, 90) as bridge, daemon:
        daemon.pull(images.busybox.ref)
        yield Node(daemon, bridge, images.busybox.ref, tmp)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def records(daemon: Daemon) -> list[str]:
    found = []
    for kind in ("pods", "containers"):
        directory = daemon.root / kind
        if directory.exists():
            found += [f"{kind}/{p.name}" for p in directory.iterdir()]
    cache = daemon.root / "cni-cache"
    if cache.exists():
        found += [f"cni-cache/{p.name}" for p in cache.iterdir()]
    return found


def one_cycle(node: Node, log_dir: Path, cgroup_parent: str) -> None:
    with grpc.insecure_channel(node.daemon.endpoint) as channel:
        rt = api_pb2_grpc.RuntimeServiceStub(channel)
        config = pod_config("soak-" + secrets.token_hex(4), log_dir, cgroup_parent=cgroup_parent)
        pod_id = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config),
                                  timeout=120).pod_sandbox_id
        cid = rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, sandbox_config=config,
            config=container_config("c", node.image, ["sleep", "60"])),
            timeout=120).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
        rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1), timeout=120)
        rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120)
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)


def test_soak_cycles_leave_nothing_and_memory_stays_flat(load_node: Node,
                                                         tmp_path: Path) -> None:
    daemon = load_node.daemon
    assert daemon.process is not None
    pid = daemon.process.pid
    cgroup_parent = "/cripy-soak-" + secrets.token_hex(3)
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:  # warm-up: imports, caches, pools
            list(pool.map(lambda _: one_cycle(load_node, tmp_path, cgroup_parent),
                          range(CLIENTS * 2)))
        baseline_rss, baseline_fds = rss(pid), open_fds(pid)
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda _: one_cycle(load_node, tmp_path, cgroup_parent),
                          range(CYCLES)))
        growth = (rss(pid) - baseline_rss) / baseline_rss
        print(f"soak: {CYCLES} cycles, {CLIENTS} clients, RSS {baseline_rss >> 20} MiB -> "
              f"{rss(pid) >> 20} MiB ({growth:+.1%}), fds {baseline_fds} -> {open_fds(pid)}")
        assert growth < 0.10
        assert open_fds(pid) <= baseline_fds + 2
        assert leftovers(daemon, load_node.bridge, cgroup_parent) == []
        assert records(daemon) == []
    finally:
        remove_cgroup(cgroup_parent)


def test_a_burst_of_pods_all_succeed(load_node: Node, tmp_path: Path) -> None:
    daemon = load_node.daemon
    cgroup_parent = "/cripy-burst-" + secrets.token_hex(3)

    def run(i: int) -> str:
        config = pod_config(f"burst-{i}", tmp_path, cgroup_parent=cgroup_parent)
        return str(daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config),
                                                timeout=300).pod_sandbox_id)

    pod_ids: list[str] = []
    try:
        with ThreadPoolExecutor(BURST) as pool:
            pod_ids = list(pool.map(run, range(BURST)))
        ips = {daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(
            pod_sandbox_id=p)).status.network.ip for p in pod_ids}
        assert len(pod_ids) == BURST and len(ips) == BURST
    finally:
        for pod_id in pod_ids:
            daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                          timeout=120)
            daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                            timeout=120)
        leaks = leftovers(daemon, load_node.bridge, cgroup_parent)
        remove_cgroup(cgroup_parent)
    assert leaks == []
    assert records(daemon) == []

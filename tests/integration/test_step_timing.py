"""Per-step timing on a real daemon: PodSandboxStatus / ContainerStatus verbose info, `cripy
ctl inspect`, the step histograms on /metrics, and the records across a restart."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import Node, Pods, bridge_network, leftovers, remove_cgroup
from tests.support.registry import Registry, free_port

POD_STEPS = {"cgroup", "namespaces", "shm", "cni", "pod_files", "nri"}
CONTAINER_STEPS = {"image", "rootfs", "spec", "nri", "runc_create"}


@pytest.fixture
def timed(tmp_path: Path, registry: Registry, images: Any) -> Iterator[tuple[Pods, int]]:
    port = free_port()
    daemon = Daemon(tmp_path / "daemon", insecure_registries=[registry.host],
                    extra_config=f"[monitoring]\nmetrics_port = {port}\n")
    with bridge_network(daemon.cni_dir, tmp_path, 83) as bridge, daemon:
        daemon.pull(images.busybox.ref)
        pods = Pods(Node(daemon, bridge, images.busybox.ref, tmp_path), tmp_path / "logs")
        try:
            yield pods, port
        finally:
            pods.cleanup()
            leaks = leftovers(daemon, bridge, pods.cgroup_parent)
            remove_cgroup(pods.cgroup_parent)
            assert leaks == [], leaks


def pod_info(pods: Pods, pod_id: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(pods.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)).info["info"])
    return info


def container_info(pods: Pods, cid: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(pods.status(cid, verbose=True).info["info"])
    return info


def step_counts(port: int, metric: str) -> dict[str, float]:
    """labels -> count of histogram `metric`, e.g. {'step="cni"': 3.0}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith(f"{metric}_count{{"):
            labels, value = line[len(metric) + 7:].rsplit("} ", 1)
            counts[labels] = float(value)
    return counts


def test_verbose_status_reports_every_creation_step(timed: tuple[Pods, int]) -> None:
    pods, _ = timed
    started = time.perf_counter()
    pod_id = pods.run("timed")
    run_took = time.perf_counter() - started
    steps = pod_info(pods, pod_id)["creationSteps"]
    assert set(steps) == POD_STEPS
    assert all(seconds >= 0 for seconds in steps.values())
    assert 0 < sum(steps.values()) <= run_took
    assert steps["cni"] > 0 and steps["namespaces"] > 0

    config = pods.config(pod_id)
    started = time.perf_counter()
    cid = pods.create(pod_id, "c", ["sleep", "300"], start=False)
    create_took = time.perf_counter() - started
    created = container_info(pods, cid)["creationSteps"]
    assert set(created) == CONTAINER_STEPS
    assert all(seconds >= 0 for seconds in created.values())
    assert 0 < sum(created.values()) <= create_took
    started = time.perf_counter()
    pods.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    start_took = time.perf_counter() - started
    after_start = container_info(pods, cid)["creationSteps"]
    assert after_start == {**created, "start": after_start["start"]}
    assert 0 < after_start["start"] <= start_took
    assert config.metadata.name == "timed"

    # cripy ctl inspectp / inspect show them with the rest of the verbose info.
    shown_pod = json.loads(pods.node.daemon.ctl("inspectp", pod_id).stdout)
    assert shown_pod["info"]["info"]["creationSteps"] == steps
    shown = json.loads(pods.node.daemon.ctl("inspect", cid).stdout)
    assert shown["info"]["info"]["creationSteps"] == after_start

    # They are in the records: a restart reports the same figures.
    pods.node.daemon.restart()
    assert pod_info(pods, pod_id)["creationSteps"] == steps
    assert container_info(pods, cid)["creationSteps"] == after_start


def test_a_shared_pid_pod_reports_its_infra_process(timed: tuple[Pods, int]) -> None:
    pods, _ = timed
    started = time.perf_counter()
    pod_id = pods.run("shared", pid=pb.POD)
    took = time.perf_counter() - started
    steps = pod_info(pods, pod_id)["creationSteps"]
    assert set(steps) == POD_STEPS | {"infra"}
    assert steps["infra"] > 0 and sum(steps.values()) <= took


def test_metrics_count_each_step_once_per_pod_and_container(
        timed: tuple[Pods, int]) -> None:
    pods, port = timed
    n = 3
    ids = [pods.run(f"m{i}") for i in range(n)]
    for pod_id in ids:
        pods.create(pod_id, "c", ["sleep", "300"])
    pod_counts = step_counts(port, "cripy_pod_creation_step_seconds")
    assert pod_counts == {f'step="{step}"': n for step in POD_STEPS}
    container_counts = step_counts(port, "cripy_container_creation_step_seconds")
    assert container_counts == {f'step="{step}"': n for step in CONTAINER_STEPS | {"start"}}

    for pod_id in ids:
        pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        pods.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    teardown = step_counts(port, "cripy_pod_teardown_step_seconds")
    for step in ("containers", "nri", "cni", "shm", "namespaces", "record"):
        assert teardown[f'operation="StopPodSandbox",step="{step}"'] == n
    for step in ("containers", "pod_dir", "record"):
        assert teardown[f'operation="RemovePodSandbox",step="{step}"'] == n

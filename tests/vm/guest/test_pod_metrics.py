"""ListPodSandboxMetrics on cgroup v2, per cgroup driver: every cadvisor measure of a
container that does direct I/O, is CPU-throttled, hits its memory limit and holds files
and a socket open (tests/support/podmetrics.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.podmetrics import (
    MEMORY_LIMIT,
    PIDS_MAX,
    SWAP_LIMIT,
    check_metrics,
    container_metrics,
    exercise,
    loop_device,
    start_busy_container,
)
from tests.vm.guest.node import GuestPods, cgroup_file


# One driver: the measures come from the container's cgroup files wherever they are;
# finding that cgroup per driver is what test_cgroup_v2's stats check covers on both.
@pytest.mark.drivers("cgroupfs")
def test_every_cadvisor_measure_of_a_busy_container(pods: GuestPods, tmp_path: Path) -> None:
    subprocess.run(["modprobe", "loop"], capture_output=True, timeout=30)
    with loop_device(tmp_path) as loop:
        pod_id = pods.run("metrics-busy")
        cid = start_busy_container(pods, pod_id, loop)
        cgroup = pods.cgroup_dir(cid)
        # The kubelet sets pids.max on pod cgroups; here the container's own.
        (cgroup / "pids.max").write_text(f"{PIDS_MAX}\n")
        exercise(pods, cid)
        values = container_metrics(pods.runtime, pod_id, cid)
        # v2's memory.swap.max is swap alone: the CRI's memory + swap less the memory
        assert cgroup_file(cgroup, "memory.swap.max") == str(SWAP_LIMIT - MEMORY_LIMIT)
        check_metrics(values, loop, swap_limit=SWAP_LIMIT - MEMORY_LIMIT, cgroup_v2=True)
        pods.cleanup()

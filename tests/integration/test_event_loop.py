"""No blocking I/O on the event loop: a pod and container lifecycle on a daemon in
asyncio debug mode, which logs every callback that holds the loop over 50 ms."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import Node, Pods, bridge_network, leftovers, remove_cgroup
from tests.support.registry import Registry

SLOW = re.compile(r"Executing .* took \d+\.\d+ seconds")


def lifecycle(pods: Pods) -> None:
    pod_id = pods.run()
    cid = pods.create(pod_id, "c", ["sleep", "300"])
    assert pods.exec(cid, "echo", "hi").stdout == b"hi\n"
    assert pods.status(cid, verbose=True).status.state == pb.CONTAINER_RUNNING
    runtime = pods.runtime
    runtime.ListContainers(pb.ListContainersRequest())
    runtime.ListPodSandbox(pb.ListPodSandboxRequest())
    runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid))
    runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest())
    runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1), timeout=60)
    runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)


def test_a_lifecycle_never_blocks_the_event_loop(tmp_path: Path, registry: Registry,
                                                 images: Any) -> None:
    daemon = Daemon(tmp_path / "daemon", insecure_registries=[registry.host])
    with bridge_network(daemon.cni_dir, tmp_path, 90) as bridge:
        daemon.start(env={"PYTHONASYNCIODEBUG": "1"})
        pods = Pods(Node(daemon, bridge, images.busybox.ref, tmp_path), tmp_path / "logs")
        try:
            daemon.pull(images.busybox.ref)
            lifecycle(pods)  # warm: first-use costs (imports, caches) are not the point
            start = len(daemon.log_path.read_text(errors="replace"))
            for _ in range(3):
                lifecycle(pods)
            log = daemon.log_path.read_text(errors="replace")
            assert daemon.process is not None  # and it runs in debug mode:
            environ = Path(f"/proc/{daemon.process.pid}/environ").read_bytes().split(b"\0")
            assert b"PYTHONASYNCIODEBUG=1" in environ
            slow = SLOW.findall(log[start:])
            assert slow == [], "\n".join(slow)
        finally:
            pods.cleanup()
            leaks = leftovers(daemon, bridge, pods.cgroup_parent)
            daemon.stop()
            remove_cgroup(pods.cgroup_parent)
            assert leaks == [], leaks

"""Image volume helpers shared by the host tests and the VM guest checks."""

from __future__ import annotations

from pathlib import Path

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import Pods, container_config

VOLUME = "/vol"


def image_mount(image: str, container_path: str = VOLUME, sub_path: str = "",
                readonly: bool = True) -> pb.Mount:
    """A Mount as the kubelet sends it for an `image` volume."""
    return pb.Mount(container_path=container_path, image=pb.ImageSpec(image=image),
                    image_sub_path=sub_path, readonly=readonly)


def create_with_mounts(pods: Pods, pod_id: str, mounts: list[pb.Mount],
                       name: str = "c") -> str:
    """Create and start a busybox `sleep 300` container with `mounts`."""
    config = container_config(name, pods.node.image, ["sleep", "300"])
    config.mounts.extend(mounts)
    cid: str = pods.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pods.config(pod_id)),
        timeout=60).container_id
    pods.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    return cid


def exec_out(pods: Pods, cid: str, *cmd: str) -> str:
    """Stdout of a command that must succeed in the container."""
    result = pods.exec(cid, *cmd)
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


def volume_mounts(daemon: Daemon) -> list[str]:
    """The image volume overlays of `daemon` mounted on the host."""
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if str(daemon.workdir) in line and "/image-volumes/" in line.split()[1]]

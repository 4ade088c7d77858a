"""Image volumes on a cgroup v2 node with both handlers (runc, crun) and both cgroup
drivers: the image's merged content read-only at the mount path, a sub path, and no
overlay left after the container is removed."""

from __future__ import annotations

import pytest

from cripy.api import api_pb2 as pb
from tests.support.images import PushedImage, push_volume_data
from tests.support.registry import Registry
from tests.support.volumes import (
    VOLUME,
    create_with_mounts,
    exec_out,
    image_mount,
    volume_mounts,
)
from tests.vm.guest.node import GuestPods
from tests.vm.guest.test_crun import run_with


@pytest.fixture(scope="module")
def volume_image(registry: Registry) -> PushedImage:
    return push_volume_data(registry)


# Each handler on one driver, each driver once: image volumes are overlay mounts in the
# spec, which no cgroup driver touches.
@pytest.mark.parametrize("handler", [
    pytest.param("runc", marks=pytest.mark.drivers("cgroupfs")),
    pytest.param("crun", marks=pytest.mark.drivers("systemd"))])
def test_image_volumes_mount_read_only_and_go_with_the_container(
        pods: GuestPods, volume_image: PushedImage, handler: str) -> None:
    daemon = pods.node.daemon
    image_id = daemon.pull(volume_image.ref)
    pod_id = run_with(pods, handler, f"vol-{handler}")
    cid = create_with_mounts(pods, pod_id, [
        image_mount(volume_image.ref),
        image_mount(volume_image.ref, "/web", "current"),  # an in-image symlink
    ])
    assert exec_out(pods, cid, "cat", f"{VOLUME}/data/web/index.html") == "v2\n"
    assert exec_out(pods, cid, "ls", "/web").split() == ["index.html"]
    write = pods.exec(cid, "touch", f"{VOLUME}/new")
    assert write.exit_code != 0 and b"Read-only file system" in write.stderr
    assert [m.image.image_ref for m in pods.status(cid).status.mounts] == [image_id] * 2
    assert len(volume_mounts(daemon)) == 2
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    assert volume_mounts(daemon) == []

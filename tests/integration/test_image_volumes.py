"""Image volumes (Mount.image), pinned images and ImageSpec.runtime_handler on a real
daemon, runc and the tests' own registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.images import PushedImage, push_volume_data
from tests.support.pods import Node, Pods, bridge_network, container_config
from tests.support.registry import Registry
from tests.support.volumes import (
    VOLUME,
    create_with_mounts,
    exec_out,
    image_mount,
    volume_mounts,
)


@pytest.fixture(scope="module")
def volume_image(registry: Registry) -> PushedImage:
    return push_volume_data(registry)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry, images: Any,
         volume_image: PushedImage) -> Iterator[Node]:
    """A node pinning the volume image by a glob and busybox never (conftest's `pods`
    uses this one)."""
    tmp = tmp_path_factory.mktemp("image-volumes")
    daemon = Daemon(tmp / "daemon", insecure_registries=[registry.host], extra_config=(
        f'[image]\npinned_images = ["{registry.host}/volume-*", "*never-pushed*"]\n'))
    with bridge_network(daemon.cni_dir, tmp, 160) as bridge, daemon:
        daemon.pull(images.busybox.ref)
        yield Node(daemon, bridge, images.busybox.ref, tmp)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def remove_container(pods: Pods, cid: str) -> None:
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)


def remove_image(daemon: Daemon, image: str) -> None:
    daemon.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image)),
                              timeout=60)


def image_status(daemon: Daemon, image: str, handler: str = "") -> pb.Image:
    response: pb.ImageStatusResponse = daemon.images.ImageStatus(pb.ImageStatusRequest(
        image=pb.ImageSpec(image=image, runtime_handler=handler)))
    return response.image


# --- image volumes --------------------------------------------------------------------


def test_the_image_is_mounted_read_only_with_its_layers_merged(
        pods: Pods, volume_image: PushedImage) -> None:
    daemon = pods.node.daemon
    image_id = daemon.pull(volume_image.ref)
    cid = create_with_mounts(pods, pods.run("vol"), [image_mount(volume_image.ref)])

    assert exec_out(pods, cid, "cat", f"{VOLUME}/data/web/index.html") == "v2\n"
    assert exec_out(pods, cid, "cat", f"{VOLUME}/data/conf/app.conf") == "answer=42\n"
    assert exec_out(pods, cid, "ls", f"{VOLUME}/data/web").split() == ["index.html"]  # whiteout
    write = pods.exec(cid, "sh", "-c", f"echo x > {VOLUME}/new")
    assert write.exit_code != 0
    assert b"Read-only file system" in write.stderr
    assert pods.exec(cid, "rm", f"{VOLUME}/readme").exit_code != 0
    assert exec_out(pods, cid, "cat", f"{VOLUME}/readme") == "volume\n"

    # The client sees which content it got: the reference it asked for and the image ID.
    (mount,) = pods.status(cid).status.mounts
    assert mount.container_path == VOLUME
    assert mount.image.image == volume_image.ref
    assert mount.image.image_ref == image_id == volume_image.config_digest
    assert mount.readonly
    assert len(volume_mounts(daemon)) == 1

    remove_container(pods, cid)
    assert volume_mounts(daemon) == []


def test_sub_paths_mount_a_directory_a_file_or_an_in_image_symlink(
        pods: Pods, volume_image: PushedImage) -> None:
    pods.node.daemon.pull(volume_image.ref)
    one_layer = image_mount(pods.node.image, "/busybox", "bin")
    one_layer.propagation = pb.PROPAGATION_HOST_TO_CONTAINER  # nothing to carry: accepted
    cid = create_with_mounts(pods, pods.run("sub"), [
        image_mount(volume_image.ref, "/web", "data/web"),
        image_mount(volume_image.ref, "/etc/app.conf", "data/conf/app.conf"),
        image_mount(volume_image.ref, "/current", "current"),  # -> /data/web in the image
        one_layer,
    ])
    assert exec_out(pods, cid, "ls", "/web").split() == ["index.html"]
    assert exec_out(pods, cid, "cat", "/etc/app.conf") == "answer=42\n"
    assert exec_out(pods, cid, "cat", "/current/index.html") == "v2\n"
    assert "busybox" in exec_out(pods, cid, "ls", "/busybox").split()
    assert pods.exec(cid, "touch", "/web/x").exit_code != 0
    assert pods.exec(cid, "touch", "/busybox/x").exit_code != 0
    assert [m.image_sub_path for m in pods.status(cid).status.mounts] == [
        "data/web", "data/conf/app.conf", "current", "bin"]


@pytest.mark.parametrize(("mount", "code", "words"), [
    (lambda ref: image_mount(ref.replace("volume-data", "volume-absent")),
     grpc.StatusCode.NOT_FOUND, ["volume-absent", "not found: pull it first"]),
    (lambda ref: image_mount(ref, readonly=False), grpc.StatusCode.INVALID_ARGUMENT,
     ["read-only", VOLUME]),
    (lambda ref: image_mount(ref, sub_path="data/nope"), grpc.StatusCode.NOT_FOUND,
     ["data/nope", "does not exist"]),
    (lambda ref: image_mount(ref, sub_path="escape"), grpc.StatusCode.INVALID_ARGUMENT,
     ["escape", "leads out of the image"]),
    (lambda ref: image_mount(ref, sub_path="data/../.."), grpc.StatusCode.INVALID_ARGUMENT,
     ["'..'"]),
], ids=["not-pulled", "writable", "missing-sub-path", "symlink-escape", "dot-dot"])
def test_bad_image_mounts_are_refused_at_create(
        pods: Pods, volume_image: PushedImage, mount: Callable[[str], pb.Mount],
        code: grpc.StatusCode, words: list[str]) -> None:
    daemon = pods.node.daemon
    daemon.pull(volume_image.ref)
    pod_id = pods.run("bad")
    err = rpc_error(lambda: create_with_mounts(pods, pod_id, [mount(volume_image.ref)]))
    assert err.code() == code, err.details()
    for word in words:
        assert word in (err.details() or "")
    assert list(pods.runtime.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=pod_id))).containers) == []
    assert volume_mounts(daemon) == []


def test_an_image_in_use_by_a_volume_cannot_be_removed(
        pods: Pods, registry: Registry, volume_image: PushedImage) -> None:
    daemon = pods.node.daemon
    image_id = daemon.pull(volume_image.ref)
    cid = create_with_mounts(pods, pods.run("inuse"), [image_mount(volume_image.ref)], name="user")
    for name in (volume_image.ref, image_id):
        err = rpc_error(lambda name=name: remove_image(daemon, name))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert cid in (err.details() or "") and "user" in (err.details() or "")
    # Still there, counted, and still what the container sees.
    assert image_status(daemon, volume_image.ref).id == image_id
    listed = daemon.images.ListImages(pb.ListImagesRequest()).images
    assert image_id in [i.id for i in listed]
    (fs,) = daemon.images.ImageFsInfo(pb.ImageFsInfoRequest()).image_filesystems
    assert fs.used_bytes.value > 0
    assert exec_out(pods, cid, "cat", f"{VOLUME}/data/web/index.html") == "v2\n"

    remove_container(pods, cid)
    remove_image(daemon, volume_image.ref)
    assert not image_status(daemon, volume_image.ref).id
    layers = daemon.root / "image" / "layers"
    assert [d for d in volume_image.image.diff_ids
            if (layers / d.split(":")[1]).exists()] == []  # its layers were collected
    daemon.pull(volume_image.ref)  # pulls again fine: nothing half-removed


def test_volumes_survive_a_daemon_kill_and_are_unmounted_on_removal_after_it(
        pods: Pods, volume_image: PushedImage) -> None:
    daemon = pods.node.daemon
    daemon.pull(volume_image.ref)
    cid = create_with_mounts(pods, pods.run("kill"),
                             [image_mount(volume_image.ref, sub_path="data")])
    daemon.kill()
    daemon.start()
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    assert exec_out(pods, cid, "cat", f"{VOLUME}/web/index.html") == "v2\n"
    assert pods.status(cid).status.mounts[0].image.image_ref == volume_image.config_digest
    err = rpc_error(lambda: remove_image(daemon, volume_image.ref))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # known after the restart too
    remove_container(pods, cid)
    assert volume_mounts(daemon) == []


def test_a_crash_after_the_volume_mount_leaves_no_mount(
        pods: Pods, volume_image: PushedImage) -> None:
    daemon = pods.node.daemon
    daemon.pull(volume_image.ref)
    pod_id = pods.run("crash")
    sandbox_config = pods.config(pod_id)
    daemon.stop()
    daemon.start(crash_at="create-container-after-mount")
    config = container_config("c", pods.node.image, ["sleep", "300"])
    config.mounts.append(image_mount(volume_image.ref))
    err = rpc_error(lambda: daemon.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config), timeout=60))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert daemon.process is not None and daemon.process.wait(30) == -9
    assert len(volume_mounts(daemon)) == 1  # the crash left it
    daemon.start()
    assert volume_mounts(daemon) == []  # the restart's reconcile took it away
    assert list(daemon.runtime.ListContainers(pb.ListContainersRequest()).containers) == []
    remove_image(daemon, volume_image.ref)  # and nothing holds the image any more


# --- pinned images and runtime handlers -----------------------------------------------


def test_pinned_images_are_reported_and_may_still_be_removed(
        pods: Pods, volume_image: PushedImage) -> None:
    daemon = pods.node.daemon
    image_id = daemon.pull(volume_image.ref)
    assert image_status(daemon, volume_image.ref).pinned  # "<registry>/volume-*"
    assert not image_status(daemon, pods.node.image).pinned
    listed = {i.id: i.pinned for i in daemon.images.ListImages(pb.ListImagesRequest()).images}
    assert listed[image_id] is True
    assert listed[image_status(daemon, pods.node.image).id] is False
    table = daemon.ctl("images", "--pinned").stdout.splitlines()
    assert table[0].split()[-1] == "PINNED"
    pinned = {line.split()[0]: line.split()[-1] for line in table[1:]}
    assert pinned[volume_image.ref.rpartition(":")[0]] == "true"
    assert pinned[pods.node.image.rpartition(":")[0]] == "false"
    remove_image(daemon, volume_image.ref)  # pinned keeps the kubelet's GC away, not rmi
    assert not image_status(daemon, volume_image.ref).id


def test_image_rpcs_accept_configured_runtime_handlers_and_refuse_unknown_ones(
        pods: Pods, volume_image: PushedImage) -> None:
    daemon = pods.node.daemon
    for handler in ("", "runc", "crun"):
        image_id = daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(
            image=volume_image.ref, runtime_handler=handler)), timeout=120).image_ref
        assert image_status(daemon, volume_image.ref, handler).id == image_id
    spec = pb.ImageSpec(image=volume_image.ref, runtime_handler="kata")
    calls: list[Callable[[], Any]] = [
        lambda: daemon.images.PullImage(pb.PullImageRequest(image=spec), timeout=60),
        lambda: daemon.images.ImageStatus(pb.ImageStatusRequest(image=spec)),
        lambda: daemon.images.ListImages(pb.ListImagesRequest(
            filter=pb.ImageFilter(image=spec))),
        lambda: daemon.images.RemoveImage(pb.RemoveImageRequest(image=spec)),
    ]
    for call in calls:
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown runtime handler 'kata'" in (err.details() or "")
    assert image_status(daemon, volume_image.ref).id  # the refused remove removed nothing

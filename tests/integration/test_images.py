"""The ImageService against a real docker-registry, over the daemon's real socket."""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.images import (
    ImageConfig,
    ImageSpec,
    Layer,
    PushedImage,
    busybox_rootfs_layer,
    files_layer,
    push_big_image,
    push_busybox,
    push_image,
)
from tests.support.registry import Registry, unreachable_host


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory,
    registry: Registry,
    auth_registry: Registry,
    token_registry: Registry,
) -> Iterator[Daemon]:
    hosts = [registry.host, auth_registry.host, token_registry.host]
    with Daemon(tmp_path_factory.mktemp("images"), insecure_registries=hosts) as d:
        yield d


def status(daemon: Daemon, name: str, verbose: bool = False) -> pb.ImageStatusResponse:
    response: pb.ImageStatusResponse = daemon.images.ImageStatus(
        pb.ImageStatusRequest(image=pb.ImageSpec(image=name), verbose=verbose))
    return response


def listed(daemon: Daemon) -> dict[str, pb.Image]:
    return {i.id: i for i in daemon.images.ListImages(pb.ListImagesRequest()).images}


def remove(daemon: Daemon, name: str) -> None:
    daemon.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=name)))


def rpc_error(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value


def layer_dirs(daemon: Daemon) -> set[str]:
    return {p.name for p in (daemon.root / "image" / "layers").iterdir()}


# --- pulling --------------------------------------------------------------------------


def test_pull_by_tag_lists_tags_digests_size_and_config(daemon: Daemon, images: Any) -> None:
    busybox: PushedImage = images.busybox
    image_id = daemon.pull(busybox.ref)
    assert image_id == busybox.config_digest
    image = listed(daemon)[image_id]
    assert busybox.ref in image.repo_tags
    assert f"{busybox.name}@{busybox.digest}" in image.repo_digests
    assert image.size > 1_000_000  # busybox itself is over a megabyte
    found = status(daemon, busybox.ref, verbose=True)
    assert found.image.id == image_id
    assert not found.image.HasField("uid") and found.image.username == ""
    info = json.loads(found.info["info"])
    assert info["imageSpec"]["config"]["Cmd"] == ["sh"]
    assert info["imageSpec"]["rootfs"]["diff_ids"] == info["layers"]


def test_image_is_found_by_id_prefix_tag_and_digest(daemon: Daemon, images: Any) -> None:
    busybox: PushedImage = images.busybox
    image_id = daemon.pull(busybox.ref)
    hex_id = image_id.removeprefix("sha256:")
    for name in (image_id, hex_id, hex_id[:12], busybox.ref, busybox.digest_ref):
        assert status(daemon, name).image.id == image_id, name
    filtered = daemon.images.ListImages(pb.ListImagesRequest(
        filter=pb.ImageFilter(image=pb.ImageSpec(image=busybox.ref)))).images
    assert [i.id for i in filtered] == [image_id]


def test_pull_by_digest_adds_no_tag(daemon: Daemon, registry: Registry) -> None:
    pushed = push_busybox(registry, repo="bydigest", tag="v1")
    image_id = daemon.pull(pushed.digest_ref)
    image = status(daemon, image_id).image
    assert pushed.digest_ref in image.repo_digests
    assert pushed.ref not in image.repo_tags


def test_short_names_normalise_like_the_kubelet(daemon: Daemon) -> None:
    # docker.io is not reachable from here: the name must still be understood and
    # the error must be about reaching the registry, not about the reference.
    assert status(daemon, "busybox").HasField("image") is False
    err = rpc_error(daemon.images.PullImage, pb.PullImageRequest(
        image=pb.ImageSpec(image="127.0.0.1:1/library/busybox")))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def overlay_view(daemon: Daemon, image_id: str, mountpoint: Path) -> None:
    info = json.loads(status(daemon, image_id, verbose=True).info["info"])
    lowers = [str(daemon.root / "image" / "layers" / d.removeprefix("sha256:") / "diff")
              for d in reversed(info["layers"])]
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"ro,lowerdir={':'.join(lowers)}", str(mountpoint)], check=True)


def test_whiteouts_and_opaque_dirs_hide_lower_content(
    daemon: Daemon, images: Any, tmp_path: Path
) -> None:
    image_id = daemon.pull(images.multilayer.ref)
    rootfs = tmp_path / "rootfs"
    overlay_view(daemon, image_id, rootfs)
    try:
        data = rootfs / "data"
        assert not (data / "a").exists()
        assert (data / "b").exists()
        assert sorted(p.name for p in (data / "dir").iterdir()) == ["y"]
        assert (rootfs / "bin" / "busybox").stat().st_size > 1_000_000
    finally:
        subprocess.run(["umount", str(rootfs)], check=True)


def test_a_many_layer_pull_streams_every_layer_intact(
    daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    # Layers larger than the 8 MiB feed between download and unpack, several at once,
    # compressible and not, and a top layer whiting out a file of one below.
    blobs = {f"big/{i}.bin": random.Random(i).randbytes(9 * 1024 * 1024) for i in range(4)}
    text = "".join(f"line {i} of a compressible file\n" for i in range(400_000)).encode()
    layers = [Layer(busybox_rootfs_layer())]
    layers += [Layer(files_layer({name: data}), "gzip", level=1) for name, data in blobs.items()]
    layers.append(Layer(files_layer({"text/log.txt": text}), "gzip", level=9))
    layers.append(Layer(files_layer({"big/new.txt": b"new\n"}, whiteouts=["big/0.bin"])))
    pushed = push_image(registry, "streamed", "v1", ImageSpec(layers, ImageConfig()))
    image_id = daemon.pull(pushed.ref)
    rootfs = tmp_path / "rootfs"
    overlay_view(daemon, image_id, rootfs)
    try:
        assert not (rootfs / "big" / "0.bin").exists()
        for name in ("big/1.bin", "big/2.bin", "big/3.bin"):
            assert (rootfs / name).read_bytes() == blobs[name], name
        assert (rootfs / "text" / "log.txt").read_bytes() == text
        assert (rootfs / "big" / "new.txt").read_bytes() == b"new\n"
    finally:
        subprocess.run(["umount", str(rootfs)], check=True)
    assert list((daemon.root / "image" / "tmp").iterdir()) == []


def test_an_index_resolves_to_the_host_platform(
    daemon: Daemon, images: Any, tmp_path: Path
) -> None:
    index: PushedImage = images.index
    image_id = daemon.pull(index.ref)
    assert image_id == index.for_platform("amd64").config_digest
    assert image_id != index.for_platform("arm64").config_digest
    assert f"{index.name}@{index.digest}" in status(daemon, image_id).image.repo_digests
    rootfs = tmp_path / "rootfs"
    overlay_view(daemon, image_id, rootfs)
    try:
        assert "amd64" in (rootfs / "platform").read_text()
    finally:
        subprocess.run(["umount", str(rootfs)], check=True)


@pytest.mark.parametrize("kind", ["zstd", "uncompressed"])
def test_zstd_and_uncompressed_layers(daemon: Daemon, images: Any, kind: str) -> None:
    pushed: PushedImage = getattr(images, kind)
    assert daemon.pull(pushed.ref) == pushed.config_digest


def test_image_user_is_reported(daemon: Daemon, images: Any) -> None:
    uid_image = status(daemon, daemon.pull(images.user.ref)).image
    assert uid_image.uid.value == 1000 and uid_image.username == ""
    named = status(daemon, daemon.pull(images.username.ref)).image
    assert not named.HasField("uid") and named.username == "app"


def image_layers(daemon: Daemon, image_id: str) -> list[str]:
    info = json.loads(status(daemon, image_id, verbose=True).info["info"])
    return [d.removeprefix("sha256:") for d in info["layers"]]


def test_a_shared_layer_is_stored_once_and_removal_keeps_it(
    daemon: Daemon, registry: Registry
) -> None:
    # Two images built on the same busybox layer, pulled at the same time.
    first = push_busybox(registry, repo="shared-a")
    second = push_image(registry, "shared-b", "latest", ImageSpec(
        [Layer(busybox_rootfs_layer()), Layer(files_layer({"b.txt": b"b\n"}))],
        ImageConfig(cmd=["sh"])))
    with ThreadPoolExecutor(2) as pool:
        first_id, second_id = pool.map(daemon.pull, [first.ref, second.ref])
    (base,) = image_layers(daemon, first_id)
    base_again, top = image_layers(daemon, second_id)
    assert base == base_again
    assert {base, top} <= layer_dirs(daemon)
    remove(daemon, second.ref)
    assert second_id not in listed(daemon)
    assert top not in layer_dirs(daemon)
    assert base in layer_dirs(daemon)
    assert status(daemon, first.ref).image.id == first_id


def test_remove_by_tag_deletes_unused_layers_and_is_idempotent(
    daemon: Daemon, registry: Registry
) -> None:
    pushed = push_image(registry, "removeme", "v1", ImageSpec(
        [Layer(files_layer({"only-here.txt": b"unique content 8b1e\n"}))], ImageConfig()))
    image_id = daemon.pull(pushed.ref)
    layers = json.loads(status(daemon, image_id, verbose=True).info["info"])["layers"]
    remove(daemon, pushed.ref)
    assert image_id not in listed(daemon)
    assert not status(daemon, pushed.ref).HasField("image")
    assert all(d.removeprefix("sha256:") not in layer_dirs(daemon) for d in layers)
    remove(daemon, pushed.ref)  # removing what is gone succeeds, as the CRI asks
    remove(daemon, image_id)


def test_images_survive_a_daemon_restart(daemon: Daemon, images: Any) -> None:
    image_id = daemon.pull(images.busybox.ref)
    daemon.restart()
    assert status(daemon, images.busybox.ref).image.id == image_id


def test_image_fs_info_counts_the_store(daemon: Daemon, images: Any) -> None:
    daemon.pull(images.busybox.ref)
    info = daemon.images.ImageFsInfo(pb.ImageFsInfoRequest())
    (fs,) = info.image_filesystems
    assert fs.fs_id.mountpoint == str(daemon.root / "image")
    assert fs.used_bytes.value > 1_000_000
    assert fs.inodes_used.value > 10
    assert fs.timestamp > 0


# --- auth -----------------------------------------------------------------------------


def test_basic_auth_registry(daemon: Daemon, auth_registry: Registry) -> None:
    pushed = push_busybox(auth_registry, repo="private")
    err = rpc_error(daemon.pull, pushed.ref)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert auth_registry.host in (err.details() or "")
    err = rpc_error(daemon.pull, pushed.ref, "alice", "wrong")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert daemon.pull(pushed.ref, "alice", "wonderland") == pushed.config_digest


def test_bearer_token_registry(daemon: Daemon, token_registry: Registry) -> None:
    pushed = push_busybox(token_registry, repo="tokened")
    err = rpc_error(daemon.pull, pushed.ref)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    asked = token_registry.token_requests
    assert daemon.pull(pushed.ref, "alice", "wonderland") == pushed.config_digest
    assert token_registry.token_requests > asked


def test_auth_field_carries_base64_credentials(daemon: Daemon, auth_registry: Registry) -> None:
    pushed = push_busybox(auth_registry, repo="private-b64")
    request = pb.PullImageRequest(
        image=pb.ImageSpec(image=pushed.ref),
        auth=pb.AuthConfig(auth=base64.b64encode(b"alice:wonderland").decode()),
    )
    assert daemon.images.PullImage(request).image_ref == pushed.config_digest


# --- mirrors --------------------------------------------------------------------------


def test_a_mirror_serves_a_registry_that_is_down(
    tmp_path: Path, registry: Registry, images: Any
) -> None:
    down = unreachable_host()
    config = f'[registries."{down}"]\nmirrors = ["http://{registry.host}"]\ninsecure = true\n'
    with Daemon(tmp_path, extra_config=config) as d:
        ref = f"{down}/{images.busybox.repo}:{images.busybox.tag}"
        assert d.pull(ref) == images.busybox.config_digest
        assert ref in status(d, ref).image.repo_tags


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["", "UPPER/case", "a b", "busybox:bad tag!", "x@sha256:123",
                                 "/leading", "a" * 300])
def test_malformed_references_are_invalid_argument(daemon: Daemon, ref: str) -> None:
    err = rpc_error(daemon.pull, ref)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details()


def test_unknown_tag_and_repo_are_not_found(daemon: Daemon, registry: Registry) -> None:
    for ref in (f"{registry.host}/busybox:no-such-tag", f"{registry.host}/no/such/repo:1"):
        err = rpc_error(daemon.pull, ref)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        assert ref.split("/", 1)[1].split(":")[0] in (err.details() or "")


def test_unreachable_registry_is_unavailable(daemon: Daemon) -> None:
    host = unreachable_host()
    err = rpc_error(daemon.pull, f"{host}/busybox:latest")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert host in (err.details() or "")


def blob_file(registry: Registry, digest: str) -> Path:
    assert registry.dir is not None
    hexpart = digest.removeprefix("sha256:")
    return (registry.dir / "storage" / "docker" / "registry" / "v2" / "blobs" / "sha256"
            / hexpart[:2] / hexpart / "data")


def assert_nothing_half_stored(daemon: Daemon, before: set[str]) -> None:
    assert layer_dirs(daemon) == before
    assert list((daemon.root / "image" / "tmp").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_blob_is_refused_and_nothing_stored(
    daemon: Daemon, registry: Registry, damage: str
) -> None:
    pushed = push_image(registry, f"corrupt-{damage}", "v1", ImageSpec(
        [Layer(files_layer({f"{damage}.bin": bytes(range(256)) * 400}))], ImageConfig()))
    path = blob_file(registry, pushed.layer_digests[-1])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate"
                     else data[:-40] + bytes(b ^ 0xFF for b in data[-40:]))
    before = layer_dirs(daemon)
    err = rpc_error(daemon.pull, pushed.ref)
    assert err.code() == grpc.StatusCode.DATA_LOSS, err.details()
    assert pushed.layer_digests[-1] in (err.details() or "")
    if damage == "flip":
        assert "digest mismatch" in (err.details() or "")
    assert pushed.config_digest not in listed(daemon)
    assert_nothing_half_stored(daemon, before)
    path.write_bytes(data)  # repaired: the next pull succeeds
    assert daemon.pull(pushed.ref) == pushed.config_digest


def tar_of(*entries: tuple[str, bytes, str]) -> bytes:
    """A tar of (name, type, linkname) entries, written as given: no name cleaning."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, linkname in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = linkname
            payload = b"pwned\n" if kind == tarfile.REGTYPE else b""
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


REG, SYM, LNK = tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


@pytest.mark.parametrize(
    ("label", "layer"),
    [
        ("dotdot", tar_of(("../../cripy-escaped-dotdot", REG, ""))),
        ("absolute", tar_of(("/tmp/cripy-escaped-absolute", REG, ""))),
        ("symlink", tar_of(("evil", SYM, "/tmp"), ("evil/cripy-escaped-symlink", REG, ""))),
        ("hardlink", tar_of(("passwd", LNK, "/etc/passwd"))),
        ("hardlink-dotdot", tar_of(("passwd", LNK, "../../../../etc/passwd"))),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_layer_escaping_its_directory_is_refused(
    daemon: Daemon, registry: Registry, label: str, layer: bytes
) -> None:
    pushed = push_image(registry, f"hostile-{label}", "v1", ImageSpec(
        [Layer(files_layer({"fine.txt": b"fine\n"})), Layer(layer)], ImageConfig()))
    before = layer_dirs(daemon)
    err = rpc_error(daemon.pull, pushed.ref)
    assert err.code() == grpc.StatusCode.DATA_LOSS, err.details()
    for leaked in ("/tmp/cripy-escaped-absolute", "/tmp/cripy-escaped-symlink",
                   str(daemon.root / "image" / "cripy-escaped-dotdot"),
                   str(daemon.root / "image" / "layers" / "cripy-escaped-dotdot")):
        assert not Path(leaked).exists(), leaked
    assert pushed.config_digest not in listed(daemon)
    assert_nothing_half_stored(daemon, before)


def test_a_pull_killed_midway_leaves_nothing_and_the_next_succeeds(
    tmp_path: Path, registry: Registry
) -> None:
    ref = push_big_image(registry, total_mb=40, layers=4, repo="killed")
    with Daemon(tmp_path, insecure_registries=[registry.host]) as d:
        with ThreadPoolExecutor(1) as pool:
            pulling = pool.submit(d.pull, ref)
            staging = d.root / "image" / "tmp"
            deadline = time.monotonic() + 60
            while not any(staging.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            d.kill()
            with pytest.raises(grpc.RpcError):
                pulling.result()
        d.start()
        assert listed(d) == {}
        assert list((d.root / "image" / "layers").iterdir()) == []
        assert list((d.root / "image" / "tmp").iterdir()) == []
        image_id = d.pull(ref)
        assert status(d, ref).image.id == image_id

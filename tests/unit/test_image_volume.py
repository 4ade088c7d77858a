from __future__ import annotations

from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import InvalidArgumentError, NotFoundError
from cripy.image.store import ImageRecord
from cripy.storage.image_volume import (
    MountedVolume,
    check_image_mount,
    resolve_image_mounts,
    resolve_sub_path,
    volume_images,
    with_volume_binds,
)

IMAGE_ID = "sha256:" + "1" * 64


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """An image tree: /data/docs/readme, absolute and relative links, one leading out."""
    root = tmp_path / "image"
    (root / "data" / "docs").mkdir(parents=True)
    (root / "data" / "docs" / "readme").write_text("hi\n")
    (root / "opt").mkdir()
    (root / "opt" / "abs").symlink_to("/data/docs")  # absolute: relative to the image
    (root / "opt" / "rel").symlink_to("../data")
    (root / "opt" / "out").symlink_to("../../..")
    (root / "opt" / "loop").symlink_to("loop")
    return root


@pytest.mark.parametrize(("sub", "expected"), [
    ("", ""),
    ("data", "data"),
    ("./data//docs/", "data/docs"),
    ("data/docs/readme", "data/docs/readme"),
    ("opt/abs", "data/docs"),
    ("opt/rel/docs", "data/docs"),
])
def test_sub_paths_resolve_inside_the_image(image_root: Path, sub: str, expected: str) -> None:
    want = image_root.joinpath(*expected.split("/")) if expected else image_root
    assert resolve_sub_path(image_root, sub) == want


@pytest.mark.parametrize(("sub", "error", "message"), [
    ("missing", NotFoundError, "does not exist"),
    ("data/docs/readme/x", NotFoundError, "is not a directory"),
    ("/data", InvalidArgumentError, "must be a relative path"),
    ("data/../..", InvalidArgumentError, "must not contain '..'"),
    ("opt/out", InvalidArgumentError, "leads out of the image"),
    ("opt/loop", InvalidArgumentError, "too many levels of symlinks"),
])
def test_bad_sub_paths_are_refused(image_root: Path, sub: str, error: type[Exception],
                                   message: str) -> None:
    with pytest.raises(error, match=message):
        resolve_sub_path(image_root, sub)


def _mount(**kwargs: object) -> pb.Mount:
    fields: dict[str, object] = {"container_path": "/vol", "readonly": True,
                                 "image": pb.ImageSpec(image="reg.local/data:1")}
    fields.update(kwargs)
    return pb.Mount(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("mount", "message"), [
    (_mount(readonly=False), "read-only; the mount must set readonly: true"),
    (_mount(host_path="/etc"), "not both"),
    (_mount(uidMappings=[pb.IDMapping(host_id=1, container_id=0, length=1)]), "id-mapped"),
    (_mount(image_sub_path="../x"), "must not contain"),
    (_mount(propagation=pb.PROPAGATION_BIDIRECTIONAL), "bidirectional"),
])
def test_image_mounts_that_cannot_be_are_refused(mount: pb.Mount, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        check_image_mount(mount)


def test_resolved_config_names_the_image_id_and_unknown_images_are_not_found() -> None:
    record = ImageRecord(id=IMAGE_ID, manifest_digest=IMAGE_ID, layers=[], size=1)
    config = pb.ContainerConfig(mounts=[pb.Mount(container_path="/host", host_path="/tmp"),
                                        _mount()])
    resolved = resolve_image_mounts(config, lambda text: record)
    assert resolved.mounts[1].image.image == "reg.local/data:1"
    assert resolved.mounts[1].image.image_ref == IMAGE_ID
    assert volume_images(resolved) == [IMAGE_ID]
    assert not config.mounts[1].image.image_ref  # the request is left alone
    with pytest.raises(NotFoundError, match="image 'reg.local/data:1' not found: pull it"):
        resolve_image_mounts(config, lambda text: None)


def test_image_mounts_become_read_only_binds_of_their_volume(tmp_path: Path) -> None:
    config = pb.ContainerConfig(mounts=[_mount(image_sub_path="data")])
    config.mounts[0].propagation = pb.PROPAGATION_HOST_TO_CONTAINER
    bound = with_volume_binds(config, [MountedVolume(0, tmp_path / "data")])
    assert bound.mounts[0] == pb.Mount(container_path="/vol", host_path=str(tmp_path / "data"),
                                       readonly=True)

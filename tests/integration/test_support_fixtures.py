"""The registry and image helpers, checked against a real registry the way a puller
would see them."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import socket
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from tests.integration.conftest import PASSWORD, USER
from tests.support import images as img
from tests.support.images import ImageSet, PushedImage
from tests.support.registry import (
    BASIC_REALM,
    TOKEN_SERVICE,
    Registry,
    parse_scope,
    unreachable_host,
)

pytestmark = pytest.mark.integration


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def get_manifest(
    reg: Registry,
    repo: str,
    reference: str,
    *,
    auth: httpx.Auth | tuple[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return httpx.get(
        f"{reg.url}/v2/{repo}/manifests/{reference}",
        headers={"Accept": img.MANIFEST_ACCEPT, **(headers or {})},
        auth=auth,
        timeout=10,
    )


def get_blob(reg: Registry, repo: str, digest: str) -> bytes:
    response = httpx.get(f"{reg.url}/v2/{repo}/blobs/{digest}", timeout=30)
    assert response.status_code == 200, response.text
    assert sha256(response.content) == digest
    return response.content


def check_pushed(reg: Registry, pushed: PushedImage) -> dict[str, Any]:
    """The tag resolves to the pushed digest and media type; returns the manifest."""
    response = get_manifest(reg, pushed.repo, pushed.tag)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == pushed.media_type
    assert response.headers["docker-content-digest"] == pushed.digest
    assert sha256(response.content) == pushed.digest
    by_digest = get_manifest(reg, pushed.repo, pushed.digest)
    assert by_digest.status_code == 200
    assert by_digest.content == response.content
    manifest: dict[str, Any] = response.json()
    return manifest


def layer_names(tar_bytes: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return tar.getnames()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme, dict(re.findall(r'(\w+)="([^"]*)"', rest))


# -- anonymous registry, standard images -----------------------------------------------


def test_registry_answers(registry: Registry) -> None:
    assert registry.host.startswith("127.0.0.1:")
    assert registry.url == f"http://{registry.host}"
    response = httpx.get(f"{registry.url}/v2/", timeout=5)
    assert response.status_code == 200
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"


def test_busybox(registry: Registry, images: ImageSet) -> None:
    pushed = images.busybox
    assert pushed.ref == f"{registry.host}/busybox:latest"
    manifest = check_pushed(registry, pushed)
    assert manifest["mediaType"] == img.MEDIA_OCI_MANIFEST
    assert [layer["mediaType"] for layer in manifest["layers"]] == [img.MEDIA_OCI_LAYER_GZIP]
    assert manifest["config"]["digest"] == pushed.config_digest
    config = httpx.get(f"{registry.url}/v2/busybox/blobs/{pushed.config_digest}", timeout=10).json()
    assert config["config"]["Cmd"] == ["sh"]
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    blob = get_blob(registry, "busybox", pushed.layer_digests[0])
    tar = gzip.decompress(blob)
    assert sha256(tar) == config["rootfs"]["diff_ids"][0] == pushed.image.diff_ids[0]
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert members["bin/busybox"].isfile() and members["bin/busybox"].mode == 0o755
    for applet in ("sh", "echo", "cat", "ls", "sleep", "id", "true", "false", "env", "stat"):
        assert members[f"bin/{applet}"].issym()
        assert members[f"bin/{applet}"].linkname == "busybox"
    assert members["tmp"].mode == 0o1777
    assert {"etc/passwd", "etc/group", "root", "dev", "proc", "sys"} <= members.keys()
    assert all(m.mtime == img.FIXED_MTIME for m in members.values())
    assert {name for name, m in members.items() if (m.uid, m.gid) != (0, 0)} == {"home/app"}


def test_multilayer_whiteouts(registry: Registry, images: ImageSet) -> None:
    pushed = images.multilayer
    manifest = check_pushed(registry, pushed)
    assert len(manifest["layers"]) == 3
    assert manifest["layers"][0]["digest"] == images.busybox.layer_digests[0]
    second = layer_names(gzip.decompress(get_blob(registry, "multilayer", pushed.layer_digests[1])))
    assert {"data/a", "data/b", "data/dir/x"} <= set(second)
    third = layer_names(gzip.decompress(get_blob(registry, "multilayer", pushed.layer_digests[2])))
    assert "data/.wh.a" in third
    assert "data/dir/.wh..wh..opq" in third
    assert "data/dir/y" in third
    assert third.index("data/dir") < third.index("data/dir/.wh..wh..opq")


def test_two_platform_index(registry: Registry, images: ImageSet) -> None:
    pushed = images.index
    index = check_pushed(registry, pushed)
    assert index["mediaType"] == img.MEDIA_OCI_INDEX
    platforms = [(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]
    assert index["manifests"][1]["platform"]["variant"] == "v8"
    contents = set()
    for descriptor, built in zip(index["manifests"], pushed.images, strict=True):
        assert descriptor["digest"] == built.manifest_digest
        response = get_manifest(registry, "multiarch", descriptor["digest"])
        assert response.status_code == 200
        assert response.headers["content-type"] == img.MEDIA_OCI_MANIFEST
        child = response.json()
        # Base layer shared, /platform layer different.
        assert child["layers"][0]["digest"] == images.busybox.layer_digests[0]
        tar = gzip.decompress(get_blob(registry, "multiarch", child["layers"][1]["digest"]))
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            handle = tf.extractfile("platform")
            assert handle is not None
            contents.add(handle.read())
        config = httpx.get(
            f"{registry.url}/v2/multiarch/blobs/{child['config']['digest']}", timeout=10
        ).json()
        assert config["architecture"] == descriptor["platform"]["architecture"]
    assert contents == {b"linux/amd64\n", b"linux/arm64\n"}
    assert pushed.for_platform("arm64").variant == "v8"


def test_zstd_layers_stay_zstd(registry: Registry, images: ImageSet) -> None:
    pushed = images.zstd
    manifest = check_pushed(registry, pushed)
    assert [layer["mediaType"] for layer in manifest["layers"]] == [img.MEDIA_OCI_LAYER_ZSTD] * 2
    blob = get_blob(registry, "zstd", pushed.layer_digests[1])
    assert blob[:4] == b"\x28\xb5\x2f\xfd"
    tar = zstandard.ZstdDecompressor().decompress(blob)
    assert sha256(tar) == pushed.image.diff_ids[1]
    assert "zstd.txt" in layer_names(tar)


def test_uncompressed_layers(registry: Registry, images: ImageSet) -> None:
    pushed = images.uncompressed
    manifest = check_pushed(registry, pushed)
    assert [layer["mediaType"] for layer in manifest["layers"]] == [img.MEDIA_OCI_LAYER] * 2
    assert pushed.layer_digests == pushed.image.diff_ids
    assert "plain.txt" in layer_names(get_blob(registry, "uncompressed", pushed.layer_digests[1]))


def test_user_images(registry: Registry, images: ImageSet) -> None:
    for pushed, user in ((images.user, "1000"), (images.username, "app")):
        check_pushed(registry, pushed)
        assert pushed.ref == f"{registry.host}/user:{user}"
        assert pushed.image.config["config"]["User"] == user


def test_docker_schema2(registry: Registry, images: ImageSet) -> None:
    manifest = check_pushed(registry, images.docker)
    assert images.docker.media_type == img.MEDIA_DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == img.MEDIA_DOCKER_CONFIG
    assert manifest["layers"][0]["mediaType"] == img.MEDIA_DOCKER_LAYER_GZIP


def test_docker_manifest_list(registry: Registry) -> None:
    pushed = img.push_docker_schema2(registry, "docker-list", index=True)
    manifest = check_pushed(registry, pushed)
    assert manifest["mediaType"] == img.MEDIA_DOCKER_LIST
    assert len(manifest["manifests"]) == 2


def test_big_image_small(registry: Registry) -> None:
    ref = img.push_big_image(registry, total_mb=2, layers=2)
    repo, _, tag = ref.removeprefix(registry.host + "/").partition(":")
    response = get_manifest(registry, repo, tag)
    assert response.status_code == 200
    layers = response.json()["layers"]
    assert len(layers) == 3
    # Random data does not compress: each random layer's blob is about 1 MiB.
    assert all(layer["size"] > 1024 * 1024 for layer in layers[1:])


# -- building without a registry -------------------------------------------------------


def test_layouts_are_deterministic(tmp_path: Path) -> None:
    assert img.busybox_rootfs_layer() == img.busybox_rootfs_layer()
    assert img.random_layer(1000, 7) == img.random_layer(1000, 7)
    assert img.random_layer(1000, 7) != img.random_layer(1000, 8)
    spec = img.ImageSpec(
        [img.files_layer({"a": b"1"}), img.Layer(img.files_layer({"b": b"2"}), "zstd")],
        img.ImageConfig(
            cmd=["x"],
            entrypoint=["/bin/sh", "-c"],
            env=["A=1"],
            user="1:2",
            working_dir="/w",
            labels={"k": "v"},
            stop_signal="SIGINT",
        ),
    )
    first = img.build_layout(tmp_path / "one", spec)
    second = img.build_layout(tmp_path / "two", spec)
    assert first.digest == second.digest
    assert first.config_digests == second.config_digests
    assert first.layer_digests == second.layer_digests
    config = first.images[0].config["config"]
    assert config == {
        "Cmd": ["x"],
        "Entrypoint": ["/bin/sh", "-c"],
        "Env": ["A=1"],
        "User": "1:2",
        "WorkingDir": "/w",
        "Labels": {"k": "v"},
        "StopSignal": "SIGINT",
    }
    for digest in [first.digest, *first.config_digests, *first.layer_digests]:
        blob = (tmp_path / "one" / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
        assert sha256(blob) == digest
    assert img.compress(b"x", "zstd")[1] == img.MEDIA_OCI_LAYER_ZSTD
    with pytest.raises(FileExistsError):
        img.build_layout(tmp_path / "one", spec)


def test_parse_scope() -> None:
    assert parse_scope("repository:a/b:pull,push") == ("repository", "a/b", ["pull", "push"])
    assert parse_scope("repository:host:5000/a:pull") == ("repository", "host:5000/a", ["pull"])
    assert parse_scope("registry:catalog:*") == ("registry", "catalog", ["*"])
    assert parse_scope("nonsense") is None


# -- htpasswd registry -----------------------------------------------------------------


def test_htpasswd_registry(auth_registry: Registry) -> None:
    anonymous = httpx.get(f"{auth_registry.url}/v2/", timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == f'Basic realm="{BASIC_REALM}"'
    assert httpx.get(f"{auth_registry.url}/v2/", auth=(USER, "wrong"), timeout=5).status_code == 401

    pushed = img.push_busybox(auth_registry, "private/busybox")
    assert get_manifest(auth_registry, "private/busybox", "latest").status_code == 401
    response = get_manifest(auth_registry, "private/busybox", "latest", auth=(USER, PASSWORD))
    assert response.status_code == 200
    assert response.headers["content-type"] == img.MEDIA_OCI_MANIFEST
    assert response.headers["docker-content-digest"] == pushed.digest


def test_push_without_credentials_fails(auth_registry: Registry, tmp_path: Path) -> None:
    layout = img.build_layout(tmp_path / "l", img.ImageSpec([img.files_layer({"a": b"a"})]))
    with pytest.raises(subprocess.CalledProcessError):
        img.push(layout.path, auth_registry.ref("denied"))


# -- token registry --------------------------------------------------------------------


def test_token_registry(token_registry: Registry) -> None:
    reg = token_registry
    repo = "private/token-busybox"
    pushed = img.push_busybox(reg, repo)  # skopeo goes through the token flow
    assert reg.token_requests > 0

    # 1. Anonymous request: 401 with a Bearer challenge naming realm, service, scope.
    first = get_manifest(reg, repo, "latest")
    assert first.status_code == 401
    scheme, params = parse_challenge(first.headers["www-authenticate"])
    assert scheme == "Bearer"
    assert params["realm"] == reg.realm
    assert params["service"] == TOKEN_SERVICE == reg.service
    assert params["scope"] == f"repository:{repo}:pull"

    # 2. Ask the realm for a token with basic credentials.
    before = reg.token_requests
    token_response = httpx.get(
        params["realm"],
        params={"service": params["service"], "scope": params["scope"]},
        auth=(USER, PASSWORD),
        timeout=5,
    )
    assert token_response.status_code == 200
    body = token_response.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] > 0
    assert reg.token_requests == before + 1

    # 3. Retry with the bearer token.
    response = get_manifest(
        reg, repo, "latest", headers={"Authorization": f"Bearer {body['token']}"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == img.MEDIA_OCI_MANIFEST
    assert response.headers["docker-content-digest"] == pushed.digest

    # An anonymous token grants nothing: still 401.
    anonymous = httpx.get(
        params["realm"], params={"service": params["service"], "scope": params["scope"]}
    )
    assert anonymous.status_code == 200
    denied = get_manifest(
        reg, repo, "latest", headers={"Authorization": f"Bearer {anonymous.json()['token']}"}
    )
    assert denied.status_code == 401

    # Wrong credentials are refused by the token server.
    wrong = httpx.get(params["realm"], params={"service": params["service"]}, auth=(USER, "x"))
    assert wrong.status_code == 401


# -- lifecycle -------------------------------------------------------------------------


def test_registry_cleans_up() -> None:
    with Registry(token=("u", "p")) as reg:
        assert reg.running()
        directory = reg.dir
        assert directory is not None and directory.is_dir()
        realm = reg.realm
        assert realm is not None
    assert not reg.running()
    assert not directory.exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{reg.url}/v2/", timeout=2)
    with pytest.raises(httpx.TransportError):
        httpx.get(realm, timeout=2)


def test_unreachable_host() -> None:
    host, _, port = unreachable_host().partition(":")
    assert host == "127.0.0.1"
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 2):
        pass

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from cripy.errors import IntegrityError, InvalidArgumentError, NotFoundError
from cripy.image import manifest as m
from cripy.image.manifest import (
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    host_platform,
    parse_manifest,
    select_platform,
)


def dg(n: int) -> str:
    return "sha256:" + f"{n:02x}" * 32


OCI_MANIFEST: dict[str, Any] = {
    "schemaVersion": 2,
    "mediaType": m.OCI_MANIFEST,
    "config": {"mediaType": m.OCI_CONFIG, "digest": dg(1), "size": 581},
    "layers": [
        {"mediaType": m.OCI_LAYER_TAR_GZIP, "digest": dg(2), "size": 2152262},
        {"mediaType": m.OCI_LAYER_TAR_ZSTD, "digest": dg(3), "size": 12},
        {"mediaType": m.OCI_LAYER_TAR, "digest": dg(4), "size": 0},
    ],
    "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
}

DOCKER_MANIFEST: dict[str, Any] = {
    "schemaVersion": 2,
    "mediaType": m.DOCKER_MANIFEST,
    "config": {"mediaType": m.DOCKER_CONFIG, "size": 1457, "digest": dg(5)},
    "layers": [
        {"mediaType": m.DOCKER_LAYER_TAR_GZIP, "size": 2220094, "digest": dg(6)},
        {"mediaType": m.DOCKER_FOREIGN_LAYER_TAR_GZIP, "size": 10, "digest": dg(7),
         "urls": ["https://example.invalid/layer"]},
    ],
}


def index_entry(n: int, arch: str, variant: str | None = None, os: str = "linux",
                media_type: str = m.OCI_MANIFEST) -> dict[str, Any]:
    plat: dict[str, Any] = {"architecture": arch, "os": os}
    if variant is not None:
        plat["variant"] = variant
    return {"mediaType": media_type, "digest": dg(n), "size": 100 + n, "platform": plat}


OCI_INDEX: dict[str, Any] = {
    "schemaVersion": 2,
    "mediaType": m.OCI_INDEX,
    "manifests": [
        index_entry(10, "amd64"),
        index_entry(11, "arm", "v6"),
        index_entry(12, "arm", "v7"),
        index_entry(13, "arm64", "v8"),
        index_entry(14, "s390x"),
        index_entry(15, "amd64", os="windows"),
        # buildx attestation manifest: not a runnable platform
        {"mediaType": m.OCI_MANIFEST, "digest": dg(16), "size": 566,
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
         "platform": {"architecture": "unknown", "os": "unknown"}},
    ],
}

DOCKER_LIST: dict[str, Any] = {
    "schemaVersion": 2,
    "mediaType": m.DOCKER_MANIFEST_LIST,
    "manifests": [
        index_entry(20, "amd64", media_type=m.DOCKER_MANIFEST),
        index_entry(21, "arm64", media_type=m.DOCKER_MANIFEST),  # no variant
        index_entry(22, "arm", "v5", media_type=m.DOCKER_MANIFEST),
    ],
}


def raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=3).encode()


def test_oci_manifest() -> None:
    parsed = parse_manifest(raw(OCI_MANIFEST), m.OCI_MANIFEST)
    assert isinstance(parsed, ImageManifest)
    assert parsed.media_type == m.OCI_MANIFEST
    assert parsed.config == Descriptor(m.OCI_CONFIG, dg(1), 581)
    assert [layer.media_type for layer in parsed.layers] == [
        m.OCI_LAYER_TAR_GZIP, m.OCI_LAYER_TAR_ZSTD, m.OCI_LAYER_TAR]
    assert [layer.size for layer in parsed.layers] == [2152262, 12, 0]


def test_docker_manifest() -> None:
    parsed = parse_manifest(raw(DOCKER_MANIFEST), m.DOCKER_MANIFEST)
    assert isinstance(parsed, ImageManifest)
    assert parsed.config.media_type == m.DOCKER_CONFIG
    assert parsed.layers[1].media_type == m.DOCKER_FOREIGN_LAYER_TAR_GZIP


def test_oci_index() -> None:
    parsed = parse_manifest(raw(OCI_INDEX), m.OCI_INDEX)
    assert isinstance(parsed, ImageIndex)
    assert len(parsed.manifests) == 7
    assert parsed.manifests[3].platform == Platform("linux", "arm64", "v8")
    assert parsed.manifests[0].platform == Platform("linux", "amd64", None)


def test_docker_list() -> None:
    parsed = parse_manifest(raw(DOCKER_LIST), m.DOCKER_MANIFEST_LIST)
    assert isinstance(parsed, ImageIndex)
    assert parsed.media_type == m.DOCKER_MANIFEST_LIST


def test_body_media_type_wins_over_content_type() -> None:
    parsed = parse_manifest(raw(OCI_INDEX), "application/octet-stream")
    assert isinstance(parsed, ImageIndex)
    parsed2 = parse_manifest(raw(DOCKER_MANIFEST), f"{m.OCI_INDEX}; charset=utf-8")
    assert isinstance(parsed2, ImageManifest)
    assert parsed2.media_type == m.DOCKER_MANIFEST


def test_content_type_used_without_body_media_type() -> None:
    doc = dict(OCI_INDEX)
    del doc["mediaType"]
    parsed = parse_manifest(raw(doc), f"{m.OCI_INDEX}; charset=utf-8")
    assert isinstance(parsed, ImageIndex)
    assert parsed.media_type == m.OCI_INDEX


@pytest.mark.parametrize(("doc", "kind"), [(OCI_MANIFEST, ImageManifest),
                                           (OCI_INDEX, ImageIndex)])
def test_shape_decides_without_any_media_type(doc: dict[str, Any], kind: type) -> None:
    doc = {k: v for k, v in doc.items() if k != "mediaType"}
    assert isinstance(parse_manifest(raw(doc), "application/json"), kind)
    assert isinstance(parse_manifest(raw(doc), ""), kind)


def test_schema1_rejected() -> None:
    schema1 = {"schemaVersion": 1, "name": "library/busybox", "tag": "latest",
               "architecture": "amd64", "fsLayers": [], "history": []}
    with pytest.raises(InvalidArgumentError, match="schema1 manifests are not supported"):
        parse_manifest(raw(schema1), m.DOCKER_MANIFEST_V1_SIGNED)
    with pytest.raises(InvalidArgumentError, match="schema1 manifests are not supported"):
        parse_manifest(raw(schema1), "application/json")
    with pytest.raises(InvalidArgumentError, match="schema1 manifests are not supported"):
        parse_manifest(b"{}", m.DOCKER_MANIFEST_V1)


def with_(doc: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    """A deep copy of doc with doc[path...] = value (or deleted when value is DELETE)."""
    copy: Any = json.loads(json.dumps(doc))
    target = copy
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return dict(copy)


DELETE = object()

INTEGRITY_CASES: list[tuple[bytes, str]] = [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (raw(with_(OCI_MANIFEST, ["schemaVersion"], 3)), "schemaVersion"),
    (raw(with_(OCI_MANIFEST, ["schemaVersion"], DELETE)), "schemaVersion"),
    (raw(with_(OCI_MANIFEST, ["schemaVersion"], True)), "schemaVersion"),
    (raw(with_(OCI_MANIFEST, ["mediaType"], 7)), "mediaType must be a string"),
    (raw(with_(OCI_MANIFEST, ["config"], DELETE)), "manifest config"),
    (raw(with_(OCI_MANIFEST, ["config", "digest"], "sha256:1234")), "malformed digest"),
    (raw(with_(OCI_MANIFEST, ["config", "digest"], "sha256:" + "AB" * 32)),
     "malformed digest"),
    (raw(with_(OCI_MANIFEST, ["config", "digest"], None)), "digest must be a string"),
    (raw(with_(OCI_MANIFEST, ["layers", 0, "size"], -1)), "size"),
    (raw(with_(OCI_MANIFEST, ["layers", 0, "size"], "12")), "size"),
    (raw(with_(OCI_MANIFEST, ["layers", 0, "size"], 1.5)), "size"),
    (raw(with_(OCI_MANIFEST, ["layers", 0, "size"], True)), "size"),
    (raw(with_(OCI_MANIFEST, ["layers", 0, "size"], 2**64)), "size"),
    (raw(with_(OCI_MANIFEST, ["layers", 0, "mediaType"], "")), "mediaType"),
    (raw(with_(OCI_MANIFEST, ["layers"], {})), "layers must be a list"),
    (raw(with_(OCI_MANIFEST, ["layers", 1], "x")), "layers[1]"),
    (raw(with_(OCI_INDEX, ["manifests"], None)), "manifests must be a list"),
    (raw(with_(OCI_INDEX, ["manifests", 0, "platform"], "linux")), "platform"),
    (raw(with_(OCI_INDEX, ["manifests", 0, "platform", "os"], 1)), "platform"),
    (raw(with_(OCI_INDEX, ["manifests", 0, "platform", "variant"], 8)), "variant"),
]


@pytest.mark.parametrize(("data", "problem"), INTEGRITY_CASES,
                         ids=[f"{i}-{p}" for i, (_, p) in enumerate(INTEGRITY_CASES)])
def test_malformed_rejected(data: bytes, problem: str) -> None:
    with pytest.raises(IntegrityError, match=re.escape(problem)):
        parse_manifest(data, m.OCI_MANIFEST)


UNSUPPORTED_CASES: list[tuple[bytes, str]] = [
    (raw(with_(OCI_MANIFEST, ["mediaType"], "application/vnd.oci.artifact.manifest.v1+json")),
     "unsupported manifest media type"),
    (raw(with_(OCI_MANIFEST, ["config", "mediaType"],
               "application/vnd.cncf.helm.config.v1+json")), "not a container image"),
    (raw(with_(OCI_MANIFEST, ["layers", 0, "mediaType"], "application/x-tar")),
     "unsupported layer media type"),
    (raw(with_(OCI_MANIFEST, ["layers", 0, "digest"], "sha512:" + "ab" * 64)),
     "unsupported digest algorithm"),
]


@pytest.mark.parametrize(("data", "problem"), UNSUPPORTED_CASES,
                         ids=[p for _, p in UNSUPPORTED_CASES])
def test_unsupported_rejected(data: bytes, problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(problem)):
        parse_manifest(data, m.OCI_MANIFEST)


def test_unknown_type_from_header_only() -> None:
    doc = {"schemaVersion": 2, "foo": 1}
    with pytest.raises(InvalidArgumentError, match="unsupported manifest media type"):
        parse_manifest(raw(doc), "text/html")


def oci_index() -> ImageIndex:
    parsed = parse_manifest(raw(OCI_INDEX), m.OCI_INDEX)
    assert isinstance(parsed, ImageIndex)
    return parsed


def docker_list() -> ImageIndex:
    parsed = parse_manifest(raw(DOCKER_LIST), m.DOCKER_MANIFEST_LIST)
    assert isinstance(parsed, ImageIndex)
    return parsed


@pytest.mark.parametrize(("want", "digest"), [
    (Platform("linux", "amd64"), dg(10)),
    (Platform("linux", "amd64", "v1"), dg(10)),
    (Platform("linux", "arm64", "v8"), dg(13)),
    (Platform("linux", "arm64"), dg(13)),
    (Platform("linux", "arm", "v7"), dg(12)),
    (Platform("linux", "arm", "v6"), dg(11)),
    (Platform("linux", "arm"), dg(11)),  # no variant wanted: first arm entry
    (Platform("linux", "s390x"), dg(14)),
    (Platform("windows", "amd64"), dg(15)),
])
def test_select_platform_oci(want: Platform, digest: str) -> None:
    assert select_platform(oci_index(), want).digest == digest


@pytest.mark.parametrize(("want", "digest"), [
    (Platform("linux", "arm64", "v8"), dg(21)),  # entry without variant means v8
    (Platform("linux", "arm", "v7"), dg(22)),  # v7 CPU runs the v5 image
    (Platform("linux", "arm", "v5"), dg(22)),
])
def test_select_platform_variant_compat(want: Platform, digest: str) -> None:
    assert select_platform(docker_list(), want).digest == digest


@pytest.mark.parametrize("want", [
    Platform("linux", "ppc64le"),
    Platform("linux", "arm64", "v9"),
    Platform("linux", "arm", "v7"),  # checked against the index without arm entries
    Platform("darwin", "arm64"),
])
def test_select_platform_missing(want: Platform) -> None:
    index = oci_index() if want.architecture != "arm" else ImageIndex(
        m.OCI_INDEX, [d for d in oci_index().manifests
                      if d.platform and d.platform.architecture != "arm"])
    with pytest.raises(NotFoundError) as info:
        select_platform(index, want)
    message = str(info.value)
    assert str(want) in message
    assert "linux/amd64" in message and "linux/s390x" in message


def test_select_platform_ignores_non_manifests() -> None:
    index = ImageIndex(m.OCI_INDEX, [
        Descriptor(m.OCI_INDEX, dg(1), 10, Platform("linux", "amd64")),
        Descriptor("application/vnd.example+json", dg(2), 10, Platform("linux", "amd64")),
    ])
    with pytest.raises(NotFoundError, match="available: none"):
        select_platform(index, Platform("linux", "amd64"))


@pytest.mark.parametrize(("machine", "expected"), [
    ("x86_64", Platform("linux", "amd64")),
    ("aarch64", Platform("linux", "arm64", "v8")),
    ("armv7l", Platform("linux", "arm", "v7")),
    ("armv6l", Platform("linux", "arm", "v6")),
    ("i686", Platform("linux", "386")),
    ("ppc64le", Platform("linux", "ppc64le")),
    ("s390x", Platform("linux", "s390x")),
    ("riscv64", Platform("linux", "riscv64")),
])
def test_host_platform(monkeypatch: pytest.MonkeyPatch, machine: str,
                       expected: Platform) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)
    assert host_platform() == expected


def test_platform_str() -> None:
    assert str(Platform("linux", "arm", "v7")) == "linux/arm/v7"
    assert str(Platform("linux", "amd64")) == "linux/amd64"

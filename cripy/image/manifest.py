"""OCI / Docker schema2 manifests and indexes: media types, parsing, platforms (pure).

Everything here comes from a registry, so it is untrusted: structural damage (bad JSON,
wrong types, malformed digests or sizes) raises IntegrityError; well-formed content this
runtime cannot run (schema1, unknown media types, other digest algorithms) raises
InvalidArgumentError.
"""

from __future__ import annotations

import json
import platform as _platform
import re
from dataclasses import dataclass
from typing import Any

from cripy.errors import IntegrityError, InvalidArgumentError, NotFoundError

# --- media types ---------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_TAR_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_TAR_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
SCHEMA1_TYPES = frozenset({DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED})
LAYER_TYPES = frozenset({
    OCI_LAYER_TAR, OCI_LAYER_TAR_GZIP, OCI_LAYER_TAR_ZSTD,
    OCI_LAYER_ND_TAR, OCI_LAYER_ND_TAR_GZIP, OCI_LAYER_ND_TAR_ZSTD,
    DOCKER_LAYER_TAR_GZIP, DOCKER_FOREIGN_LAYER_TAR_GZIP,
})
GZIP_LAYER_TYPES = frozenset({
    OCI_LAYER_TAR_GZIP, OCI_LAYER_ND_TAR_GZIP, DOCKER_LAYER_TAR_GZIP,
    DOCKER_FOREIGN_LAYER_TAR_GZIP,
})
ZSTD_LAYER_TYPES = frozenset({OCI_LAYER_TAR_ZSTD, OCI_LAYER_ND_TAR_ZSTD})

# What a registry client asks for, most preferred first.
MANIFEST_ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)

_SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")
# The OCI digest grammar, for telling "another algorithm" from "garbage".
_ANY_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_MAX_SIZE = 2**63 - 1  # descriptor sizes are int64


# --- data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


@dataclass(frozen=True)
class ImageIndex:
    media_type: str
    manifests: list[Descriptor]


# --- parsing -------------------------------------------------------------------------


def check_digest(digest: object, what: str) -> str:
    """Return `digest` if it is sha256 + 64 lowercase hex, else raise naming `what`."""
    if not isinstance(digest, str):
        raise IntegrityError(f"{what}: digest must be a string, got {_json_type(digest)}")
    if _SHA256_RE.fullmatch(digest):
        return digest
    if _ANY_DIGEST_RE.fullmatch(digest) and not digest.startswith("sha256:"):
        raise InvalidArgumentError(
            f"{what}: unsupported digest algorithm in {digest!r} (only sha256)")
    raise IntegrityError(f"{what}: malformed digest {digest!r}")


def parse_manifest(data: bytes, content_type: str) -> ImageManifest | ImageIndex:
    """Parse a manifest or index body as served with `content_type`.

    The body's own `mediaType` wins over the Content-Type; when neither names a known
    type (OCI allows `mediaType` to be absent) the document's shape decides.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise IntegrityError(f"manifest must be a JSON object, got {_json_type(doc)}")

    body_type = doc.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise IntegrityError(f"manifest mediaType must be a string, got {_json_type(body_type)}")
    header_type = content_type.split(";", 1)[0].strip().lower()
    schema = doc.get("schemaVersion")
    if isinstance(schema, bool):
        raise IntegrityError(f"unsupported manifest schemaVersion {schema!r} (want 2)")
    if schema == 1 or body_type in SCHEMA1_TYPES or (
            body_type is None and header_type in SCHEMA1_TYPES):
        raise InvalidArgumentError(
            "schema1 manifests are not supported (the image must be pushed again as "
            "Docker schema2 or OCI)")
    if schema != 2:
        raise IntegrityError(f"unsupported manifest schemaVersion {schema!r} (want 2)")

    known = MANIFEST_TYPES | INDEX_TYPES
    if body_type:
        media_type = body_type
    elif header_type in known:
        media_type = header_type
    elif "manifests" in doc:
        media_type = OCI_INDEX
    elif "config" in doc:
        media_type = OCI_MANIFEST
    else:
        media_type = header_type
    if media_type not in known:
        raise InvalidArgumentError(f"unsupported manifest media type {media_type!r}")

    if media_type in INDEX_TYPES:
        raw = doc.get("manifests")
        if not isinstance(raw, list):
            raise IntegrityError("index: manifests must be a list")
        return ImageIndex(
            media_type=media_type,
            manifests=[_descriptor(d, f"index manifests[{i}]") for i, d in enumerate(raw)],
        )

    config = _descriptor(doc.get("config"), "manifest config")
    if config.media_type not in CONFIG_TYPES:
        raise InvalidArgumentError(
            f"manifest config has media type {config.media_type!r}: not a container image")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise IntegrityError("manifest: layers must be a list")
    layers = [_descriptor(d, f"manifest layers[{i}]") for i, d in enumerate(raw_layers)]
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise InvalidArgumentError(
                f"manifest layers[{i}]: unsupported layer media type {layer.media_type!r}")
    return ImageManifest(media_type=media_type, config=config, layers=layers)


def _descriptor(raw: object, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise IntegrityError(f"{what}: descriptor must be an object, got {_json_type(raw)}")
    media_type = raw.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise IntegrityError(f"{what}: mediaType must be a non-empty string")
    digest = check_digest(raw.get("digest"), what)
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_SIZE:
        raise IntegrityError(f"{what}: size must be a non-negative integer, got {size!r}")
    plat = raw.get("platform")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        platform=None if plat is None else _platform_of(plat, what),
    )


def _platform_of(raw: object, what: str) -> Platform:
    if not isinstance(raw, dict):
        raise IntegrityError(f"{what}: platform must be an object")
    os_name = raw.get("os")
    arch = raw.get("architecture")
    variant = raw.get("variant")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        raise IntegrityError(f"{what}: platform os and architecture must be strings")
    if variant is not None and not isinstance(variant, str):
        raise IntegrityError(f"{what}: platform variant must be a string")
    return Platform(os=os_name, architecture=arch, variant=variant or None)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# --- platforms -----------------------------------------------------------------------

# platform.machine() -> (GOARCH, variant)
_MACHINE_ARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v7"),  # 32-bit userland on a 64-bit core
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "armv5tejl": ("arm", "v5"),
    "i386": ("386", None),
    "i486": ("386", None),
    "i586": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "ppc64": ("ppc64", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "loongarch64": ("loong64", None),
    "mips64": ("mips64", None),
    "mips64el": ("mips64le", None),
}


def host_platform() -> Platform:
    machine = _platform.machine().lower()
    arch, variant = _MACHINE_ARCH.get(machine, (machine, None))
    return Platform(os="linux", architecture=arch, variant=variant)


def _normal_variant(arch: str, variant: str | None) -> str | None:
    """Variants that mean "the default" are spelled the same way on both sides."""
    if arch == "arm64" and variant in (None, "", "v8"):
        return "v8"
    if arch == "arm" and not variant:
        return "v7"
    if arch == "amd64" and variant in (None, "", "v1"):
        return None
    return variant or None


def select_platform(index: ImageIndex, want: Platform) -> Descriptor:
    """The image manifest in `index` for `want` (os + architecture, and variant if given).

    An exact variant match wins; for 32-bit arm an older variant the CPU can run
    (v7 -> v6 -> v5) is accepted next.
    """
    candidates = [
        d for d in index.manifests
        if d.media_type in MANIFEST_TYPES and d.platform is not None
        and d.platform.os == want.os and d.platform.architecture == want.architecture
    ]
    if not want.variant:
        if candidates:
            return candidates[0]
    else:
        first = _normal_variant(want.architecture, want.variant)
        wanted: list[str | None] = [first]
        arm_order: list[str | None] = ["v8", "v7", "v6", "v5"]
        if want.architecture == "arm" and first in arm_order:
            wanted = arm_order[arm_order.index(first):]
        for variant in wanted:
            for d in candidates:
                assert d.platform is not None
                if _normal_variant(d.platform.architecture, d.platform.variant) == variant:
                    return d
    available = sorted({
        str(d.platform) for d in index.manifests
        if d.platform is not None and d.media_type in MANIFEST_TYPES
    })
    raise NotFoundError(
        f"no image for platform {want} in the manifest list; available: "
        f"{', '.join(available) if available else 'none'}")

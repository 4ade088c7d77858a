"""Test images built locally: deterministic layer tars, OCI image layouts, skopeo push.

Nothing is pulled from the internet. Layers are uncompressed tar bytes built with fixed
mtimes and uid/gid 0 (unless asked otherwise), so the same call gives the same digests.
``build_layout`` writes an OCI image layout (one image, or an image index of several
platform images); ``push`` copies it to a registry with ``skopeo copy
--preserve-digests``, so the digests computed here are the digests the registry serves.
The ``push_*`` functions build and push the images the test-suite uses.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import zstandard

SKOPEO_BINARY = "/usr/bin/skopeo"
BUSYBOX_BINARY = "/bin/busybox"

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

#: Accept header that asks a registry for any manifest kind we produce.
MANIFEST_ACCEPT = ", ".join(
    [
        MEDIA_OCI_INDEX,
        MEDIA_OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Fixed timestamp for tar entries and image configs (2020-01-01T00:00:00Z).
FIXED_MTIME = 1577836800
FIXED_CREATED = "2020-01-01T00:00:00Z"

Compression = Literal["gzip", "zstd", "none"]
#: "oci": OCI media types; "docker": Docker schema 2 manifest / manifest list types.
ManifestFormat = Literal["oci", "docker"]

#: Applets linked to /bin/busybox in ``busybox_rootfs_layer``.
BUSYBOX_APPLETS: tuple[str, ...] = (
    "[", "ash", "awk", "basename", "cat", "chgrp", "chmod", "chown", "cp", "cut", "date",
    "dd", "df", "dirname", "du", "echo", "env", "expr", "false", "find", "free", "grep",
    "groups", "gunzip", "gzip", "head", "hostname", "id", "ip", "kill", "killall", "ln",
    "ls", "md5sum", "mkdir", "mkfifo", "mknod", "mktemp", "more", "mount", "mv", "nc",
    "netstat", "nproc", "nslookup", "od", "pidof", "ping", "printf", "ps", "pwd",
    "readlink", "realpath", "rm", "rmdir", "sed", "seq", "setsid", "sh", "sha256sum",
    "sleep", "sort", "stat", "sync", "tail", "tar", "tee", "test", "timeout", "top",
    "touch", "tr", "true", "umount", "uname", "uniq", "unshare", "uptime", "usleep", "vi",
    "watch", "wc", "wget", "which", "whoami", "xargs", "yes",
)  # fmt: skip

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\nusers:x:100:app\napp:x:1000:\nnogroup:x:65534:\n"

__all__ = [
    "BUSYBOX_APPLETS",
    "BuiltImage",
    "BuiltLayout",
    "Compression",
    "FileEntry",
    "ImageSet",
    "ImageConfig",
    "ImageSpec",
    "Layer",
    "MANIFEST_ACCEPT",
    "ManifestFormat",
    "PushedImage",
    "RegistryLike",
    "build_layout",
    "busybox_rootfs_layer",
    "compress",
    "files_layer",
    "layer_media_type",
    "push",
    "push_big_image",
    "push_busybox",
    "push_docker_schema2",
    "push_image",
    "push_standard_images",
    "push_multilayer_whiteouts",
    "push_two_platform_index",
    "push_uncompressed",
    "push_volume_data",
    "push_with_user",
    "push_with_username",
    "push_zstd",
    "random_layer",
    "sha256_digest",
]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------
# layer tars


@dataclass(frozen=True)
class FileEntry:
    """A regular file with explicit metadata, for ``files_layer``."""

    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


class _TarWriter:
    """Collects entries, then writes them sorted by path (parents first)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    @staticmethod
    def _name(path: str) -> str:
        name = path.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"bad path in layer: {path!r}")
        return name

    def _info(self, path: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self._name(path))
        info.type = kind
        info.mode = mode
        info.uid = uid
        info.gid = gid
        info.uname = "root" if uid == 0 else ""
        info.gname = "root" if gid == 0 else ""
        info.mtime = FIXED_MTIME
        return info

    def has(self, path: str) -> bool:
        return self._name(path) in self._entries

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        info = self._info(path, tarfile.DIRTYPE, mode, uid, gid)
        self._entries[info.name] = (info, None)

    def file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        info = self._info(path, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(data)
        self._entries[info.name] = (info, data)

    def symlink(self, path: str, target: str) -> None:
        info = self._info(path, tarfile.SYMTYPE, 0o777, 0, 0)
        info.linkname = target
        self._entries[info.name] = (info, None)

    def hardlink(self, path: str, target: str) -> None:
        info = self._info(path, tarfile.LNKTYPE, 0o644, 0, 0)
        info.linkname = self._name(target)
        self._entries[info.name] = (info, None)

    def parents(self, mode: int = 0o755) -> None:
        """Add a directory entry for every missing parent of every entry."""
        for name in list(self._entries):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                parent = "/".join(parts[:i])
                if parent not in self._entries:
                    self.dir(parent, mode)

    def tobytes(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            # Sorting by path components puts every directory before its contents;
            # hard links go last so that their targets are already unpacked.
            def order(name: str) -> tuple[bool, list[str]]:
                return self._entries[name][0].type == tarfile.LNKTYPE, name.split("/")

            for name in sorted(self._entries, key=order):
                info, data = self._entries[name]
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def busybox_rootfs_layer(*, extra_files: Mapping[str, bytes] | None = None) -> bytes:
    """A minimal root filesystem: static busybox, applet symlinks, users and dirs.

    /bin/busybox (copied from the host), /bin/<applet> -> busybox for BUSYBOX_APPLETS,
    /usr/bin/env -> /bin/busybox, /etc/passwd (root, app 1000:1000, nobody 65534),
    /etc/group (root, users(100, member app), app, nogroup), /tmp (1777), /root (0700),
    /home/app (owned by 1000:1000), /dev /proc /sys /etc /run /var dirs.
    """
    w = _TarWriter()
    for d in ("bin", "dev", "etc", "home", "proc", "run", "sys", "usr", "usr/bin", "var"):
        w.dir(d)
    w.dir("tmp", 0o1777)
    w.dir("root", 0o700)
    w.dir("home/app", 0o755, 1000, 1000)
    w.file("bin/busybox", Path(BUSYBOX_BINARY).read_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        w.symlink(f"bin/{applet}", "busybox")
    w.symlink("usr/bin/env", "/bin/busybox")
    w.file("etc/passwd", PASSWD.encode())
    w.file("etc/group", GROUP.encode())
    w.file("etc/hostname", b"cripy-test\n")
    for path, data in (extra_files or {}).items():
        w.file(path, data)
    w.parents()
    return w.tobytes()


def files_layer(
    files: Mapping[str, bytes | FileEntry],
    whiteouts: Iterable[str] = (),
    opaque_dirs: Iterable[str] = (),
    dirs: Mapping[str, int] | Iterable[str] = (),
    symlinks: Mapping[str, str] | None = None,
    hardlinks: Mapping[str, str] | None = None,
    *,
    parents: bool = True,
) -> bytes:
    """A layer of the given files, directories and links, with OCI whiteouts.

    ``whiteouts``: paths deleted by this layer (written as ``dir/.wh.name``).
    ``opaque_dirs``: directories whose lower contents are hidden (``dir/.wh..wh..opq``);
    the directory entry itself is written too. ``dirs``: paths (mode 0755) or a mapping
    path -> mode. ``symlinks``/``hardlinks``: link path -> target. With ``parents`` (the
    default) missing parent directories get entries with mode 0755 -- note that such an
    entry replaces the metadata of a lower layer's directory of the same path.
    """
    w = _TarWriter()
    dir_modes = dict(dirs) if isinstance(dirs, Mapping) else {d: 0o755 for d in dirs}
    for path, mode in dir_modes.items():
        w.dir(path, mode)
    for path in opaque_dirs:
        if not w.has(path):
            w.dir(path)
        w.file(f"{path.strip('/')}/.wh..wh..opq", b"", 0o644)
    for path in whiteouts:
        parent, _, name = path.strip("/").rpartition("/")
        w.file(f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"", 0o644)
    for path, content in files.items():
        if isinstance(content, FileEntry):
            w.file(path, content.data, content.mode, content.uid, content.gid)
        else:
            w.file(path, content)
    for path, target in (symlinks or {}).items():
        w.symlink(path, target)
    for path, target in (hardlinks or {}).items():
        w.hardlink(path, target)
    if parents:
        w.parents()
    return w.tobytes()


def random_layer(size_bytes: int, seed: int, *, files: int = 4, prefix: str = "random") -> bytes:
    """Incompressible content: ``size_bytes`` of seeded random data in a few files."""
    rng = random.Random(seed)
    w = _TarWriter()
    count = max(1, min(files, size_bytes)) if size_bytes > 0 else 1
    base, extra = divmod(size_bytes, count)
    for i in range(count):
        w.file(f"{prefix}/{seed}-{i}.bin", rng.randbytes(base + (1 if i < extra else 0)))
    w.parents()
    return w.tobytes()


def layer_media_type(kind: Compression, fmt: ManifestFormat = "oci") -> str:
    if fmt == "docker":
        if kind == "zstd":
            raise ValueError("Docker schema 2 has no zstd layer media type")
        return MEDIA_DOCKER_LAYER_GZIP if kind == "gzip" else MEDIA_DOCKER_LAYER
    return {"gzip": MEDIA_OCI_LAYER_GZIP, "zstd": MEDIA_OCI_LAYER_ZSTD, "none": MEDIA_OCI_LAYER}[
        kind
    ]


def compress(tar: bytes, kind: Compression, *, level: int | None = None) -> tuple[bytes, str]:
    """Compress a layer tar; returns (blob, OCI layer media type). Deterministic."""
    if kind == "gzip":
        data = gzip.compress(tar, compresslevel=6 if level is None else level, mtime=0)
    elif kind == "zstd":
        data = zstandard.ZstdCompressor(level=3 if level is None else level).compress(tar)
    elif kind == "none":
        data = tar
    else:
        raise ValueError(f"unknown compression {kind!r}")
    return data, layer_media_type(kind)


# --------------------------------------------------------------------------------------
# OCI image layouts


@dataclass(frozen=True)
class ImageConfig:
    """The ``config`` section of an OCI image config (None/empty = left out)."""

    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH_ENV])
    user: str | None = None
    working_dir: str | None = None
    labels: dict[str, str] | None = None
    stop_signal: str | None = None
    exposed_ports: list[str] | None = None
    volumes: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.env:
            out["Env"] = list(self.env)
        if self.entrypoint is not None:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            out["Cmd"] = list(self.cmd)
        if self.user is not None:
            out["User"] = self.user
        if self.working_dir is not None:
            out["WorkingDir"] = self.working_dir
        if self.labels:
            out["Labels"] = dict(self.labels)
        if self.stop_signal is not None:
            out["StopSignal"] = self.stop_signal
        if self.exposed_ports:
            out["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        if self.volumes:
            out["Volumes"] = {v: {} for v in self.volumes}
        return out


@dataclass(frozen=True)
class Layer:
    """An uncompressed layer tar and how to store it."""

    tar: bytes
    compression: Compression = "gzip"
    level: int | None = None


@dataclass(frozen=True)
class ImageSpec:
    """One platform image: layers (bottom first) and config."""

    layers: Sequence[bytes | Layer]
    config: ImageConfig = field(default_factory=ImageConfig)
    architecture: str = "amd64"
    os: str = "linux"
    variant: str | None = None
    #: compression for layers given as plain bytes
    compression: Compression = "gzip"
    annotations: dict[str, str] | None = None


@dataclass(frozen=True)
class BuiltImage:
    """Digests of one image manifest written into a layout."""

    manifest_digest: str
    manifest_size: int
    manifest_media_type: str
    config_digest: str
    layer_digests: list[str]
    layer_media_types: list[str]
    layer_sizes: list[int]
    diff_ids: list[str]
    architecture: str
    os: str
    variant: str | None
    manifest: dict[str, Any]
    config: dict[str, Any]

    @property
    def platform(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True)
class BuiltLayout:
    """An OCI image layout on disk and the digests in it."""

    path: Path
    #: digest of the top-level manifest (single image) or image index
    digest: str
    media_type: str
    size: int
    images: list[BuiltImage]

    @property
    def is_index(self) -> bool:
        return self.media_type in (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)

    @property
    def config_digests(self) -> list[str]:
        return [i.config_digest for i in self.images]

    @property
    def layer_digests(self) -> list[str]:
        """Distinct layer blob digests over all images, in first-seen order."""
        seen: dict[str, None] = {}
        for image in self.images:
            for d in image.layer_digests:
                seen.setdefault(d, None)
        return list(seen)


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _write_blob(blobs: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = blobs / digest.removeprefix("sha256:")
    if not path.exists():
        path.write_bytes(data)
    return digest


def _build_image(blobs: Path, spec: ImageSpec, fmt: ManifestFormat) -> BuiltImage:
    layer_descs: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    history: list[dict[str, Any]] = []
    for i, item in enumerate(spec.layers):
        layer = item if isinstance(item, Layer) else Layer(item, spec.compression)
        blob, _ = compress(layer.tar, layer.compression, level=layer.level)
        media_type = layer_media_type(layer.compression, fmt)
        digest = _write_blob(blobs, blob)
        layer_descs.append({"mediaType": media_type, "digest": digest, "size": len(blob)})
        diff_ids.append(sha256_digest(layer.tar))
        history.append({"created": FIXED_CREATED, "created_by": f"cripy test layer {i}"})
    config: dict[str, Any] = {
        "created": FIXED_CREATED,
        "architecture": spec.architecture,
        "os": spec.os,
        "config": spec.config.to_json(),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    if spec.variant:
        config["variant"] = spec.variant
    config_bytes = _canonical_json(config)
    config_digest = _write_blob(blobs, config_bytes)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_DOCKER_MANIFEST if fmt == "docker" else MEDIA_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_DOCKER_CONFIG if fmt == "docker" else MEDIA_OCI_CONFIG,
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": layer_descs,
    }
    if spec.annotations:
        manifest["annotations"] = dict(spec.annotations)
    manifest_bytes = _canonical_json(manifest)
    manifest_digest = _write_blob(blobs, manifest_bytes)
    return BuiltImage(
        manifest_digest=manifest_digest,
        manifest_size=len(manifest_bytes),
        manifest_media_type=manifest["mediaType"],
        config_digest=config_digest,
        layer_digests=[d["digest"] for d in layer_descs],
        layer_media_types=[d["mediaType"] for d in layer_descs],
        layer_sizes=[d["size"] for d in layer_descs],
        diff_ids=diff_ids,
        architecture=spec.architecture,
        os=spec.os,
        variant=spec.variant,
        manifest=manifest,
        config=config,
    )


def build_layout(
    directory: str | Path,
    images: ImageSpec | Sequence[ImageSpec],
    *,
    tag: str = "latest",
    fmt: ManifestFormat = "oci",
) -> BuiltLayout:
    """Write an OCI image layout for one image or an image index.

    A single ``ImageSpec`` gives a layout whose index.json points at one image manifest;
    a sequence gives an image index with one manifest descriptor (with ``platform``) per
    spec. ``directory`` is created if needed and must not already hold a layout.
    ``fmt="docker"`` writes Docker schema 2 manifests / a manifest list instead (no zstd).
    """
    root = Path(directory)
    blobs = root / "blobs" / "sha256"
    if (root / "index.json").exists():
        raise FileExistsError(f"{root} already holds an OCI layout")
    blobs.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    if isinstance(images, ImageSpec):
        built = [_build_image(blobs, images, fmt)]
        top_media, top_digest, top_size = (
            built[0].manifest_media_type,
            built[0].manifest_digest,
            built[0].manifest_size,
        )
    else:
        if not images:
            raise ValueError("an image index needs at least one image")
        built = [_build_image(blobs, spec, fmt) for spec in images]
        manifests: list[dict[str, Any]] = []
        for image in built:
            platform: dict[str, Any] = {"architecture": image.architecture, "os": image.os}
            if image.variant:
                platform["variant"] = image.variant
            manifests.append(
                {
                    "mediaType": image.manifest_media_type,
                    "digest": image.manifest_digest,
                    "size": image.manifest_size,
                    "platform": platform,
                }
            )
        list_media = MEDIA_DOCKER_LIST if fmt == "docker" else MEDIA_OCI_INDEX
        index = {"schemaVersion": 2, "mediaType": list_media, "manifests": manifests}
        index_bytes = _canonical_json(index)
        top_media, top_digest, top_size = (
            list_media,
            _write_blob(blobs, index_bytes),
            len(index_bytes),
        )
    layout_index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_INDEX,
        "manifests": [
            {
                "mediaType": top_media,
                "digest": top_digest,
                "size": top_size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_bytes(_canonical_json(layout_index))
    return BuiltLayout(root, top_digest, top_media, top_size, built)


# --------------------------------------------------------------------------------------
# pushing


def push(
    layout_dir: str | Path,
    ref: str,
    *,
    creds: tuple[str, str] | None = None,
    timeout: float = 300.0,
) -> str:
    """Copy a layout (its single top-level manifest or index) to ``docker://ref``.

    Digests are preserved (``--preserve-digests``): blobs and manifests go up byte for
    byte, so zstd and uncompressed layers stay as they are. Returns the pushed digest.
    Raises ``subprocess.CalledProcessError`` (with skopeo's output) on failure.
    """
    layout = Path(layout_dir)
    index = json.loads((layout / "index.json").read_text())
    is_index = index["manifests"][0]["mediaType"] in (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
    with tempfile.TemporaryDirectory(prefix="cripy-skopeo-") as tmp:
        digest_file = Path(tmp) / "digest"
        argv = [
            SKOPEO_BINARY,
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
            "--digestfile",
            str(digest_file),
        ]
        if is_index:
            argv.append("--all")
        if creds is not None:
            argv += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
        else:
            argv.append("--dest-no-creds")
        argv += [f"oci:{layout}", f"docker://{ref}"]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": tmp, "TMPDIR": tmp}
        result = subprocess.run(
            argv, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
        )
        if result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, argv, output=result.stdout, stderr=result.stderr
            )
        return digest_file.read_text().strip()


class RegistryLike(Protocol):
    """What the push helpers need from ``tests.support.registry.Registry``."""

    @property
    def host(self) -> str: ...

    @property
    def credentials(self) -> tuple[str, str] | None: ...


@dataclass(frozen=True)
class PushedImage:
    """An image in a registry: where it is and the digests a pull must find."""

    host: str
    repo: str
    tag: str
    #: manifest digest, or the index digest for a multi-platform image
    digest: str
    media_type: str
    images: list[BuiltImage]

    @property
    def ref(self) -> str:
        """``host/repo:tag``."""
        return f"{self.host}/{self.repo}:{self.tag}"

    @property
    def digest_ref(self) -> str:
        """``host/repo@sha256:...``."""
        return f"{self.host}/{self.repo}@{self.digest}"

    @property
    def name(self) -> str:
        """``host/repo``."""
        return f"{self.host}/{self.repo}"

    @property
    def is_index(self) -> bool:
        return self.media_type in (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)

    @property
    def image(self) -> BuiltImage:
        """The only image (single-platform) or the first of an index."""
        return self.images[0]

    @property
    def config_digest(self) -> str:
        return self.images[0].config_digest

    @property
    def layer_digests(self) -> list[str]:
        return self.images[0].layer_digests

    def for_platform(self, architecture: str, os: str = "linux") -> BuiltImage:
        for image in self.images:
            if image.architecture == architecture and image.os == os:
                return image
        raise KeyError(f"{os}/{architecture} not in {self.ref}")


def push_image(
    registry: RegistryLike,
    repo: str,
    tag: str,
    images: ImageSpec | Sequence[ImageSpec],
    *,
    creds: tuple[str, str] | None = None,
    fmt: ManifestFormat = "oci",
) -> PushedImage:
    """Build a layout in a temp dir, push it to ``registry`` and delete the layout.

    ``creds`` default to the registry's own credentials (if it has any).
    """
    with tempfile.TemporaryDirectory(prefix="cripy-layout-") as tmp:
        built = build_layout(Path(tmp) / "layout", images, tag=tag, fmt=fmt)
        ref = f"{registry.host}/{repo}:{tag}"
        pushed = push(built.path, ref, creds=creds if creds is not None else registry.credentials)
    if pushed and pushed != built.digest:
        raise AssertionError(f"skopeo pushed {pushed}, layout has {built.digest}")
    return PushedImage(registry.host, repo, tag, built.digest, built.media_type, built.images)


_BUSYBOX_CACHE: dict[str, bytes] = {}


def _busybox_layer() -> bytes:
    """``busybox_rootfs_layer()``, built once per process (it is deterministic)."""
    if "layer" not in _BUSYBOX_CACHE:
        _BUSYBOX_CACHE["layer"] = busybox_rootfs_layer()
    return _BUSYBOX_CACHE["layer"]


def push_busybox(registry: RegistryLike, repo: str = "busybox", tag: str = "latest") -> PushedImage:
    """One gzip busybox layer, ``Cmd ["sh"]``."""
    spec = ImageSpec([Layer(_busybox_layer(), "gzip")], ImageConfig(cmd=["sh"]))
    return push_image(registry, repo, tag, spec)


def push_multilayer_whiteouts(
    registry: RegistryLike, repo: str = "multilayer", tag: str = "latest"
) -> PushedImage:
    """Three layers: busybox; /data/a, /data/b, /data/dir/x; then /data/a whited out and
    /data/dir made opaque holding only /data/dir/y.

    Expected rootfs: /data/b ("b\\n"), /data/dir/y ("y\\n"); no /data/a, no /data/dir/x.
    """
    layer2 = files_layer(
        {"data/a": b"a\n", "data/b": b"b\n", "data/dir/x": b"x\n"}, dirs=["data", "data/dir"]
    )
    layer3 = files_layer({"data/dir/y": b"y\n"}, whiteouts=["data/a"], opaque_dirs=["data/dir"])
    spec = ImageSpec(
        [Layer(_busybox_layer()), Layer(layer2), Layer(layer3)],
        ImageConfig(cmd=["sh"], labels={"cripy.test": "multilayer"}),
    )
    return push_image(registry, repo, tag, spec)


def push_volume_data(registry: RegistryLike, repo: str = "volume-data",
                     tag: str = "v1") -> PushedImage:
    """A data image (no binaries) for image volumes, two layers.

    Expected tree: /data/web/index.html ("v2\\n", the upper layer wins), no
    /data/web/old.txt (whited out), /data/conf/app.conf ("answer=42\\n"), /current ->
    /data/web (absolute link, meant inside the image), /escape -> ../../../.. (leads
    out), /readme ("volume\\n").
    """
    lower = files_layer({"data/web/index.html": b"v1\n", "data/web/old.txt": b"old\n",
                         "data/conf/app.conf": b"answer=42\n", "readme": b"volume\n"})
    upper = files_layer({"data/web/index.html": b"v2\n"}, whiteouts=["data/web/old.txt"],
                        symlinks={"current": "/data/web", "escape": "../../../.."})
    spec = ImageSpec([Layer(lower), Layer(upper)], ImageConfig(cmd=None))
    return push_image(registry, repo, tag, spec)


def push_two_platform_index(
    registry: RegistryLike, repo: str = "multiarch", tag: str = "latest"
) -> PushedImage:
    """An image index for linux/amd64 and linux/arm64 (variant v8).

    Both share the busybox layer; each has a ``/platform`` file holding
    ``linux/amd64\\n`` or ``linux/arm64\\n``. (The busybox binary is the host's, so only
    the host's platform can actually run.)
    """
    specs = [
        ImageSpec(
            [Layer(_busybox_layer()), Layer(files_layer({"platform": f"linux/{arch}\n".encode()}))],
            ImageConfig(cmd=["cat", "/platform"]),
            architecture=arch,
            variant=variant,
        )
        for arch, variant in (("amd64", None), ("arm64", "v8"))
    ]
    return push_image(registry, repo, tag, specs)


def push_zstd(registry: RegistryLike, repo: str = "zstd", tag: str = "latest") -> PushedImage:
    """busybox + a small file layer (/zstd.txt = "zstd\\n"), both zstd-compressed."""
    spec = ImageSpec(
        [Layer(_busybox_layer(), "zstd"), Layer(files_layer({"zstd.txt": b"zstd\n"}), "zstd")],
        ImageConfig(cmd=["sh"]),
    )
    return push_image(registry, repo, tag, spec)


def push_uncompressed(
    registry: RegistryLike, repo: str = "uncompressed", tag: str = "latest"
) -> PushedImage:
    """busybox + /plain.txt ("plain\\n"), both as uncompressed tar layers."""
    spec = ImageSpec(
        [Layer(_busybox_layer(), "none"), Layer(files_layer({"plain.txt": b"plain\n"}), "none")],
        ImageConfig(cmd=["sh"]),
    )
    return push_image(registry, repo, tag, spec)


def push_big_image(
    registry: RegistryLike,
    total_mb: int = 60,
    layers: int = 6,
    *,
    repo: str = "big",
    tag: str | None = None,
    seed: int = 1,
) -> str:
    """busybox + ``layers`` layers of random (incompressible) data, ``total_mb`` MiB in
    all, gzip level 1. Returns the reference ``host/repo:tag``."""
    per_layer = total_mb * 1024 * 1024 // max(1, layers)
    random_layers = [
        Layer(random_layer(per_layer, seed * 1000 + i), "gzip", level=1) for i in range(layers)
    ]
    spec = ImageSpec([Layer(_busybox_layer()), *random_layers], ImageConfig(cmd=["sh"]))
    pushed = push_image(registry, repo, tag or f"{total_mb}mb-{layers}l-s{seed}", spec)
    return pushed.ref


def push_with_user(
    registry: RegistryLike, user: str = "1000", *, repo: str = "user", tag: str | None = None
) -> PushedImage:
    """busybox with config ``User`` set to ``user`` (a uid, name, or ``user:group``) and
    ``Cmd ["id"]``. The tag defaults to ``user`` with ``:`` replaced by ``-``."""
    spec = ImageSpec(
        [Layer(_busybox_layer())],
        ImageConfig(cmd=["id"], user=user, working_dir="/tmp"),
    )
    return push_image(registry, repo, tag or user.replace(":", "-"), spec)


def push_with_username(
    registry: RegistryLike, username: str = "app", *, repo: str = "user", tag: str | None = None
) -> PushedImage:
    """``push_with_user`` with a user name (``app`` is uid 1000, gid 1000 in /etc/passwd)."""
    return push_with_user(registry, username, repo=repo, tag=tag)


def push_docker_schema2(
    registry: RegistryLike, repo: str = "docker-v2", tag: str = "latest", *, index: bool = False
) -> PushedImage:
    """busybox + /docker.txt as a Docker schema 2 manifest (gzip layers), or with
    ``index=True`` a Docker manifest list for linux/amd64 and linux/arm64 (like
    ``push_two_platform_index``, with a ``/platform`` file per platform)."""
    if not index:
        spec = ImageSpec(
            [Layer(_busybox_layer()), Layer(files_layer({"docker.txt": b"docker\n"}))],
            ImageConfig(cmd=["sh"]),
        )
        return push_image(registry, repo, tag, spec, fmt="docker")
    specs = [
        ImageSpec(
            [Layer(_busybox_layer()), Layer(files_layer({"platform": f"linux/{arch}\n".encode()}))],
            ImageConfig(cmd=["cat", "/platform"]),
            architecture=arch,
            variant=variant,
        )
        for arch, variant in (("amd64", None), ("arm64", "v8"))
    ]
    return push_image(registry, repo, tag, specs, fmt="docker")


@dataclass(frozen=True)
class ImageSet:
    """The standard test images, pushed once to one registry."""

    busybox: PushedImage
    multilayer: PushedImage
    index: PushedImage
    zstd: PushedImage
    uncompressed: PushedImage
    user: PushedImage
    username: PushedImage
    docker: PushedImage


def push_standard_images(registry: RegistryLike) -> ImageSet:
    """Push busybox, multilayer, index, zstd, uncompressed, user (uid 1000), username
    (``app``) and a Docker schema 2 image to ``registry``."""
    return ImageSet(
        busybox=push_busybox(registry),
        multilayer=push_multilayer_whiteouts(registry),
        index=push_two_platform_index(registry),
        zstd=push_zstd(registry),
        uncompressed=push_uncompressed(registry),
        user=push_with_user(registry, "1000"),
        username=push_with_username(registry, "app"),
        docker=push_docker_schema2(registry),
    )

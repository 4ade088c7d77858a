"""Tests for cripy.image.layer: layer tar -> overlayfs lower directory."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from cripy.errors import FailedPreconditionError, IntegrityError, InvalidArgumentError
from cripy.image.layer import LayerResult, apply_layer

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MTIME = 1_600_000_000
NS = 1_000_000_000
UNLIMITED = 1 << 40

Entry = tuple[tarfile.TarInfo, bytes]


def ent(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: float = MTIME,
    link: str = "",
    xattrs: dict[str, str] | None = None,
    dev: tuple[int, int] = (0, 0),
) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    ti.linkname = link
    ti.devmajor, ti.devminor = dev
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return ti, data


def make_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def apply_blob(
    dest: Path,
    blob: bytes,
    media_type: str = OCI_TAR,
    *,
    max_bytes: int = UNLIMITED,
    allow_devices: bool = True,
) -> LayerResult:
    dest.mkdir(exist_ok=True)
    path = dest.parent / f"{dest.name}.blob"
    path.write_bytes(blob)
    return apply_layer(path, media_type, dest, max_bytes=max_bytes, allow_devices=allow_devices)


def apply_entries(dest: Path, entries: list[Entry], *, allow_devices: bool = True) -> LayerResult:
    return apply_blob(dest, make_tar(entries), allow_devices=allow_devices)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def opaque(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False)
    except OSError:
        return None


# -- happy paths --------------------------------------------------------------------------


def test_diff_id_covers_trailing_padding(tmp_path: Path) -> None:
    tar = make_tar([ent("a", data=b"a")]) + b"\0" * 5000
    assert apply_blob(tmp_path / "d1", tar).diff_id == sha(tar)
    assert apply_blob(tmp_path / "d2", gzip.compress(tar), OCI_GZIP).diff_id == sha(tar)


def test_zstd_multiple_frames_and_skippable_frame(tmp_path: Path) -> None:
    tar = make_tar([ent(f"f{i}", data=bytes([i]) * 3000) for i in range(20)])
    cctx = zstandard.ZstdCompressor()
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"meta"
    blob = b"".join(cctx.compress(tar[i : i + 7000]) for i in range(0, len(tar), 7000))
    result = apply_blob(tmp_path / "dest", blob + skippable, OCI_ZSTD)
    assert result.diff_id == sha(tar)
    assert (tmp_path / "dest/f7").read_bytes() == bytes([7]) * 3000


def test_empty_layers(tmp_path: Path) -> None:
    tar = make_tar([])
    result = apply_blob(tmp_path / "d1", gzip.compress(tar), OCI_GZIP)
    assert result == LayerResult(diff_id=sha(tar), size=0, inodes=0)
    assert apply_blob(tmp_path / "d2", b"").diff_id == sha(b"")
    assert os.listdir(tmp_path / "d1") == [] == os.listdir(tmp_path / "d2")


def test_later_entries_replace_earlier(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    deep = "/".join(["x"] * 60)
    result = apply_entries(
        dest,
        [
            ent("a", data=b"x" * 100),
            ent("a", data=b"yy"),
            ent("b/c/d", data=b"123"),
            ent(f"b/{deep}/f", data=b"deep"),
            ent("b", data=b"file"),
            ent("c", tarfile.DIRTYPE, mode=0o700),
            ent("c/x", data=b"x"),
            ent("c", tarfile.DIRTYPE, mode=0o750),
            ent("s", tarfile.SYMTYPE, link="target"),
            ent("s", tarfile.DIRTYPE),
            ent("h1", data=b"h"),
            ent("h2", tarfile.LNKTYPE, link="h1"),
            ent("h1", data=b"new"),
            ent("h2", tarfile.LNKTYPE, link="h2"),  # link to itself: nothing to do
        ],
    )
    assert (dest / "a").read_bytes() == b"yy"
    assert (dest / "b").read_bytes() == b"file"
    assert stat.S_IMODE(os.lstat(dest / "c").st_mode) == 0o750
    assert (dest / "c/x").read_bytes() == b"x"
    assert (dest / "s").is_dir() and not (dest / "s").is_symlink()
    assert (dest / "h2").read_bytes() == b"h" and (dest / "h1").read_bytes() == b"new"
    assert result.size == 2 + 4 + 1 + 1 + 3
    assert result.inodes == 7  # a b c c/x s h2 h1


def test_xattrs_are_filtered(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    apply_entries(
        dest,
        [
            ent(
                "d",
                tarfile.DIRTYPE,
                xattrs={
                    "user.ok": "1",
                    "trusted.overlay.opaque": "y",
                    "trusted.overlay.redirect": "/elsewhere",
                    "security.selinux": "system_u:object_r:bin_t:s0",
                },
            ),
            ent("l", tarfile.SYMTYPE, link="d", xattrs={"user.ok": "1"}),  # EPERM: skipped
        ],
    )
    assert os.listxattr(dest / "d") == ["user.ok"]
    assert os.listxattr(dest / "l", follow_symlinks=False) == []


def test_devices_can_be_refused(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="dev/null.*device nodes are not allowed"):
        apply_entries(
            tmp_path / "d1",
            [ent("dev/null", tarfile.CHRTYPE, dev=(1, 3))],
            allow_devices=False,
        )
    # Whiteouts and fifos are not devices a container could use.
    apply_entries(
        tmp_path / "d2",
        [ent(".wh.x"), ent("p", tarfile.FIFOTYPE)],
        allow_devices=False,
    )
    assert stat.S_ISCHR(os.lstat(tmp_path / "d2/x").st_mode)


def test_unknown_media_type_and_bad_dest(tmp_path: Path) -> None:
    tar = make_tar([ent("a")])
    for media_type in ("application/json", OCI_TAR + "+encrypted"):
        with pytest.raises(InvalidArgumentError, match="unsupported layer media type"):
            apply_blob(tmp_path / "d", tar, media_type)
    (tmp_path / "d/occupied").write_bytes(b"")
    with pytest.raises(FailedPreconditionError, match="not empty"):
        apply_blob(tmp_path / "d", tar)


def test_unsupported_entry_type(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="unsupported entry type"):
        apply_entries(tmp_path / "d", [ent("vol", b"V")])  # GNU volume header


# -- hostile layers -------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about a tree, ctime included (catches no-op chmods)."""
    seen: dict[str, tuple[object, ...]] = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath, n) for n in dirnames + filenames]
    for p in paths:
        st = os.lstat(p)
        body = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        seen[str(p)] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_nlink,
            st.st_ino,
            st.st_mtime_ns,
            st.st_ctime_ns,
            sorted(os.listxattr(p, follow_symlinks=False)),
            body,
        )
    return seen


Hostile = Callable[[Path], list[Entry]]

HOSTILE: dict[str, Hostile] = {
    "dotdot": lambda out: [ent("../outside/pwned", data=b"x")],
    "dotdot-inner": lambda out: [ent("a/../../outside/pwned", data=b"x")],
    "dotdot-dir": lambda out: [ent("../outside/newdir", tarfile.DIRTYPE)],
    "absolute": lambda out: [ent(f"{out}/pwned", data=b"x")],
    "absolute-etc": lambda out: [ent("/etc/x", data=b"x")],
    "symlink-parent-abs": lambda out: [
        ent("evil", tarfile.SYMTYPE, link=str(out)),
        ent("evil/pwned", data=b"x"),
    ],
    "symlink-parent-rel": lambda out: [
        ent("evil", tarfile.SYMTYPE, link="../outside"),
        ent("evil/pwned", data=b"x"),
    ],
    "symlink-chain": lambda out: [
        ent("a", tarfile.SYMTYPE, link="b"),
        ent("b", tarfile.SYMTYPE, link=str(out)),
        ent("a/pwned", data=b"x"),
    ],
    "symlink-in-subdir": lambda out: [
        ent("d", tarfile.DIRTYPE),
        ent("d/up", tarfile.SYMTYPE, link="../.."),
        ent("d/up/outside/sentinel", data=b"x", mode=0o777),
    ],
    "symlink-then-dir": lambda out: [
        ent("evil", tarfile.SYMTYPE, link=str(out)),
        ent("evil/sub", tarfile.DIRTYPE, mode=0o777),
    ],
    "symlink-then-node": lambda out: [
        ent("evil", tarfile.SYMTYPE, link=str(out)),
        ent("evil/fifo", tarfile.FIFOTYPE),
    ],
    "symlink-then-symlink": lambda out: [
        ent("evil", tarfile.SYMTYPE, link=str(out)),
        ent("evil/s", tarfile.SYMTYPE, link="/"),
    ],
    "symlink-then-opaque": lambda out: [
        ent("evil", tarfile.SYMTYPE, link=str(out)),
        ent("evil/.wh..wh..opq"),
    ],
    "symlink-then-whiteout": lambda out: [
        ent("evil", tarfile.SYMTYPE, link=str(out)),
        ent("evil/.wh.sentinel"),
    ],
    "symlink-then-hardlink-name": lambda out: [
        ent("f", data=b"x"),
        ent("evil", tarfile.SYMTYPE, link=str(out)),
        ent("evil/pwned", tarfile.LNKTYPE, link="f"),
    ],
    "hardlink-etc-passwd": lambda out: [ent("pw", tarfile.LNKTYPE, link="/etc/passwd")],
    "hardlink-absolute": lambda out: [ent("pw", tarfile.LNKTYPE, link=f"{out}/sentinel")],
    "hardlink-dotdot": lambda out: [ent("pw", tarfile.LNKTYPE, link="../outside/sentinel")],
    "hardlink-dotdot-x": lambda out: [ent("pw", tarfile.LNKTYPE, link="../x")],
    "hardlink-via-symlink": lambda out: [
        ent("evil", tarfile.SYMTYPE, link=str(out)),
        ent("pw", tarfile.LNKTYPE, link="evil/sentinel"),
    ],
    "hardlink-missing": lambda out: [ent("pw", tarfile.LNKTYPE, link="nope")],
    "hardlink-dir": lambda out: [
        ent("d", tarfile.DIRTYPE),
        ent("pw", tarfile.LNKTYPE, link="d"),
    ],
    "whiteout-dotdot": lambda out: [ent("d/.wh...")],
    "whiteout-dot": lambda out: [ent(".wh..")],
}





@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
@pytest.mark.parametrize("kind", ["plain", "gzip"])
def test_hostile_layer_is_rejected(tmp_path: Path, outside: Path, case: str, kind: str) -> None:
    before = snapshot(outside)
    passwd = os.lstat("/etc/passwd")
    tar = make_tar(HOSTILE[case](outside))
    with pytest.raises(IntegrityError, match="layer entry '"):
        apply_blob(tmp_path / "dest", compress(kind, tar), OCI_GZIP)
    assert snapshot(outside) == before
    assert os.lstat("/etc/passwd") == passwd
    assert not os.path.lexists("/etc/x")
    assert not os.path.lexists(tmp_path / "x")


BOMBS: dict[str, Callable[[], bytes]] = {
    "big-file": lambda: make_tar([ent("big", data=b"\0" * (1 << 20))]),
    "padding": lambda: make_tar([ent("a", data=b"a")]) + b"\0" * (1 << 20),
    "many-headers": lambda: make_tar([ent(f"e{i}") for i in range(500)]),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
@pytest.mark.parametrize("kind", ["plain", "gzip", "zstd"])
def test_decompression_bomb(tmp_path: Path, outside: Path, kind: str, bomb: str) -> None:
    before = snapshot(outside)
    blob = compress(kind, BOMBS[bomb]())
    with pytest.raises(IntegrityError, match="layer exceeds 65536 bytes"):
        apply_blob(tmp_path / "dest", blob, OCI_GZIP, max_bytes=65536)
    assert snapshot(outside) == before


def test_entry_size_is_capped_before_writing(tmp_path: Path) -> None:
    # A file's declared size is checked before its data is read (sparse entries can
    # declare far more than the stream holds): 'b' fails while the stream is under 60000.
    tar = make_tar([ent("a", data=b"a" * 40_000), ent("b", data=b"b" * 40_000)])
    with pytest.raises(IntegrityError, match="'b': layer exceeds 60000 bytes"):
        apply_blob(tmp_path / "dest", tar, max_bytes=60_000)
    assert not (tmp_path / "dest/b").exists()


def test_sparse_file_is_expanded_and_capped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(1_000_000)
        f.write(b"hello")
    archive = tmp_path / "sparse.tar"
    subprocess.run(
        ["tar", "-C", str(src), "--sparse", "--format=posix", "-cf", str(archive), "."],
        check=True,
    )
    tar = archive.read_bytes()
    assert len(tar) < 64 * 1024
    result = apply_blob(tmp_path / "d1", tar)
    assert result.size == 8 << 20
    assert (tmp_path / "d1/sparse").read_bytes() == (src / "sparse").read_bytes()
    # The stream is tiny; the declared size is what trips the cap.
    with pytest.raises(IntegrityError, match="'./sparse': layer exceeds 1048576 bytes"):
        apply_blob(tmp_path / "d2", tar, max_bytes=1 << 20)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _zstd(data: bytes, checksum: bool = False) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=checksum).compress(data)


BROKEN: dict[str, Callable[[bytes], bytes]] = {
    "gzip-half": lambda tar: gzip.compress(tar)[: len(gzip.compress(tar)) // 2],
    "gzip-no-trailer": lambda tar: gzip.compress(tar)[:-4],
    "gzip-flipped": lambda tar: _flip(gzip.compress(tar), 200),
    "gzip-garbage-after": lambda tar: gzip.compress(tar) + b"garbage!",
    "zstd-half": lambda tar: _zstd(tar)[: len(_zstd(tar)) // 2],
    "zstd-last-bytes": lambda tar: _zstd(tar)[:-3],
    # Without a frame checksum a flipped byte is only caught by the caller's diff_id check.
    "zstd-flipped-checksummed": lambda tar: _flip(_zstd(tar, checksum=True), 200),
    "tar-truncated-in-data": lambda tar: tar[:1500],
    "tar-truncated-at-header": lambda tar: tar[:3584],
    "tar-truncated-in-header": lambda tar: tar[:3684],
    "tar-garbage-header": lambda tar: tar[:3584] + b"garbage" * 200,
    "gzip-of-truncated-tar": lambda tar: gzip.compress(tar[:3584]),
    "not-a-tar": lambda tar: b"this is not a tar archive" * 40,
    "xz": lambda tar: b"\xfd7zXZ\x00" + tar,
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_corrupt_or_truncated_stream(tmp_path: Path, outside: Path, case: str) -> None:
    before = snapshot(outside)
    # "a" is one header and 3000 bytes of data padded to 3072: "b"'s header is at 3584.
    tar = make_tar([ent("a", data=os.urandom(3000)), ent("b", data=b"b" * 3000)])
    with pytest.raises(IntegrityError):
        apply_blob(tmp_path / "dest", BROKEN[case](tar), OCI_GZIP)
    assert snapshot(outside) == before


# -- overlayfs ------------------------------------------------------------------------



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


@pytest.mark.parametrize(
    ("kind", "media_type"),
    [("gzip", OCI_GZIP), ("zstd", OCI_ZSTD), ("plain", DOCKER_GZIP)],  # plain but says gzip
)
def test_apply_layer_contents(tmp_path: Path, kind: str, media_type: str) -> None:
    big = bytes(range(256)) * 12_000  # several copy chunks
    entries = [
        ent("./", tarfile.DIRTYPE, mode=0o750, mtime=MTIME),
        ent("etc", tarfile.DIRTYPE, mode=0o755, mtime=MTIME + 1),
        ent(
            "./etc/conf",
            data=b"hello",
            mode=0o640,
            uid=1000,
            gid=2000,
            mtime=MTIME + 2,
            xattrs={"user.test": "v1"},
        ),
        ent("usr/bin/su", data=b"#!", mode=0o4755),
        ent("usr/bin/sg", data=b"#!", mode=0o2755, gid=42),
        ent("tmp", tarfile.DIRTYPE, mode=0o1777, mtime=MTIME + 3, xattrs={"user.dir": "d"}),
        ent("etc/link", tarfile.LNKTYPE, link="./etc/conf"),
        ent("etc/sym", tarfile.SYMTYPE, link="/etc/passwd", uid=7, gid=8, mtime=MTIME + 4),
        ent("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        ent("dev/loop0", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(7, 0)),
        ent("run/fifo", tarfile.FIFOTYPE, mode=0o620),
        ent("data/big", data=big),
        ent("data/frac", data=b"f", mtime=MTIME + 0.5),
    ]
    tar = make_tar(entries)
    dest = tmp_path / "dest"
    result = apply_blob(dest, compress(kind, tar), media_type)

    assert result.diff_id == sha(tar)
    assert result.size == 5 + 2 + 2 + len(big) + 1
    # dirs etc usr usr/bin tmp dev run data; files conf su sg big frac; sym; 3 nodes
    assert result.inodes == 7 + 5 + 1 + 3

    root = os.lstat(dest)
    assert stat.S_IMODE(root.st_mode) == 0o750 and root.st_mtime_ns == MTIME * NS

    conf = os.lstat(dest / "etc/conf")
    assert (dest / "etc/conf").read_bytes() == b"hello"
    assert stat.S_IMODE(conf.st_mode) == 0o640
    assert (conf.st_uid, conf.st_gid) == (1000, 2000)
    assert conf.st_mtime_ns == (MTIME + 2) * NS
    assert os.getxattr(dest / "etc/conf", "user.test") == b"v1"
    link = os.lstat(dest / "etc/link")
    assert link.st_ino == conf.st_ino and conf.st_nlink == 2

    assert stat.S_IMODE(os.lstat(dest / "usr/bin/su").st_mode) == 0o4755
    sg = os.lstat(dest / "usr/bin/sg")
    assert stat.S_IMODE(sg.st_mode) == 0o2755 and sg.st_gid == 42
    usr = os.lstat(dest / "usr")  # created implicitly
    assert stat.S_ISDIR(usr.st_mode) and stat.S_IMODE(usr.st_mode) == 0o755
    assert (usr.st_uid, usr.st_gid) == (0, 0)

    tmp = os.lstat(dest / "tmp")
    assert stat.S_IMODE(tmp.st_mode) == 0o1777 and tmp.st_mtime_ns == (MTIME + 3) * NS
    assert os.getxattr(dest / "tmp", "user.dir") == b"d"
    # Children were created after the directory entry; its mtime is still the tar's.
    assert os.lstat(dest / "etc").st_mtime_ns == (MTIME + 1) * NS

    sym = os.lstat(dest / "etc/sym")
    assert stat.S_ISLNK(sym.st_mode)
    assert os.readlink(dest / "etc/sym") == "/etc/passwd"
    assert (sym.st_uid, sym.st_gid) == (7, 8)
    assert sym.st_mtime_ns == (MTIME + 4) * NS

    null = os.lstat(dest / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and stat.S_IMODE(null.st_mode) == 0o666
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    loop = os.lstat(dest / "dev/loop0")
    assert stat.S_ISBLK(loop.st_mode) and loop.st_gid == 6
    assert (os.major(loop.st_rdev), os.minor(loop.st_rdev)) == (7, 0)
    fifo = os.lstat(dest / "run/fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620

    assert (dest / "data/big").read_bytes() == big
    assert os.lstat(dest / "data/frac").st_mtime_ns == MTIME * NS + NS // 2


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


def test_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    result = apply_entries(
        dest,
        [
            ent(".wh.gone"),
            ent("d", tarfile.DIRTYPE, mode=0o755),
            ent("d/.wh..wh..opq"),
            ent("d/keep", data=b"k"),
            ent("d/.wh.sub"),
            ent("x/y/.wh..wh..opq"),  # parents created on the way
            ent(".wh..wh.plnk", tarfile.DIRTYPE),  # AUFS bookkeeping: skipped
            ent(".wh..wh.plnk/1.2", data=b"z"),
        ],
    )
    for name in ("gone", "d/sub"):
        st = os.lstat(dest / name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert opaque(dest / "d") == b"y"
    assert (dest / "d/keep").read_bytes() == b"k"
    assert opaque(dest / "x/y") == b"y" and opaque(dest / "x") is None
    assert sorted(os.listdir(dest)) == ["d", "gone", "x"]
    assert result.inodes == 6


def test_whiteout_in_same_layer_as_entry(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    apply_entries(
        dest,
        [
            ent("f", data=b"1"),
            ent(".wh.f"),  # only deletes from lower layers: f stays
            ent("dd/c", data=b"c"),
            ent(".wh.dd"),  # dd stays, but the lower dd's content is gone: opaque
            ent(".wh.e"),
            ent("e", tarfile.DIRTYPE),  # re-created after deletion: opaque
            ent(".wh.g"),
            ent("g/h", data=b"h"),  # implicit parent replaces the whiteout: opaque
            ent(".wh.i"),
            ent("i", data=b"i"),
        ],
    )
    assert (dest / "f").read_bytes() == b"1"
    assert (dest / "dd/c").read_bytes() == b"c" and opaque(dest / "dd") == b"y"
    assert (dest / "e").is_dir() and opaque(dest / "e") == b"y"
    assert (dest / "g/h").read_bytes() == b"h" and opaque(dest / "g") == b"y"
    assert (dest / "i").read_bytes() == b"i"


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


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the destination that no layer may touch."""
    out = tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "sentinel").write_bytes(b"secret")
    (out / "sub/file").write_bytes(b"also secret")
    return out


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


def test_symlinks_are_never_followed(tmp_path: Path, outside: Path) -> None:
    """Replacing or re-owning a symlink must act on the link, not its target."""
    before = snapshot(outside)
    dest = tmp_path / "dest"
    apply_entries(
        dest,
        [
            ent("evil", tarfile.SYMTYPE, link=f"{outside}/sentinel", uid=1234, mtime=1),
            ent("evil2", tarfile.SYMTYPE, link=str(outside)),
            ent("evil", data=b"mine", mode=0o4777, uid=5),
            ent("hl", tarfile.LNKTYPE, link="evil2"),
            ent("evil2", tarfile.DIRTYPE, mode=0o777),
        ],
    )
    assert snapshot(outside) == before
    assert (dest / "evil").read_bytes() == b"mine" and not (dest / "evil").is_symlink()
    assert os.readlink(dest / "hl") == str(outside)  # hard link to the symlink itself
    assert (dest / "evil2").is_dir() and not (dest / "evil2").is_symlink()


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


def test_overlay_mount_honours_whiteout_and_opaque(tmp_path: Path) -> None:
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    mnt.mkdir()
    apply_entries(
        lower,
        [
            ent("keep", data=b"k"),
            ent("gone", data=b"g"),
            ent("d/old", data=b"o"),
            ent("m/lowerfile", data=b"l"),
        ],
    )
    apply_entries(
        upper,
        [
            ent(".wh.gone"),
            ent("d", tarfile.DIRTYPE, mode=0o755),
            ent("d/.wh..wh..opq"),
            ent("d/new", data=b"n"),
            ent("m/upperfile", data=b"u"),
        ],
    )
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={upper}:{lower}", str(mnt)],
        check=True,
    )
    try:
        assert sorted(os.listdir(mnt)) == ["d", "keep", "m"]  # whiteout hides "gone"
        assert os.listdir(mnt / "d") == ["new"]  # opaque hides "old"
        assert sorted(os.listdir(mnt / "m")) == ["lowerfile", "upperfile"]  # merged
        assert (mnt / "keep").read_bytes() == b"k"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

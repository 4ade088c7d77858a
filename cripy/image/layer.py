"""Unpack one OCI/Docker image layer into a directory used as an overlayfs lower layer.

The layer is untrusted input. Every path is resolved one component at a time from a file
descriptor of the destination, with O_NOFOLLOW, and every change is made relative to the
descriptor of the parent directory, so no entry can reach outside the destination: a
symlink in a parent path, an absolute name or a `..` component rejects the whole layer.

OCI whiteouts are stored the way overlayfs reads them: `dir/.wh.NAME` becomes a 0:0
character device `dir/NAME`, and `dir/.wh..wh..opq` becomes the xattr
`trusted.overlay.opaque=y` on `dir`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Literal, NoReturn, Protocol

import zstandard

from cripy.errors import (
    CripyError,
    FailedPreconditionError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)

# The fastest inflate at hand, measured on a 62 MiB tar of binaries and text (gzip -6),
# in 256 KiB pieces on this project's 2-core machine: ISA-L 385 MiB/s, zlib-ng 326 MiB/s,
# zlib 146 MiB/s. All three take the same decompressobj(wbits=31) calls.
# isal is a dependency; zlib stays the fallback where its wheel cannot be installed.
GZIP_IMPL: Any
try:
    from isal import isal_zlib

    GZIP_IMPL = isal_zlib
except ImportError:  # pragma: no cover - depends on what is installed
    GZIP_IMPL = zlib

LAYER_MEDIA_TYPES: frozenset[str] = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
# Other `.wh..wh.*` names are AUFS bookkeeping (hard link stash etc.), not content.
_WHITEOUT_META_PREFIX = ".wh..wh."

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"

_CHUNK = 1 << 20
_GZIP_READ = 256 * 1024
# One zstd decompress() call returns all its output at once and zstd expands up to
# ~32768:1 (a 4-byte RLE block gives 128 KiB), so feed 512 bytes at a time: <= 16 MiB.
_ZSTD_FEED = 512
_ZSTD_READ = 64 * 1024
_PARENT_CACHE = 16
_TAIL = 32 * 1024  # > tarfile's stream read size (10 KiB) + one header block
_MAX_ID = 0xFFFFFFFF  # (uid_t)-1 means "leave unchanged" to chown; never valid in a layer

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class LayerResult:
    diff_id: str  # "sha256:<hex>" of the uncompressed tar stream, to EOF
    size: int  # bytes of regular file content in dest
    inodes: int  # filesystem objects in dest (hard links share one and count once)


def apply_layer(
    blob: Path, media_type: str, dest: Path, *, max_bytes: int, allow_devices: bool = True
) -> LayerResult:
    """Apply the layer file `blob` into the empty directory `dest`; see `apply_layer_stream`."""
    try:
        raw = open(blob, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError as e:
        raise NotFoundError(f"layer blob {blob} not found") from e
    with raw:
        return apply_layer_stream(
            raw, media_type, dest, label=f"layer {blob.name}", max_bytes=max_bytes,
            allow_devices=allow_devices,
        )


def apply_layer_stream(
    raw: Source, media_type: str, dest: Path, *, label: str, max_bytes: int,
    allow_devices: bool = True,
) -> LayerResult:
    """Apply the layer read from `raw` (compressed as stored) into the empty directory
    `dest`; blocking, run it in a thread. `raw` is read to its end.

    Raises IntegrityError for a corrupt, oversized or hostile layer; `dest` is then left
    partly filled and the caller removes it.
    """
    if media_type.partition(";")[0].strip().lower() not in LAYER_MEDIA_TYPES:
        raise InvalidArgumentError(f"{label}: unsupported layer media type {media_type!r}")
    try:
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise FailedPreconditionError(f"layer destination {dest}: {e.strerror}") from e
    try:
        if os.listdir(root_fd):
            raise FailedPreconditionError(f"layer destination {dest} is not empty")
        with contextlib.ExitStack() as stack:
            stream = _LayerStream(_decompressor(raw, label), label, max_bytes)
            applier = _Applier(root_fd, max_bytes, allow_devices)
            stack.callback(applier.close)
            applier.run(stream, label)
            stream.drain()  # the tar's trailing padding is part of the diff_id
            applier.finish()
    finally:
        os.close(root_fd)
    return LayerResult(
        diff_id=f"sha256:{stream.hexdigest()}", size=applier.size, inodes=applier.inodes
    )


class Source(Protocol):
    """What a layer is read from: a file, or the bytes of a download as they arrive."""

    def read(self, size: int, /) -> bytes: ...


def _decompressor(raw: Source, label: str) -> Source:
    """Pick the decompressor by magic bytes: Docker labels plain tars as gzip at times."""
    head = _read_exactly(raw, 6)
    source = _Prefixed(head, raw)
    if head.startswith(_GZIP_MAGIC):
        return GzipSource(source)
    # A zstd stream may also open with a skippable frame (magic 0x184D2A5?).
    if head.startswith(_ZSTD_MAGIC) or (head[1:4] == b"\x2a\x4d\x18" and head[0] >> 4 == 5):
        return _ZstdSource(source)
    if head.startswith(_XZ_MAGIC):
        raise IntegrityError(f"{label}: xz compression is not supported")
    return source


def _read_exactly(raw: Source, size: int) -> bytes:
    """Up to `size` bytes: fewer only at the end of `raw` (a stream may return less)."""
    parts = []
    left = size
    while left:
        data = raw.read(left)
        if not data:
            break
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


class _Prefixed:
    """`raw` with `head`, already read from it, put back in front."""

    def __init__(self, head: bytes, raw: Source) -> None:
        self._head = head
        self._raw = raw

    def read(self, size: int, /) -> bytes:
        if self._head:
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._raw.read(size)


class GzipSource:
    """Streaming gzip (any number of members, zero padding after them, as gzip(1) and
    Go accept) through the fastest inflate available; notices a truncated member.

    Output per call is bounded by `size`, so a bomb never sits in memory at once.
    """

    def __init__(self, raw: Source) -> None:
        self._raw = raw
        self._inflate = GZIP_IMPL.decompressobj(31)
        self._input = b""
        self._in_member = False

    def read(self, size: int, /) -> bytes:
        size = size if size > 0 else _CHUNK
        while True:
            if self._input:
                buf, self._input = self._input, b""
            else:
                buf = self._raw.read(_GZIP_READ)
            if not self._in_member:
                buf = buf.lstrip(b"\0")
                if not buf:
                    if self._at_end():
                        return b""
                    continue
            out: bytes = self._inflate.decompress(buf, size)
            self._in_member = True
            if self._inflate.eof:  # member done; what is left over starts the next one
                self._input = self._inflate.unused_data
                self._inflate = GZIP_IMPL.decompressobj(31)
                self._in_member = False
            else:
                self._input = self._inflate.unconsumed_tail
            if out:
                return out
            if not buf:
                raise EOFError("gzip stream ends inside a member")

    def _at_end(self) -> bool:
        """Between members: True at the end of input, else the next input is buffered."""
        more = self._raw.read(_GZIP_READ)
        self._input = more
        return not more


class _ZstdSource:
    """Streaming zstd over any number of frames that notices a truncated last frame.

    zstandard's stream_reader ends quietly at a cut-off frame, so frames are driven
    through decompressobj(), whose `eof` says whether the frame really ended.
    """

    def __init__(self, raw: Source) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._in_frame = False
        self._in = b""
        self._in_pos = 0
        self._out = b""
        self._out_pos = 0

    def read(self, size: int, /) -> bytes:
        while self._out_pos >= len(self._out):
            if not self._decompress_some():
                return b""
        data = self._out[self._out_pos : self._out_pos + size]
        self._out_pos += len(data)
        return data

    def _decompress_some(self) -> bool:
        """Decompress one small piece of input; False at a clean end of the stream."""
        if self._in_pos >= len(self._in):
            self._in = self._raw.read(_ZSTD_READ)
            self._in_pos = 0
            if not self._in:
                if self._in_frame:
                    raise EOFError("zstd stream ends inside a frame")
                return False
        piece = memoryview(self._in)[self._in_pos : self._in_pos + _ZSTD_FEED]
        self._out = self._frame.decompress(piece)
        self._out_pos = 0
        self._in_frame = True
        consumed = len(piece)
        if self._frame.eof:  # frame done; what is left over starts the next one
            consumed -= len(self._frame.unused_data)
            self._frame = self._dctx.decompressobj()
            self._in_frame = False
        self._in_pos += consumed
        return True


class _LayerStream:
    """The uncompressed layer as tarfile reads it: hashed for the diff_id, counted, capped."""

    def __init__(self, source: Source, label: str, max_bytes: int) -> None:
        self._source = source
        self._label = label
        self._max = max_bytes
        self._sha = hashlib.sha256()
        self.count = 0
        # The last bytes handed out, so the block where tarfile stopped can be checked.
        self._tail = bytearray()
        self._tail_start = 0

    def read(self, size: int = -1, /) -> bytes:
        try:
            data = self._source.read(size if size >= 0 else _CHUNK)
        except (OSError, EOFError, zlib.error, GZIP_IMPL.error, zstandard.ZstdError) as e:
            raise IntegrityError(f"{self._label}: corrupt or truncated stream: {e}") from e
        self.count += len(data)
        if self.count > self._max:
            raise IntegrityError(f"{self._label}: layer exceeds {self._max} bytes")
        self._sha.update(data)
        self._tail += data
        if len(self._tail) > _TAIL:
            cut = len(self._tail) - _TAIL
            del self._tail[:cut]  # cheap: bytearray deletes from the front in O(1)
            self._tail_start += cut
        return data

    def recent(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`, if recently read; b"" if long gone."""
        start = offset - self._tail_start
        return bytes(self._tail[start : start + size]) if start >= 0 else b""

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    # The rest of the file object protocol tarfile's stubs want; a stream cannot seek.
    def write(self, b: bytes, /) -> int:
        raise io.UnsupportedOperation("layer stream is read-only")

    def tell(self) -> int:
        return self.count

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("layer stream is not seekable")

    def close(self) -> None:
        pass


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _copy(src: IO[bytes], fd: int, size: int) -> None:
    remaining = size
    while remaining:
        chunk = src.read(min(_CHUNK, remaining))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
        remaining -= len(chunk)


_Cleared = Literal["absent", "kept", "whiteout", "removed"]


class _Applier:
    """Applies tar entries below `root_fd`; paths are tuples of single components."""

    def __init__(self, root_fd: int, max_bytes: int, allow_devices: bool) -> None:
        self._root = root_fd
        self._max = max_bytes
        self._allow_devices = allow_devices
        # Recently used parent directories, opened (entries cluster by directory).
        self._dirs: OrderedDict[tuple[str, ...], int] = OrderedDict()
        # Directory mtimes, set at the end: creating children would change them.
        self._dir_times: list[tuple[tuple[str, ...], int]] = []
        self._entry = ""
        self._written = 0  # all file content written, replaced files included
        self.size = 0
        self.inodes = 0

    def close(self) -> None:
        while self._dirs:
            os.close(self._dirs.popitem()[1])

    def run(self, stream: _LayerStream, label: str) -> None:
        try:
            with tarfile.open(
                fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape"
            ) as tf:
                while (member := tf.next()) is not None:
                    # Stream mode keeps every header it has read; nothing needs them.
                    members: list[tarfile.TarInfo] = vars(tf)["members"]
                    members.clear()
                    self._apply_one(tf, member)
                end = tf.offset
        except tarfile.TarError as e:
            if stream.count == 0:
                return  # a zero-byte layer is an empty layer (as Go's archive/tar sees it)
            raise IntegrityError(f"{label}: corrupt tar stream{self._where()}: {e}") from e
        # tarfile also stops quietly at a cut-off or garbled header once past the first
        # entry; only a zero block is a real end of archive.
        block = stream.recent(end, tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE:
            raise IntegrityError(f"{label}: truncated tar stream{self._where()}")
        if block != bytes(tarfile.BLOCKSIZE):
            raise IntegrityError(f"{label}: invalid tar header{self._where()}")

    def _where(self) -> str:
        return f" after entry {self._entry!r}" if self._entry else ""

    def finish(self) -> None:
        times = dict(self._dir_times)  # a later entry for the same directory wins
        for parts in sorted(times):  # parents first, so the cache serves the walks
            try:
                fd = self._parent(parts, create=False)
            except (CripyError, OSError):
                continue  # replaced by a later entry
            ns = times[parts]
            os.utime(fd, ns=(ns, ns))

    # -- entries ---------------------------------------------------------------------

    def _fail(self, problem: str) -> NoReturn:
        raise IntegrityError(f"layer entry {self._entry!r}: {problem}")

    def _apply_one(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self._entry = m.name
        try:
            self._apply(tf, m)
        except CripyError:
            raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhaustedError(
                    f"no space left applying layer entry {m.name!r}"
                ) from e
            self._fail(e.strerror or str(e))
        except (ValueError, OverflowError) as e:
            self._fail(str(e))

    def _apply(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = self._split(m.name, "name")
        if not parts:
            if not m.isdir():
                self._fail("the layer root must be a directory")
            self._set_meta_fd(self._root, m)
            self._dir_times.append(((), self._mtime_ns(m)))
            return
        parent, leaf = parts[:-1], parts[-1]
        if any(p.startswith(_WHITEOUT_META_PREFIX) for p in parent) or (
            leaf.startswith(_WHITEOUT_META_PREFIX) and leaf != OPAQUE_MARKER
        ):
            return
        if leaf == OPAQUE_MARKER:
            self._opaque(parent)
        elif leaf.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, leaf[len(WHITEOUT_PREFIX) :])
        elif m.islnk():
            self._hardlink(parts, m)
        elif m.isreg():
            self._file(tf, parts, m)
        elif m.isdir():
            self._dir(parts, m)
        elif m.issym():
            self._symlink(parts, m)
        elif m.ischr() or m.isblk() or m.isfifo():
            self._node(parts, m)
        else:
            self._fail(f"unsupported entry type {m.type!r}")

    def _file(self, tf: tarfile.TarFile, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        # Checked up front as well: a sparse entry's size is not bounded by the stream.
        if m.size > self._max - self._written:
            self._fail(f"layer exceeds {self._max} bytes")
        src = tf.extractfile(m)
        if src is None:
            self._fail("no file data")
        pfd = self._parent(parts[:-1])
        self._clear(pfd, parts, keep_dir=False)
        fd = os.open(parts[-1], _NEW_FILE_FLAGS, 0o600, dir_fd=pfd)
        self.inodes += 1
        try:
            self._written += m.size
            _copy(src, fd, m.size)
            self.size += m.size
            self._set_meta_fd(fd, m)
            ns = self._mtime_ns(m)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def _dir(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        pfd = self._parent(parts[:-1])
        cleared = self._clear(pfd, parts, keep_dir=True)
        if cleared != "kept":
            os.mkdir(parts[-1], 0o700, dir_fd=pfd)
            self.inodes += 1
        fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=pfd)
        try:
            if cleared == "whiteout":
                # Deleted from the lower layers, then re-created here: hide their content.
                os.setxattr(fd, OPAQUE_XATTR, b"y")
            self._set_meta_fd(fd, m)
            self._dir_times.append((parts, self._mtime_ns(m)))
        except BaseException:
            os.close(fd)
            raise
        self._cache(parts, fd)  # its entries usually come next

    def _symlink(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        pfd = self._parent(parts[:-1])
        self._clear(pfd, parts, keep_dir=False)
        os.symlink(m.linkname, parts[-1], dir_fd=pfd)  # verbatim; never followed
        self.inodes += 1
        self._set_meta_at(pfd, parts[-1], m, chmod=False)

    def _node(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        if m.isfifo():
            kind, dev = stat.S_IFIFO, 0
        else:
            if not self._allow_devices:
                self._fail("device nodes are not allowed")
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            dev = os.makedev(m.devmajor, m.devminor)
        pfd = self._parent(parts[:-1])
        self._clear(pfd, parts, keep_dir=False)
        os.mknod(parts[-1], kind | 0o600, dev, dir_fd=pfd)
        self.inodes += 1
        self._set_meta_at(pfd, parts[-1], m, chmod=True)

    def _hardlink(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        target = self._split(m.linkname, "hard link target")
        if not target:
            self._fail("hard link to the layer root")
        if target == parts:
            return
        tfd = self._walk(target[:-1], create=False)
        try:
            try:
                tst = os.lstat(target[-1], dir_fd=tfd)
            except FileNotFoundError:
                self._fail(f"hard link target {m.linkname!r} does not exist in the layer")
            if stat.S_ISDIR(tst.st_mode):
                self._fail(f"hard link target {m.linkname!r} is a directory")
            if _is_whiteout(tst):
                self._fail(f"hard link target {m.linkname!r} is a whiteout")
            pfd = self._parent(parts[:-1])
            try:
                st = os.lstat(parts[-1], dir_fd=pfd)
            except FileNotFoundError:
                pass
            else:
                if os.path.samestat(st, tst):
                    return
                self._remove(pfd, parts, st)
            # linkat() without AT_SYMLINK_FOLLOW: a symlink target is linked, not followed.
            os.link(
                target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False
            )
        finally:
            os.close(tfd)

    def _whiteout(self, parent: tuple[str, ...], name: str) -> None:
        if name in ("", ".", ".."):
            self._fail("invalid whiteout name")
        pfd = self._parent(parent)
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
            self.inodes += 1
            return
        # A whiteout only deletes from lower layers: an entry of this layer with the same
        # name stays. If it is a directory, the lower one's content must stay hidden.
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            try:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
            finally:
                os.close(fd)

    def _opaque(self, parent: tuple[str, ...]) -> None:
        if not parent:
            return  # overlayfs merges layer roots regardless; nothing to record
        os.setxattr(self._parent(parent), OPAQUE_XATTR, b"y")

    # -- metadata --------------------------------------------------------------------

    def _owner(self, m: tarfile.TarInfo) -> tuple[int, int]:
        if not (0 <= m.uid < _MAX_ID and 0 <= m.gid < _MAX_ID):
            self._fail(f"invalid owner {m.uid}:{m.gid}")
        return m.uid, m.gid

    def _mtime_ns(self, m: tarfile.TarInfo) -> int:
        raw = m.pax_headers.get("mtime")  # exact, where tarfile's float is not
        try:
            if raw is not None:
                return int(Decimal(raw) * 1_000_000_000)
            return int(m.mtime) * 1_000_000_000
        except (ArithmeticError, ValueError):
            self._fail("invalid mtime")

    def _set_meta_fd(self, fd: int, m: tarfile.TarInfo) -> None:
        os.fchown(fd, *self._owner(m))
        os.fchmod(fd, m.mode & 0o7777)  # after chown, which drops setuid/setgid
        self._set_xattrs(fd, m, strict=True)

    def _set_meta_at(self, pfd: int, name: str, m: tarfile.TarInfo, *, chmod: bool) -> None:
        """Metadata of a symlink or node, by name, never following the name."""
        uid, gid = self._owner(m)
        os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        if chmod:
            os.chmod(name, m.mode & 0o7777, dir_fd=pfd, follow_symlinks=False)
        # No *xattrat() call exists: lsetxattr through the parent's /proc fd link.
        self._set_xattrs(f"/proc/self/fd/{pfd}/{name}", m, strict=False)
        ns = self._mtime_ns(m)
        os.utime(name, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)

    def _set_xattrs(self, target: int | str, m: tarfile.TarInfo, *, strict: bool) -> None:
        for key, text in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr.") :]
            # Only content xattrs: trusted.overlay.* would steer overlayfs and
            # security.selinux is the runtime's to set, not the image builder's.
            if not (
                name.startswith("user.")
                or name
                in ("security.capability", "system.posix_acl_access", "system.posix_acl_default")
            ):
                continue
            value = text.encode("utf-8", "surrogateescape")  # tarfile's decoding, undone
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as e:
                # Unsupported by the filesystem, or user.* on a symlink or device node.
                if e.errno == errno.EOPNOTSUPP or (not strict and e.errno == errno.EPERM):
                    continue
                raise

    # -- paths -----------------------------------------------------------------------

    def _split(self, name: str, what: str) -> tuple[str, ...]:
        if not name:
            self._fail(f"empty {what}")
        if "\0" in name:
            self._fail(f"NUL byte in {what}")
        if name.startswith("/"):
            self._fail(f"absolute {what}")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            self._fail(f"'..' in {what}")
        return parts

    def _parent(self, parts: tuple[str, ...], *, create: bool = True) -> int:
        """Descriptor of directory `parts`, created if missing; owned by the cache."""
        if not parts:
            return self._root
        fd = self._dirs.get(parts)
        if fd is not None:
            self._dirs.move_to_end(parts)
            return fd
        # Walk from the nearest cached ancestor: usually the parent was just seen.
        start = len(parts) - 1
        while start and parts[:start] not in self._dirs:
            start -= 1
        base = self._dirs[parts[:start]] if start else self._root
        fd = self._walk(parts, create=create, base=base, start=start)
        self._cache(parts, fd)
        return fd

    def _cache(self, parts: tuple[str, ...], fd: int) -> None:
        old = self._dirs.pop(parts, None)
        if old is not None:
            os.close(old)
        self._dirs[parts] = fd
        if len(self._dirs) > _PARENT_CACHE:  # the oldest; never one a caller still holds
            os.close(self._dirs.popitem(last=False)[1])

    def _walk(
        self, parts: tuple[str, ...], *, create: bool, base: int | None = None, start: int = 0
    ) -> int:
        """Open directory `parts` (a new descriptor), one component at a time.

        `base` is the open directory `parts[:start]` (default: the root); it stays open.
        """
        base = self._root if base is None else base
        fd = base
        try:
            for i in range(start, len(parts)):
                nfd = self._step(fd, parts[: i + 1], create)
                if fd != base:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != base:
                os.close(fd)
            raise
        return os.dup(fd) if fd == base else fd

    def _step(self, dfd: int, path: tuple[str, ...], create: bool) -> int:
        name = path[-1]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dfd)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
        shown = "/".join(path)
        try:
            st: os.stat_result | None = os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            st = None
        if st is None:
            if not create:
                self._fail(f"{shown!r} does not exist")
        elif stat.S_ISLNK(st.st_mode):
            self._fail(f"path runs through symlink {shown!r}")
        elif not (create and _is_whiteout(st)):
            self._fail(f"{shown!r} is not a directory")
        else:
            os.unlink(name, dir_fd=dfd)
            self.inodes -= 1
        os.mkdir(name, 0o700, dir_fd=dfd)
        self.inodes += 1
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o755)
            if st is not None:  # was a whiteout: the lower directory stays hidden
                os.setxattr(fd, OPAQUE_XATTR, b"y")
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- removal (a later entry replaces an earlier one) --------------------------------

    def _clear(self, pfd: int, path: tuple[str, ...], *, keep_dir: bool) -> _Cleared:
        try:
            st = os.lstat(path[-1], dir_fd=pfd)
        except FileNotFoundError:
            return "absent"
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return "kept"
        whiteout = _is_whiteout(st)
        self._remove(pfd, path, st)
        return "whiteout" if whiteout else "removed"

    def _remove(self, pfd: int, path: tuple[str, ...], st: os.stat_result) -> None:
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path[-1], dir_fd=pfd)
            self._forget(st)
            return
        for key in [k for k in self._dirs if k[: len(path)] == path]:
            os.close(self._dirs.pop(key))
        self._rmtree(pfd, path[-1])

    def _forget(self, st: os.stat_result) -> None:
        if st.st_nlink <= 1:
            self.inodes -= 1
            if stat.S_ISREG(st.st_mode):
                self.size -= st.st_size

    def _rmtree(self, pfd: int, name: str) -> None:
        """Remove a directory tree without recursion: its depth is the layer's choice."""
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        below: list[str] = []  # names from `name` down to the directory `fd` is on
        pending: list[list[str]] = []  # subdirectories left to visit, per level above
        try:
            todo = self._remove_files(fd)
            while True:
                if todo:
                    sub = todo.pop()
                    nfd = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
                    below.append(sub)
                    pending.append(todo)
                    todo = self._remove_files(fd)
                elif below:
                    up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = up
                    os.rmdir(below.pop(), dir_fd=fd)
                    self.inodes -= 1
                    todo = pending.pop()
                else:
                    break
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=pfd)
        self.inodes -= 1

    def _remove_files(self, fd: int) -> list[str]:
        """Unlink all non-directories in `fd`; return the names of the subdirectories."""
        subdirs = []
        for name in os.listdir(fd):
            st = os.lstat(name, dir_fd=fd)
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(name)
            else:
                os.unlink(name, dir_fd=fd)
                self._forget(st)
        return subdirs

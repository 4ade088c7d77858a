"""The new mount API (Linux 5.12+) through ctypes: detached bind clones, idmapped and
recursive read-only mount attributes, and a throwaway user namespace to idmap with.

The syscall numbers of the new mount API are the same on every architecture (they come
after the unified 424).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


@dataclass(frozen=True)
class IDMap:
    """One line of a uid_map/gid_map: container_id host_id length."""

    container_id: int
    host_id: int
    length: int

    def to_oci(self) -> dict[str, int]:
        return {"containerID": self.container_id, "hostID": self.host_id,
                "size": self.length}


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def open_tree_clone(path: str, recursive: bool = False) -> int:
    """A detached copy of the mount at `path` (a bind mount not attached anywhere yet)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    return _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), flags),
                  f"open_tree {path}")


def mount_setattr(path_or_fd: str | int, attr_set: int, *, userns_fd: int = 0,
                  recursive: bool = False) -> None:
    attr = _MountAttr(attr_set, 0, 0, userns_fd)
    if isinstance(path_or_fd, int):
        dfd, path, flags = path_or_fd, b"", AT_EMPTY_PATH
    else:
        dfd, path, flags = AT_FDCWD, path_or_fd.encode(), 0
    flags |= AT_RECURSIVE if recursive else 0
    _check(_libc.syscall(SYS_MOUNT_SETATTR, dfd, path, flags, ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))),
           f"mount_setattr {path_or_fd}")


def move_mount(fd: int, target: str) -> None:
    """Attach the detached mount `fd` at `target`."""
    _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(),
                         MOVE_MOUNT_F_EMPTY_PATH), f"move_mount to {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(source.encode(), target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def map_text(maps: Sequence[IDMap]) -> str:
    return "".join(f"{m.container_id} {m.host_id} {m.length}\n" for m in maps)


def idmapped_clone(path: str, userns_fd: int) -> int:
    """A detached bind clone of `path` whose IDs are shifted by the user namespace's maps."""
    fd = open_tree_clone(path)
    try:
        mount_setattr(fd, MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def umount_detach(target: str) -> None:
    _check(_libc.umount2(target.encode(), 2), f"umount {target}")  # MNT_DETACH


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (a helper child never outlives it)."""
    _libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)


@contextlib.contextmanager
def in_new_userns(uids: Sequence[IDMap], gids: Sequence[IDMap],
                  inside: Callable[[], None] = lambda: None) -> Iterator[int]:
    """A forked child in a new user namespace with these maps, which then runs `inside`
    (as the namespace's root, with every capability there); yields its pid while it
    waits, so /proc/PID/ns/... can be opened or pinned. Fork only single-threaded."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            die_with_parent()
            unshare(CLONE_NEWUSER)
            os.write(ready_w, b"u")
            if os.read(go_r, 1) == b"m":  # mapped
                inside()
                os.write(ready_w, b"i")
                os.read(go_r, 1)  # until the parent is done with it
                code = 0
        except OSError as exc:
            os.write(2, f"in the new user namespace: {exc}\n".encode())
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise OSError("could not create a user namespace")
        Path(f"/proc/{pid}/uid_map").write_text(map_text(uids))
        Path(f"/proc/{pid}/gid_map").write_text(map_text(gids))
        os.write(go_w, b"m")
        if os.read(ready_r, 1) != b"i":
            raise OSError("the user namespace's child failed")
        yield pid
    finally:
        os.close(ready_r)
        os.close(go_w)
        os.waitpid(pid, 0)

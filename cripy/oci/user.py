"""The user and groups of a container's first process, resolved in the image's rootfs.

The rootfs is untrusted: /etc/passwd may be a symlink to /etc/shadow on the host, an
absolute link, `../../..` chains, a FIFO, a device, or gigabytes of garbage. Files are
therefore opened one path component at a time from a descriptor of the rootfs, with
O_NOFOLLOW; symlinks are read and resolved by hand relative to the rootfs root (as they
would resolve inside the container), `..` never climbs above the root, and only regular
files of bounded size are read. Malformed lines are skipped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cripy.errors import InvalidArgumentError, NotFoundError

log = logging.getLogger(__name__)

MAX_ID = 4294967294  # (uid_t)-1 is "no change" to the kernel, so not a valid ID
MAX_DB_SIZE = 4 << 20
_MAX_SYMLINKS = 40


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class ProcessUser:
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)
    # The name from /etc/passwd when known (for logs and the group lookup).
    username: str | None = None

    def to_oci(self) -> dict[str, object]:
        out: dict[str, object] = {"uid": self.uid, "gid": self.gid}
        if self.additional_gids:
            out["additionalGids"] = list(self.additional_gids)
        return out


def read_rootfs_file(rootfs: Path, path: str, max_size: int = MAX_DB_SIZE) -> bytes | None:
    """Contents of `path` as seen inside `rootfs`, or None when it is missing or unusable.

    Missing, a directory, a special file, a dangling or looping symlink: None (logged).
    Larger than `max_size`: InvalidArgumentError, since silently truncating a user
    database would resolve names wrongly.
    """
    try:
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        log.warning("cannot open rootfs %s: %s", rootfs, e.strerror)
        return None
    try:
        fd = _open_beneath(root_fd, path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            log.warning("cannot resolve %s in rootfs %s: %s", path, rootfs, e.strerror)
        return None
    finally:
        os.close(root_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.warning("%s in rootfs %s is not a regular file; ignored", path, rootfs)
            return None
        if st.st_size > max_size:
            raise InvalidArgumentError(f"{path} in the image is larger than {max_size} bytes")
        # Reopen the O_PATH descriptor for reading: the file itself is pinned, no re-lookup.
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        log.warning("cannot open %s in rootfs %s: %s", path, rootfs, e.strerror)
        return None
    finally:
        os.close(fd)
    try:
        data = b""
        while len(data) <= max_size:
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        log.warning("cannot read %s in rootfs %s: %s", path, rootfs, e.strerror)
        return None
    finally:
        os.close(rfd)
    if len(data) > max_size:
        raise InvalidArgumentError(f"{path} in the image is larger than {max_size} bytes")
    return data


def _open_beneath(root_fd: int, path: str) -> int:
    """O_PATH descriptor of `path` resolved inside the directory `root_fd` (see module doc)."""
    todo = [c for c in path.split("/") if c not in ("", ".")]
    todo.reverse()  # a stack: the next component is at the end
    stack = [os.dup(root_fd)]  # directory descriptors from the root down
    links = 0
    try:
        while todo:
            name = todo.pop()
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                target = os.readlink(name, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts = [c for c in target.split("/") if c not in ("", ".")]
                todo.extend(reversed(parts))
                continue
            if not todo:
                return fd
            if not stat.S_ISDIR(st.st_mode):
                os.close(fd)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            stack.append(fd)
        # The path named the root itself (or only "..").
        return os.dup(stack[0])
    finally:
        for d in stack:
            with contextlib.suppress(OSError):
                os.close(d)


def _lines(data: bytes | None) -> list[list[str]]:
    if not data:
        return []
    out = []
    for raw in data.decode("utf-8", errors="replace").splitlines():
        line = raw.strip()
        # NIS compat entries (+/-) carry no local data.
        if not line or line.startswith(("#", "+", "-")):
            continue
        out.append(line.split(":"))
    return out


def _num(s: str) -> int | None:
    # str.isdigit accepts non-ASCII digits; IDs are ASCII only.
    if not s or not s.isascii() or not s.isdigit() or len(s) > 10:
        return None
    n = int(s)
    return n if n <= MAX_ID else None


def parse_passwd(data: bytes | None) -> list[PasswdEntry]:
    entries = []
    for f in _lines(data):
        if len(f) < 4 or not f[0]:
            continue
        uid, gid = _num(f[2]), _num(f[3])
        if uid is None or gid is None:
            continue
        entries.append(PasswdEntry(f[0], uid, gid, f[5] if len(f) > 5 else ""))
    return entries


def parse_group(data: bytes | None) -> list[GroupEntry]:
    entries = []
    for f in _lines(data):
        if len(f) < 3 or not f[0]:
            continue
        gid = _num(f[2])
        if gid is None:
            continue
        members = tuple(m.strip() for m in f[3].split(",") if m.strip()) if len(f) > 3 else ()
        entries.append(GroupEntry(f[0], gid, members))
    return entries


def _check_id(value: int, what: str) -> int:
    if not 0 <= value <= MAX_ID:
        raise InvalidArgumentError(f"{what} {value} is out of range 0..{MAX_ID}")
    return value


def resolve_user(
    rootfs: Path,
    *,
    run_as_user: int | None = None,
    run_as_username: str = "",
    run_as_group: int | None = None,
    supplemental_groups: Sequence[int] = (),
    strict_groups: bool = False,
    image_user: str = "",
) -> ProcessUser:
    """Resolve the CRI user settings, falling back to the image's USER.

    Precedence: run_as_user, then run_as_username, then the image USER ("uid", "name",
    "uid:gid", "name:group", ...; empty means root). run_as_group replaces the group.
    Additional groups: the primary gid, the /etc/group groups that list the user name
    (unless `strict_groups`, the Strict SupplementalGroupsPolicy), then the requested
    supplemental groups, without duplicates.
    """
    if run_as_user is not None and run_as_username:
        raise InvalidArgumentError("run_as_user and run_as_username are mutually exclusive")
    if run_as_group is not None and run_as_user is None and not run_as_username:
        raise InvalidArgumentError("run_as_group requires run_as_user or run_as_username")

    passwd_cache: list[list[PasswdEntry]] = []
    group_cache: list[list[GroupEntry]] = []

    def passwd() -> list[PasswdEntry]:
        if not passwd_cache:
            passwd_cache.append(parse_passwd(read_rootfs_file(rootfs, "/etc/passwd")))
        return passwd_cache[0]

    def groups() -> list[GroupEntry]:
        if not group_cache:
            group_cache.append(parse_group(read_rootfs_file(rootfs, "/etc/group")))
        return group_cache[0]

    if run_as_user is not None:
        user_part, group_part, origin = str(_check_id(run_as_user, "run_as_user")), "", "user"
    elif run_as_username:
        if ":" in run_as_username:
            raise InvalidArgumentError(f"run_as_username '{run_as_username}' must not contain ':'")
        user_part, group_part, origin = run_as_username, "", "user"
    else:
        user_part, sep, group_part = image_user.strip().partition(":")
        if sep and not group_part:
            raise InvalidArgumentError(f"image USER '{image_user}' has an empty group")
        origin = "image USER"
        if not user_part:
            if group_part:
                raise InvalidArgumentError(f"image USER '{image_user}' has an empty user")
            user_part = "0"
    if "\x00" in user_part or "\x00" in group_part:
        raise InvalidArgumentError(f"{origin} contains a NUL byte")

    username: str | None = None
    uid = _num(user_part) if user_part.isascii() and user_part.isdigit() else None
    if user_part.isascii() and user_part.isdigit() and uid is None:
        raise InvalidArgumentError(f"{origin} '{user_part}' is out of range 0..{MAX_ID}")
    gid = 0
    if uid is not None:
        # A numeric uid need not exist in /etc/passwd; if it does, it brings its group.
        for p in passwd():
            if p.uid == uid:
                username, gid = p.name, p.gid
                break
    else:
        for p in passwd():
            if p.name == user_part:
                username, uid, gid = p.name, p.uid, p.gid
                break
        else:
            raise NotFoundError(f"{origin} '{user_part}' not found in the image's /etc/passwd")

    if group_part:
        if group_part.isascii() and group_part.isdigit():
            g = _num(group_part)
            if g is None:
                raise InvalidArgumentError(f"{origin} group '{group_part}' is out of range")
            gid = g
        else:
            for ge in groups():
                if ge.name == group_part:
                    gid = ge.gid
                    break
            else:
                raise NotFoundError(
                    f"{origin} group '{group_part}' not found in the image's /etc/group"
                )
    if run_as_group is not None:
        gid = _check_id(run_as_group, "run_as_group")

    extra: list[int] = [gid]
    if not strict_groups and username is not None:
        extra.extend(ge.gid for ge in groups() if username in ge.members)
    extra.extend(_check_id(g, "supplemental group") for g in supplemental_groups)
    additional: list[int] = []
    for g in extra:
        if g not in additional:
            additional.append(g)
    return ProcessUser(uid=uid, gid=gid, additional_gids=additional, username=username)

"""Pod namespaces (net, ipc, uts) pinned to files, with no process keeping them alive.

A thread of the daemon's own, started for this alone, unshares the namespaces (net, UTS
and IPC namespaces belong to a thread, not to the whole process), sets the hostname,
brings up `lo` in the new network namespace (so no CNI loopback plugin is needed) and
bind-mounts its /proc/thread-self/ns files onto the pin files, then ends: the bind mount
is what holds each namespace, and no other work ever runs in them. No process is
spawned. Inside a pod user namespace, a forked helper does it (cripy.oci.userns: a
multi-threaded process cannot enter a new user namespace). Unpinning is a lazy unmount
plus unlink.

Propagation: when the mount holding the pin directory is shared (systemd makes / and
/run shared), each nsfs bind mount would be copied into every peer mount namespace,
where it would keep the namespace alive behind our back. The pin directory is then
first bind-mounted onto itself and made private, so the pins stay in this namespace;
unpinning removes that self-mount too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from cripy.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from cripy.network.loopback import bring_up_lo
from cripy.oci.userns import PodUserns, pin_argv
from cripy.tasks import to_thread_to_the_end

log = logging.getLogger(__name__)

KINDS = ("net", "ipc", "uts")  # also the order files are made and unpinned in
PINNED = (*KINDS, "user")  # a pod's own user namespace (cripy.oci.userns) is pinned too
UNSHARE_TIMEOUT = 30.0

_CLONE_FLAGS = {"net": 0x40000000, "uts": 0x04000000, "ipc": 0x08000000}
_MS_BIND = 0x1000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


async def pin_namespaces(directory: Path, kinds: Sequence[str],
                         hostname: str | None, userns: PodUserns | None = None
                         ) -> dict[str, Path]:
    """Fresh namespaces of `kinds`, pinned at directory/<kind>; all or nothing. With
    `userns`, they are made inside a new user namespace, pinned at directory/user."""
    wanted = [k for k in KINDS if k in kinds]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not wanted:
        raise InvalidArgumentError(f"namespace kinds {list(kinds)!r}: choose from {KINDS}")
    if hostname is not None:
        if "uts" not in wanted:
            raise InvalidArgumentError("a hostname needs a new UTS namespace")
        _check_hostname(hostname)
    directory = Path(os.path.realpath(directory))  # mountinfo shows resolved paths
    paths = {kind: directory / kind for kind in wanted}
    if userns is not None:
        paths["user"] = directory / "user"
    for path in paths.values():
        if is_pinned(path):  # not ours to clean up, so checked before the try
            raise AlreadyExistsError(f"namespace {path} is already pinned")
    try:
        try:
            await asyncio.to_thread(_prepare, directory, list(paths.values()))
        except OSError as exc:
            raise FailedPreconditionError(f"cannot pin namespaces in {directory}: {exc}") \
                from None
        if userns is None:
            await to_thread_to_the_end(_pin_in_own_thread, paths, hostname)
        else:
            await _run_pinner(pin_argv(directory, userns, wanted, hostname), wanted)
        dead = [str(p) for p in paths.values() if not is_pinned(p)]
        if dead:
            raise FailedPreconditionError(f"unshare did not pin {', '.join(dead)}")
    except BaseException:
        try:
            await unpin_namespaces(directory)
        except Exception as exc:  # the first error is the one worth reporting
            log.warning("cleaning up half-pinned namespaces in %s: %s", directory, exc)
        raise
    return paths


async def unpin_namespaces(directory: Path) -> None:
    """Unmount and remove every pinned file (and the private self-mount); idempotent."""
    await asyncio.to_thread(_unpin, Path(os.path.realpath(directory)))


def is_pinned(path: Path) -> bool:
    """True while `path` is a live namespace: an nsfs file, i.e. a bind mount of one.

    nsfs is a single kernel-internal filesystem, so every namespace file shares the
    device number of our own /proc/self/ns entries; an unmounted pin file does not.
    """
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


# --- internals ----------------------------------------------------------------------------


def _check_hostname(name: str) -> None:
    # The kernel takes up to 64 bytes; anything resembling an option or control
    # characters is refused rather than passed to hostname(1).
    if (not name or len(name.encode()) > 64 or name.startswith("-")
            or any(c.isspace() or not c.isprintable() or c == "/" for c in name)):
        raise InvalidArgumentError(f"hostname {name!r} is not valid")


def _prepare(directory: Path, files: list[Path]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if _is_shared(directory):
        if not _is_mount_point(directory):
            _mount(str(directory), str(directory), _MS_BIND)
        _mount("none", str(directory), _MS_PRIVATE)  # unpin undoes both on failure
    for path in files:
        # unshare(1) bind-mounts onto the file, so it has to exist.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
        os.close(fd)


def _pin_in_own_thread(paths: dict[str, Path], hostname: str | None) -> None:
    """Pin fresh namespaces of `paths`' kinds from a new thread (see the module docstring);
    blocks until it has ended."""
    failure: list[OSError] = []

    def pin() -> None:
        try:
            flags = 0
            for kind in paths:
                flags |= _CLONE_FLAGS[kind]
            _check(_libc.unshare(flags), f"unshare {'/'.join(paths)}")
            if hostname is not None:
                name = hostname.encode()
                _check(_libc.sethostname(name, len(name)), f"sethostname {hostname}")
            if "net" in paths:
                bring_up_lo()
            for kind, path in paths.items():
                _mount(f"/proc/thread-self/ns/{kind}", str(path), _MS_BIND)
        except OSError as exc:
            failure.append(exc)

    thread = threading.Thread(target=pin, name="cripy-pin-namespaces")
    thread.start()
    thread.join()
    if failure:
        raise FailedPreconditionError(
            f"creating {'/'.join(paths)} namespaces failed: {failure[0]}")


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


async def _run_pinner(argv: list[str], kinds: Sequence[str]) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise FailedPreconditionError(f"cannot run {argv[0]}: {exc}") from None
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), UNSHARE_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        raise DeadlineExceededError(
            f"pinning namespaces took longer than {UNSHARE_TIMEOUT:g}s") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        raise
    if proc.returncode != 0:
        message = stderr.decode(errors="replace").strip()[-500:]
        raise FailedPreconditionError(
            f"creating {'/'.join(kinds)} namespaces failed: {message or proc.returncode}")


def _unpin(directory: Path) -> None:
    mounts = _mount_points()
    for kind in PINNED:
        path = directory / kind
        # Mounts can be stacked if an earlier pin was interrupted; peel them all.
        for _ in range(16):
            if str(path) not in mounts and not is_pinned(path):
                break
            _umount(path)
            mounts = _mount_points()
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):  # not ours
            path.unlink()
    for _ in range(16):
        if str(directory) not in mounts:
            break
        _umount(directory)
        mounts = _mount_points()
    with contextlib.suppress(OSError):  # not empty or gone: leave it to its owner
        directory.rmdir()


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _umount(path: Path) -> None:
    if _libc.umount2(str(path).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not (or no longer) a mount point
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mountinfo() -> list[tuple[str, list[str]]]:
    """(mount point, optional fields) for each line of /proc/self/mountinfo."""
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 7:
                continue
            optional = fields[6:fields.index("-")] if "-" in fields else []
            entries.append((_unescape(fields[4]), optional))
    return entries


def _mount_points() -> set[str]:
    return {point for point, _ in _mountinfo()}


def _is_mount_point(path: Path) -> bool:
    return str(path) in _mount_points()


def _is_shared(path: Path) -> bool:
    """Is the mount `path` lives on shared (would mounts below it propagate)?"""
    real = os.path.realpath(path)
    best, shared = "", False
    for point, optional in _mountinfo():  # later entries win: they are mounted on top
        if (real == point or real.startswith(point.rstrip("/") + "/")) and \
                len(point) >= len(best):
            best, shared = point, any(o.startswith("shared:") for o in optional)
    return shared

"""Container root filesystems: an overlay of the image's layers with a writable layer."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from cripy.errors import FailedPreconditionError
from cripy.oci.idmap import mount, umount_detach
from cripy.tasks import to_thread_to_the_end

# mount(2) takes at most a page of options; relative lowerdirs (mounting from inside the
# layer store) keep that enough for ~60 layers.
MAX_MOUNT_OPTIONS = 4000
MOUNT_TIMEOUT = 30.0


async def mount_overlay(layers_root: Path, lowers: list[str], upper: Path, work: Path,
                        target: Path) -> None:
    """Mount `lowers` (directories under `layers_root`, topmost first) with `upper` at `target`.

    An image without layers gets an empty lower directory, as overlayfs needs one.
    """
    target.mkdir(parents=True, exist_ok=True)
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not lowers:
        empty = upper.parent / "empty-lower"
        empty.mkdir(exist_ok=True)
        lowers, layers_root = [empty.name], upper.parent
    await _mount_layers(layers_root, lowers,
                        f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}", target)


async def mount_readonly_overlay(layers_root: Path, lowers: list[str], target: Path,
                                 empty: Path) -> None:
    """Mount `lowers` (under `layers_root`, topmost first) read-only at `target`.

    Without an upper layer overlayfs wants two lower layers at least: `empty` (made here,
    an empty directory) fills in for missing ones.
    """
    padding = [empty / str(i) for i in range(max(0, 2 - len(lowers)))]

    def make_dirs() -> None:
        for directory in [target, *padding]:
            directory.mkdir(parents=True, exist_ok=True)

    await asyncio.to_thread(make_dirs)
    lowers = lowers + [str(p) for p in padding]
    await _mount_layers(layers_root, lowers, f"ro,lowerdir={':'.join(lowers)}", target)


async def _mount_layers(layers_root: Path, lowers: list[str], options: str,
                        target: Path) -> None:
    if len(options) > MAX_MOUNT_OPTIONS:
        raise FailedPreconditionError(
            f"image has too many layers ({len(lowers)}) to mount as one overlay"
        )
    await _run(["mount", "-t", "overlay", "overlay", "-o", options, str(target)],
               cwd=layers_root)


async def unmount(target: Path) -> None:
    """Unmount `target` if something is mounted there (lazily, so busy mounts go too):
    umount2(MNT_DETACH), with no umount(8) process."""
    await to_thread_to_the_end(_unmount, target)


def _unmount(target: Path) -> None:
    if not is_mountpoint(target):
        return
    try:
        umount_detach(str(target))
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: no longer a mount point (raced)
            raise FailedPreconditionError(f"umount {target} failed: {exc.strerror}") from None


def is_mountpoint(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


async def mount_tmpfs(target: Path, options: str) -> None:
    """A tmpfs at `target` with mount(8)-style `options` (mount(2), no process)."""
    await to_thread_to_the_end(_mount_tmpfs, target, options)


def _mount_tmpfs(target: Path, options: str) -> None:
    flags, data = mount_flags(options)
    target.mkdir(parents=True, exist_ok=True)
    try:
        mount("shm", str(target), "tmpfs", flags, data)
    except OSError as exc:
        raise FailedPreconditionError(f"mount {target} failed: {exc.strerror}") from None


#: mount(8) options that are mount(2) flags
_FLAGS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8}


def mount_flags(options: str) -> tuple[int, str]:
    """mount(8)-style options -> (mount(2) flags, the filesystem's own data string)."""
    flags, data = 0, []
    for option in filter(None, options.split(",")):
        if option in _FLAGS:
            flags |= _FLAGS[option]
        else:
            data.append(option)
    return flags, ",".join(data)


async def _run(argv: list[str], cwd: Path | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), MOUNT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise FailedPreconditionError(f"{argv[0]} {argv[-1]} timed out") from None
    if proc.returncode != 0:
        message = stderr.decode(errors="replace").strip()
        raise FailedPreconditionError(f"{argv[0]} {argv[-1]} failed: {message}")

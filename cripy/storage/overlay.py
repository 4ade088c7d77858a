"""Container root filesystems: an overlay of the image's layers with a writable layer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from cripy.errors import FailedPreconditionError

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
    """Unmount `target` if something is mounted there (lazily, so busy mounts go too)."""
    if is_mountpoint(target):
        await _run(["umount", "-l", str(target)])


def is_mountpoint(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


async def mount_tmpfs(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    await _run(["mount", "-t", "tmpfs", "-o", options, "shm", str(target)])


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

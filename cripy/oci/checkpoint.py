"""Checkpoint archives: CRIU through the OCI runtime, and the archive layout CRI-O and
Podman use (so `checkpointctl` and CRI-O read ours, and we read theirs).

An archive is a tar with:

    checkpoint/       CRIU's images (`runc checkpoint --image-path`)
    config.dump       JSON: id, name, rootfsImage, rootfsImageRef, rootfsImageName,
                      runtime, createdTime, checkpointedTime
    spec.dump         the container's OCI spec, with io.kubernetes.cri-o.* annotations
                      naming the image, the pod and the container
    rootfs-diff.tar   the writable layer's files (whiteouts left out)
    deleted.files     JSON list of the image's paths the container deleted
    container.log     the container's CRI log up to the checkpoint
    dump.log          CRIU's log of the dump

Everything here is blocking (file work, subprocesses) except `dump`: call the rest in a
thread. CRIU support is probed once at start (`probe_criu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cripy.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from cripy.fsutil import atomic_file

CHECKPOINT_DIR = "checkpoint"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
CONTAINER_LOG = "container.log"
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
#: The annotation of an OCI image made from a checkpoint archive (CRI-O's name).
CHECKPOINT_ANNOTATION = "io.kubernetes.cri-o.annotations.checkpoint.name"
#: runc passes the CRIU configuration file this annotation names to CRIU.
CRIU_CONFIG_ANNOTATION = "org.criu.config"

#: A tar layer media type: what apply_layer reads the archive and rootfs-diff.tar as.
_TAR = "application/vnd.oci.image.layer.v1.tar"
PROBE_TIMEOUT = 30.0
#: How many of CRIU's error lines an error message quotes.
_ERROR_LINES = 3


@dataclass(frozen=True)
class CriuSupport:
    """Whether this node can checkpoint and restore, probed once at start."""

    available: bool
    reason: str = ""  # why not, when not
    path: str = ""
    version: str = ""

    def report(self) -> dict[str, str | bool]:
        return {"available": self.available, "reason": self.reason, "criu": self.path,
                "version": self.version}

    def check(self) -> None:
        if not self.available:
            raise FailedPreconditionError(
                f"checkpoint/restore is not available on this node: {self.reason}")


def probe_criu(enabled: bool, binary: str = "criu") -> CriuSupport:
    """`criu --version` and `criu check`; blocking, run once at start."""
    if not enabled:
        return CriuSupport(False, "disabled by [runtime] enable_criu_support = false")
    path = shutil.which(binary)
    if path is None:
        return CriuSupport(False, f"criu is not installed ({binary!r} not found in PATH)")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=PROBE_TIMEOUT, check=False)
        check = subprocess.run([path, "check"], capture_output=True, text=True,
                               timeout=PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CriuSupport(False, f"{path} cannot be run: {exc}", path)
    number = version.stdout.strip().splitlines()[0].removeprefix("Version:").strip() \
        if version.stdout.strip() else ""
    if check.returncode != 0:
        text = criu_errors(check.stdout + check.stderr) or \
            (check.stdout + check.stderr).strip()[-300:]
        return CriuSupport(False, f"`criu check` fails on this kernel: {text}", path, number)
    return CriuSupport(True, "", path, number)


def runtime_criu_problem(runtime_path: str, flavor: str) -> str:
    """Why the OCI runtime cannot checkpoint, or "": crun lists CRIU among its
    `--version` features only when built with it (Debian 12's is not)."""
    if flavor != "crun":
        return ""
    try:
        out = subprocess.run([runtime_path, "--version"], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{runtime_path} cannot be run: {exc}"
    if "+CRIU" not in out.split():
        return f"{runtime_path} is built without CRIU support (no +CRIU in its --version)"
    return ""


def criu_errors(text: str) -> str:
    """The last few "Error (file:line): ..." lines of a CRIU log, joined."""
    found = [line.strip() for line in text.splitlines() if "Error (" in line]
    return "; ".join(found[-_ERROR_LINES:])


def criu_log_errors(path: Path) -> str:
    try:
        return criu_errors(path.read_text(errors="replace"))
    except OSError:
        return ""


async def dump(argv: Sequence[str], what: str, work_dir: Path, timeout: float) -> None:
    """Run the runtime's checkpoint command `argv`; a failure is CRIU's reason from
    dump.log, a timeout kills it (and CRIU with it)."""
    from cripy.oci.runtime import runc_message  # the runtime module imports this one

    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(exc, TimeoutError):
            raise DeadlineExceededError(
                f"{what} did not finish within {timeout:g}s (the timeout)") from None
        raise
    if proc.returncode != 0:
        reason = await asyncio.to_thread(criu_log_errors, work_dir / DUMP_LOG)
        message = runc_message(err)
        raise FailedPreconditionError(
            f"{what} failed: {reason or message or f'exit status {proc.returncode}'}")


# --- locations --------------------------------------------------------------------------

#: Where no checkpoint archive may go.
_FORBIDDEN = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_location(location: str, own_dirs: Iterable[Path]) -> Path:
    """The archive path a request names: absolute, in an existing writable directory,
    not a directory itself, and outside /proc, /sys, /dev and the runtime's own state."""
    if not location:
        raise InvalidArgumentError("checkpoint location is empty")
    path = Path(location)
    if not path.is_absolute():
        raise InvalidArgumentError(f"checkpoint location {location!r} is not an absolute path")
    if ".." in path.parts:
        raise InvalidArgumentError(f"checkpoint location {location!r} contains '..'")
    parent = path.parent
    try:
        real_parent = parent.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidArgumentError(
            f"checkpoint location {location!r}: directory {parent} does not exist") from None
    for forbidden in (*_FORBIDDEN, *own_dirs):
        real = forbidden.resolve()
        if real_parent == real or real in real_parent.parents:
            raise InvalidArgumentError(
                f"checkpoint location {location!r} is inside {forbidden}, where checkpoint "
                "archives are not allowed")
    if not real_parent.is_dir():
        raise InvalidArgumentError(f"checkpoint location {location!r}: {parent} is not a "
                                   "directory")
    if not os.access(real_parent, os.W_OK | os.X_OK):
        raise InvalidArgumentError(
            f"checkpoint location {location!r}: directory {parent} is not writable")
    target = real_parent / path.name
    if target.is_dir() or target.is_symlink():
        raise InvalidArgumentError(
            f"checkpoint location {location!r} is a directory or a symlink, not an archive "
            "path")
    return target


# --- writing an archive -----------------------------------------------------------------


def write_rootfs_diff(upper: Path, lowers: Sequence[Path], excluded: Iterable[str],
                      tar_path: Path) -> list[str]:
    """Tar the writable layer `upper` into `tar_path`; returns the deleted paths
    ("/etc/motd"): overlay whiteouts, and the lower entries an opaque directory hides.

    `excluded` are mount destinations (/proc, /etc/hosts, ...): they and what is below
    them belong to the mounts, not the container's changes. `lowers` are the image's layer
    directories, topmost first.
    """
    import tarfile  # loaded on the first checkpoint, not at start
    skip = {"/" + e.strip("/") for e in excluded if e.strip("/")}
    deleted: list[str] = []
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(upper):
            base = Path(dirpath)
            rel_dir = base.relative_to(upper)
            dirnames.sort()
            names = sorted(dirnames + filenames)
            kept_dirs = []
            for name in names:
                path = base / name
                rel = rel_dir / name
                inner = "/" + rel.as_posix()
                if inner in skip:
                    continue
                st = os.lstat(path)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    deleted.append(inner)
                    continue
                tf.add(path, arcname=rel.as_posix(), recursive=False)
                if stat.S_ISDIR(st.st_mode):
                    kept_dirs.append(name)
                    if _is_opaque(path):
                        present = set(os.listdir(path))
                        deleted += _hidden_below(lowers, rel, present)
            dirnames[:] = [d for d in dirnames if d in kept_dirs]
    return deleted


def _is_opaque(path: Path) -> bool:
    from cripy.image.layer import OPAQUE_XATTR
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _hidden_below(lowers: Sequence[Path], rel: Path, present: set[str]) -> list[str]:
    """The image's entries of directory `rel` that an opaque upper directory hides."""
    hidden: set[str] = set()
    for lower in lowers:
        directory = lower / rel
        if directory.is_dir() and not directory.is_symlink():
            hidden.update(n for n in os.listdir(directory) if n not in present)
    return sorted("/" + (rel / name).as_posix() for name in hidden)


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True))


def write_archive(stage: Path, location: Path) -> None:
    """Tar everything in `stage` to `location` atomically: a temp file beside it, renamed
    when complete; on any failure nothing is left at (or beside) `location`."""
    import tarfile
    with atomic_file(location, 0o600, suffix=".partial") as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for entry in sorted(stage.iterdir()):
            tf.add(entry, arcname=entry.name)


# --- reading an archive -----------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointArchive:
    """An unpacked checkpoint archive."""

    directory: Path
    config: dict[str, Any]
    spec: dict[str, Any]

    @property
    def images(self) -> Path:
        return self.directory / CHECKPOINT_DIR

    @property
    def image_names(self) -> list[str]:
        """The checkpointed container's image, as the archive names it (best first)."""
        annotations = self.spec.get("annotations") or {}
        names = [self.config.get("rootfsImageRef"), self.config.get("rootfsImageName"),
                 self.config.get("rootfsImage"), annotations.get("io.kubernetes.cri-o.ImageRef"),
                 annotations.get("io.kubernetes.cri-o.ImageName")]
        return [n for n in names if isinstance(n, str) and n]

    def deleted_files(self) -> list[str]:
        path = self.directory / DELETED_FILES
        if not path.exists():
            return []
        try:
            value = json.loads(path.read_text())
        except ValueError as exc:
            raise InvalidArgumentError(f"checkpoint archive: {DELETED_FILES} is not JSON: "
                                       f"{exc}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgumentError(f"checkpoint archive: {DELETED_FILES} is not a list "
                                       "of paths")
        return value


def looks_like_archive(image: str) -> bool:
    """CreateContainer's image names a checkpoint archive: an absolute path to a file."""
    return image.startswith("/") and os.path.isfile(image)


def unpack_archive(archive: Path, dest: Path, max_bytes: int) -> CheckpointArchive:
    """Unpack `archive` (untrusted: entries are confined to `dest`, devices refused) into
    the empty directory `dest` and read its metadata."""
    from cripy.image.layer import apply_layer
    label = f"checkpoint archive {archive}"
    try:
        apply_layer(archive, _TAR, dest, max_bytes=max_bytes, allow_devices=False)
    except InvalidArgumentError:
        raise
    except Exception as exc:
        raise InvalidArgumentError(f"{label} cannot be read: {exc}") from None
    return read_unpacked(dest, label)


def read_unpacked(dest: Path, label: str) -> CheckpointArchive:
    if not (dest / CHECKPOINT_DIR / "inventory.img").is_file():
        raise InvalidArgumentError(
            f"{label} is not a checkpoint archive: it has no {CHECKPOINT_DIR}/inventory.img")
    values = []
    for name in (CONFIG_DUMP, SPEC_DUMP):
        try:
            value = json.loads((dest / name).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"{label}: {name} is missing or unreadable: "
                                       f"{exc}") from None
        if not isinstance(value, dict):
            raise InvalidArgumentError(f"{label}: {name} is not a JSON object")
        values.append(value)
    return CheckpointArchive(dest, values[0], values[1])


def apply_rootfs_diff(archive: CheckpointArchive, upper: Path, max_bytes: int) -> None:
    """Put the archive's rootfs-diff.tar into the (empty) writable layer `upper`, before
    the overlay is mounted."""
    tar_path = archive.directory / ROOTFS_DIFF
    upper.mkdir(parents=True, exist_ok=True)
    if tar_path.is_file():
        from cripy.image.layer import apply_layer
        apply_layer(tar_path, _TAR, upper, max_bytes=max_bytes, allow_devices=False)


def remove_deleted(rootfs: Path, paths: Iterable[str]) -> None:
    """Remove `paths` ("/etc/motd") from the mounted `rootfs` (overlayfs writes the
    whiteouts); no component is followed as a symlink, so nothing outside is touched."""
    for raw in paths:
        parts = [p for p in raw.split("/") if p and p != "."]
        if not parts or ".." in parts:
            raise InvalidArgumentError(f"checkpoint archive: bad deleted path {raw!r}")
        fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                                  os.O_CLOEXEC, dir_fd=fd)
                except OSError:
                    nxt = -1
                os.close(fd)
                fd = nxt
                if fd < 0:
                    break
            if fd >= 0:
                _remove_at(fd, parts[-1])
        finally:
            if fd >= 0:
                os.close(fd)


def _remove_at(dir_fd: int, name: str) -> None:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def write_criu_restore_config(path: Path) -> None:
    """CRIU options for the restore (through runc's org.criu.config annotation): a pod
    has a new IP, so TCP connections cannot be restored; close them instead."""
    path.write_text("tcp-close\n")


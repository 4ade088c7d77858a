"""What each runtime handler can do on this host, probed once at start.

Two features of the CRI's Status depend on both the kernel and the OCI runtime:

- recursive read-only mounts: the kernel's mount_setattr(2) with MOUNT_ATTR_RDONLY and
  AT_RECURSIVE, and a runtime that knows the `rro` mount option;
- user namespaces: idmapped mounts of cripy's layer store (the rootfs is an overlay of
  idmapped layers) and a runtime that idmaps volume mounts (OCI mount uidMappings).

The kernel part is tried for real: a forked child enters a private mount namespace of
its own, makes scratch mounts, sets the attributes, checks the result, and tells what
failed. The runtime part comes from `<runtime>
features` where the runtime has that command, else from version facts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cripy.oci import idmap

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 20.0
#: The host IDs the probe maps container ID 0 to (anything not in use works).
PROBE_HOST_ID = 3_000_000_000
#: crun has no `features` command before 1.9; these are the versions from which it does
#: what is needed (it handles the `rro` option and per-mount uidMappings/gidMappings).
CRUN_RRO_SINCE = (1, 4)
CRUN_IDMAP_SINCE = (1, 8)
#: StatusResponse.features, the same for every handler: SupplementalGroupsPolicy (Merge
#: and Strict, cripy.oci.user) is implemented; a user namespace with the host's network
#: is not (such pods are refused).
RUNTIME_FEATURES = {"supplemental_groups_policy": True, "user_namespaces_host_network": False}


@dataclass(frozen=True)
class Feature:
    supported: bool
    #: why not, when not supported
    reason: str = ""

    def report(self) -> dict[str, str | bool]:
        return {"supported": self.supported, "reason": self.reason}


@dataclass(frozen=True)
class HandlerFeatures:
    recursive_read_only: Feature = Feature(False, "not probed")
    user_namespaces: Feature = Feature(False, "not probed")

    def report(self) -> dict[str, dict[str, str | bool]]:
        return {"recursive_read_only": self.recursive_read_only.report(),
                "user_namespaces": self.user_namespaces.report()}


@dataclass(frozen=True)
class KernelFeatures:
    """Why the kernel cannot do each thing ("" when it can)."""

    recursive_read_only: str = "not probed"
    idmapped_layers: str = "not probed"


@dataclass(frozen=True)
class RuntimeFeatures:
    """What the OCI runtime itself supports ("" when it does, else why not)."""

    rro_option: str
    idmapped_mounts: str


def _version_tuple(version: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else ()


def runtime_features(path: str, flavor: str, version: str) -> RuntimeFeatures:
    """From `<path> features` (runc 1.1+, crun 1.9+), else from crun's version."""
    try:
        proc = subprocess.run([path, "features"], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT, check=False)
        data: Any = json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        data = None
    name = f"{flavor or path} {version}".strip()
    if isinstance(data, dict):
        options = data.get("mountOptions") or []
        linux = data.get("linux") or {}
        ext = (linux.get("mountExtensions") or {}) if isinstance(linux, dict) else {}
        idmap_ext = ext.get("idmap") or {} if isinstance(ext, dict) else {}
        return RuntimeFeatures(
            "" if "rro" in options else f"{name} does not list the 'rro' mount option",
            "" if isinstance(idmap_ext, dict) and idmap_ext.get("enabled") else
            f"{name} has no idmapped mounts ('{os.path.basename(path)} features' reports "
            "no linux.mountExtensions.idmap)")
    if flavor == "crun":
        have = _version_tuple(version)
        return RuntimeFeatures(
            "" if have >= CRUN_RRO_SINCE else f"{name} predates the 'rro' mount option",
            "" if have >= CRUN_IDMAP_SINCE else f"{name} predates idmapped mounts")
    unknown = f"{name} has no 'features' command to tell"
    return RuntimeFeatures(unknown, unknown)


def combine(handler_problem: str, kernel: KernelFeatures, runtime: RuntimeFeatures
            ) -> HandlerFeatures:
    """A handler's features: the handler usable, and both the kernel and runtime able."""
    def one(*problems: str) -> Feature:
        if handler_problem:
            return Feature(False, f"the handler is unusable here: {handler_problem}")
        found = [p for p in problems if p]
        return Feature(not found, "; ".join(found))
    return HandlerFeatures(
        recursive_read_only=one(kernel.recursive_read_only, runtime.rro_option),
        user_namespaces=one(kernel.idmapped_layers, runtime.idmapped_mounts))


def probe_kernel(storage_root: Path) -> KernelFeatures:
    """Run the kernel probe in a forked child (it needs a mount namespace of its own,
    and a child needs no Python start-up: the daemon calls this once, before it serves).
    """
    storage_root.mkdir(parents=True, exist_ok=True, mode=0o711)
    scratch = Path(tempfile.mkdtemp(prefix=".features-probe-", dir=storage_root))
    try:
        result = json.loads(_in_child(lambda: json.dumps(_probe(scratch)).encode()))
        return KernelFeatures(str(result["recursive_read_only"]),
                              str(result["idmapped_layers"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = f"the kernel feature probe failed: {exc}"
        log.warning("%s", reason)
        return KernelFeatures(reason, reason)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _in_child(work: Callable[[], bytes]) -> bytes:
    """What `work` returns, run in a forked child that is killed after PROBE_TIMEOUT."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, work())
        finally:
            os._exit(0)
    os.close(w)
    chunks: list[bytes] = []
    try:
        deadline = time.monotonic() + PROBE_TIMEOUT
        while True:
            ready, _, _ = select.select([r], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise OSError(f"no answer in {PROBE_TIMEOUT:g}s")
            chunk = os.read(r, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# --- the probe itself (in its own process and mount namespace) ------------------------


def _probe_rro(scratch: Path) -> str:
    top, sub = scratch / "rro", scratch / "rro" / "sub"
    top.mkdir()
    idmap.mount("probe", str(top), "tmpfs", 0, "size=64k")
    sub.mkdir()
    idmap.mount("probe", str(sub), "tmpfs", 0, "size=64k")
    try:
        idmap.mount_setattr(str(top), idmap.MOUNT_ATTR_RDONLY, recursive=True)
    except OSError as exc:
        return f"the kernel has no recursive mount_setattr(MOUNT_ATTR_RDONLY): {exc.strerror}"
    if not os.statvfs(sub).f_flag & os.ST_RDONLY:
        return "mount_setattr(MOUNT_ATTR_RDONLY, AT_RECURSIVE) left a submount writable"
    return ""


def _probe_idmapped_layers(scratch: Path) -> str:
    lower, mapped = scratch / "lower", scratch / "mapped"
    upper, work, merged = scratch / "upper", scratch / "work", scratch / "merged"
    for d in (lower, mapped, upper, work, merged):
        d.mkdir()
    (lower / "file").write_text("x")
    probe_map = [idmap.IDMap(0, PROBE_HOST_ID, 65536)]
    with idmap.in_new_userns(probe_map, probe_map) as pid:
        userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fd = idmap.idmapped_clone(str(lower), userns)
        except OSError as exc:
            return (f"the filesystem of the layer store ({scratch.parent}) cannot be "
                    f"idmapped on Linux {os.uname().release}: {exc.strerror}")
        finally:
            os.close(userns)
    try:
        idmap.move_mount(fd, str(mapped))
    finally:
        os.close(fd)
    if os.stat(mapped / "file").st_uid != PROBE_HOST_ID:
        return "an idmapped mount of the layer store does not shift file owners"
    try:
        idmap.mount("overlay", str(merged), "overlay", 0,
                    f"lowerdir={mapped},upperdir={upper},workdir={work}")
    except OSError as exc:
        return (f"overlayfs refuses idmapped lower layers on Linux "
                f"{os.uname().release}: {exc.strerror}")
    if os.stat(merged / "file").st_uid != PROBE_HOST_ID:
        return "overlayfs over idmapped layers does not keep their shifted owners"
    return ""


def _probe(scratch: Path) -> dict[str, str]:
    try:
        idmap.unshare(idmap.CLONE_NEWNS)
        idmap.mount("none", "/", None, idmap.MS_REC | idmap.MS_PRIVATE)
    except OSError as exc:
        reason = f"cannot make a private mount namespace to probe in: {exc.strerror}"
        return {"recursive_read_only": reason, "idmapped_layers": reason}
    result = {}
    for key, probe in (("recursive_read_only", _probe_rro),
                       ("idmapped_layers", _probe_idmapped_layers)):
        try:
            result[key] = probe(scratch)
        except OSError as exc:
            result[key] = f"probe failed: {exc}"
    return result


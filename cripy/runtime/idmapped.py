"""The rootfs of a container in a pod with its own user namespace: an overlay of
idmapped layers (cripy.oci.userns), with the writable layer owned by the pod's root."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from cripy.oci.userns import PodUserns, idmap_layers, prepare_upper, release_layers
from cripy.runtime.ports import Host


async def mount_idmapped_rootfs(host: Host, userns: PodUserns, layers_root: Path,
                                lowers: Sequence[str], record_dir: Path, rootfs: Path
                                ) -> None:
    """Like Host.mount_overlay over record_dir/upper and work, each layer idmapped.

    The idmapped clones only live while the overlay is mounted over them: overlayfs
    keeps private copies of its layers, so they are detached right after.
    """
    into = record_dir / "idmapped"
    upper = record_dir / "upper"
    await asyncio.to_thread(prepare_upper, upper, userns)
    names = await asyncio.to_thread(idmap_layers, userns.path, layers_root, lowers, into)
    try:
        await host.mount_overlay(into, names, upper, record_dir / "work", rootfs)
    finally:
        await asyncio.to_thread(release_layers, into)

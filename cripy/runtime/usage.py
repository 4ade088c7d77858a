"""Stats collection: what ContainerStats, PodSandboxStats and their metrics report.

Records are copied into plain snapshots on the event loop; the cgroup, /proc/net/dev and
writable-layer reads then run in one thread per request (cripy.server.stats turns the
samples into CRI messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cripy.api import api_pb2 as pb
from cripy.errors import InvalidArgumentError
from cripy.runtime.cgroup_metrics import ExtraStats, read_extra_stats
from cripy.runtime.stats import (
    CgroupStats,
    CpuRates,
    InterfaceStats,
    LayerUsage,
    LayerUsageCache,
    combine,
    read_cgroup_stats,
    read_net_dev,
    read_net_devs,
)
from cripy.runtime.store import Container, ContainerState, PodState, Sandbox

if TYPE_CHECKING:
    from cripy.runtime.container import ContainerManager
    from cripy.runtime.sandbox import SandboxManager

log = logging.getLogger(__name__)

POD_CONTAINER_LABEL = "POD"  # the "container" label of pod-level metrics, as cadvisor's

# Shared by every collector in the process: ImageFsInfo and the stats RPCs use one cache.
layer_cache = LayerUsageCache()
cpu_rates = CpuRates()


# --- snapshots taken on the event loop ----------------------------------------------------


@dataclass(frozen=True)
class ContainerRef:
    id: str
    attributes: pb.ContainerAttributes
    cgroup: str | None  # None: no cgroup to read (not running)
    upper: Path
    mountpoint: str
    labels: tuple[str, ...]  # container, id, image, name, namespace, pod
    resources: pb.LinuxContainerResources
    started_at: int


@dataclass(frozen=True)
class PodRef:
    id: str
    attributes: pb.PodSandboxAttributes
    netns: str | None  # None: host network or not ready
    cgroup: str | None  # the pod's own cgroup parent, when no other pod shares it
    labels: tuple[str, ...]
    containers: list[ContainerRef]


@dataclass
class ContainerSample:
    ref: ContainerRef
    cgroup: CgroupStats | None
    layer: LayerUsage
    fs: os.statvfs_result | None = None
    cpu_rate: int | None = None  # usage_nano_cores, once two samples are far enough apart
    extra: ExtraStats | None = None  # what only the metrics need (with_fs_info)


@dataclass
class PodSample:
    ref: PodRef
    cgroup: CgroupStats | None
    network: dict[str, InterfaceStats] | None
    network_ts: int
    containers: list[ContainerSample] = field(default_factory=list)
    cpu_rate: int | None = None


def container_ref(c: Container, sandbox: Sandbox | None, containers: ContainerManager
                   ) -> ContainerRef:
    cgroup = None
    if sandbox is not None and c.live:
        # Where the cgroup driver put it: a directory, or a systemd scope unit's cgroup.
        with contextlib.suppress(InvalidArgumentError):
            cgroup = containers.oci.container_cgroup(sandbox.config.linux.cgroup_parent, c.id,
                                                     sandbox.runtime_handler)
    meta = sandbox.config.metadata if sandbox is not None else pb.PodSandboxMetadata()
    return ContainerRef(
        id=c.id,
        attributes=pb.ContainerAttributes(id=c.id, metadata=c.config.metadata,
                                          labels=c.config.labels,
                                          annotations=c.config.annotations),
        cgroup=cgroup,
        upper=containers.upper_dir(c.id),
        mountpoint=str(containers.layers_root),
        labels=(c.config.metadata.name, c.id, c.config.image.image, c.name, meta.namespace,
                meta.name),
        resources=c.config.linux.resources,
        started_at=c.started_at,
    )


def _pod_cgroup(sandbox: Sandbox, sandboxes: SandboxManager,
                owners: Mapping[str, list[str]] | None = None) -> str | None:
    """The pod's cgroup parent when it is the pod's own (as the kubelet's pod<uid> cgroups
    are); a default or shared parent holds other pods too, so the containers are summed.
    `owners` (from `_pod_dirs`) saves looking at every other pod again, for each pod."""
    driver = sandboxes.oci.cgroups
    try:
        parent = driver.pod_dir(sandbox.config.linux.cgroup_parent)
        if parent == driver.pod_dir(""):
            return None  # the driver's default parent
    except InvalidArgumentError:  # a parent of another driver's kind (kept from before)
        return None
    if owners is None:
        owners = _pod_dirs(sandboxes)
    if any(other != sandbox.id for other in owners.get(parent, ())):
        return None
    return parent


def _pod_dirs(sandboxes: SandboxManager) -> dict[str, list[str]]:
    """Every pod's cgroup parent (as `pod_dir`), with the IDs of the pods under it."""
    driver = sandboxes.oci.cgroups
    owners: dict[str, list[str]] = {}
    for other in sandboxes.all():
        with contextlib.suppress(InvalidArgumentError):
            owners.setdefault(driver.pod_dir(other.config.linux.cgroup_parent),
                              []).append(other.id)
    return owners


# --- blocking reads (in a thread) ---------------------------------------------------------


def sample_container(ref: ContainerRef, with_fs_info: bool = False) -> ContainerSample:
    stats = read_cgroup_stats(ref.cgroup) if ref.cgroup else None
    sample = ContainerSample(ref, stats, layer_cache.get(ref.id, ref.upper))
    if stats is not None:
        sample.cpu_rate = cpu_rates.update(ref.id, stats.cpu_usage_ns, stats.timestamp_ns)
    if with_fs_info:
        try:
            sample.fs = os.statvfs(ref.mountpoint)
        except OSError:
            sample.fs = None
        if stats is not None and ref.cgroup:
            sample.extra = read_extra_stats(ref.cgroup)
    return sample


def sample_pod(ref: PodRef, with_fs_info: bool = False,
               network_read: dict[str, InterfaceStats] | OSError | None = None) -> PodSample:
    """`network_read`: the pod's /proc/net/dev when already read (see `sample_pods`)."""
    containers = [sample_container(c, with_fs_info) for c in ref.containers]
    stats = read_cgroup_stats(ref.cgroup) if ref.cgroup else None
    if stats is None:
        stats = combine(s.cgroup for s in containers if s.cgroup is not None)
    network = None
    if ref.netns:
        try:
            if network_read is None:
                network_read = read_net_dev(ref.netns)
            if isinstance(network_read, OSError):
                raise network_read
            network = network_read
        except OSError as exc:  # the pod was stopped under us
            log.debug("pod %s: reading network stats failed: %s", ref.id[:12], exc)
    sample = PodSample(ref, stats, network, time.time_ns(), containers)
    if stats is not None:
        sample.cpu_rate = cpu_rates.update(f"pod/{ref.id}", stats.cpu_usage_ns,
                                           stats.timestamp_ns)
    return sample


def sample_pods(refs: list[PodRef], with_fs_info: bool = False) -> list[PodSample]:
    """`sample_pod` of each; the network namespaces are all read by one thread."""
    paths = [r.netns for r in refs if r.netns]
    networks = dict(zip(paths, read_net_devs(paths), strict=True)) if paths else {}
    return [sample_pod(r, with_fs_info, networks.get(r.netns) if r.netns else None)
            for r in refs]


# --- the collector ------------------------------------------------------------------------


class StatsCollector:
    """Samples of the containers and pods of `containers` and `sandboxes`."""

    def __init__(self, containers: ContainerManager, sandboxes: SandboxManager) -> None:
        self.containers = containers
        self.sandboxes = sandboxes

    async def container(self, container_id: str) -> ContainerSample:
        ref = self._container_ref(await self.containers.get(container_id))
        return await asyncio.to_thread(sample_container, ref)

    async def containers_matching(self, flt: pb.ContainerFilter) -> list[ContainerSample]:
        refs = [self._container_ref(c) for c in await self.containers.matching(flt)]
        self._prune()
        return await asyncio.to_thread(lambda: [sample_container(r) for r in refs])

    async def pod(self, sandbox_id: str) -> PodSample:
        ref = self._pod_ref(self.sandboxes.get(sandbox_id))
        return await asyncio.to_thread(sample_pod, ref)

    async def pods_matching(self, flt: pb.PodSandboxFilter | None,
                            with_fs_info: bool = False) -> list[PodSample]:
        owners = _pod_dirs(self.sandboxes)
        refs = [self._pod_ref(s, owners) for s in self.sandboxes.matching(flt)]
        self._prune()
        return await asyncio.to_thread(sample_pods, refs, with_fs_info)

    async def writable_layers(self) -> list[LayerUsage]:
        """The usage of every container's writable layer (on `containers.layers_root`)."""
        refs = [(c.id, self.containers.upper_dir(c.id)) for c in self.containers.all()]
        return await asyncio.to_thread(lambda: [layer_cache.get(key, upper)
                                                for key, upper in refs])

    def _container_ref(self, c: Container) -> ContainerRef:
        return container_ref(c, self.sandboxes.find(c.sandbox_id), self.containers)

    def _pod_ref(self, sandbox: Sandbox,
                 owners: Mapping[str, list[str]] | None = None) -> PodRef:
        meta = sandbox.config.metadata
        ready = sandbox.state == PodState.READY
        netns = sandbox.namespaces.get("net") if ready else None
        return PodRef(
            id=sandbox.id,
            attributes=pb.PodSandboxAttributes(id=sandbox.id, metadata=meta,
                                               labels=sandbox.config.labels,
                                               annotations=sandbox.config.annotations),
            netns=netns,
            cgroup=_pod_cgroup(sandbox, self.sandboxes, owners) if ready else None,
            labels=(POD_CONTAINER_LABEL, sandbox.id, "", sandbox.name, meta.namespace,
                    meta.name),
            containers=[self._container_ref(c) for c in self.containers.in_sandbox(sandbox.id)
                        if c.state != ContainerState.CREATING],
        )

    def _prune(self) -> None:
        """Forget cached samples of removed containers and pods."""
        live = {c.id for c in self.containers.all()}
        layer_cache.prune(live)
        cpu_rates.prune(live | {f"pod/{s.id}" for s in self.sandboxes.all()})

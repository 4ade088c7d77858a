"""The NRI adaptation: what the pod and container lifecycle tells the plugins, and what
their answers change.

The lifecycle controllers (cripy/runtime/sandbox.py and container.py) call one method
here at each point of a pod's and a container's life; without plugins every call returns
at once. Every event is dispatched under one lock, which the synchronization of a newly
connected plugin holds too: an object is either in the snapshot a plugin is synchronized
with, or its event reaches that plugin afterwards, never neither.

Which plugin answers fail the CRI call (as in containerd): RunPodSandbox, CreateContainer
(errors and adjustment conflicts), StartContainer and UpdateContainer. The others are
logged. Updates of containers that plugins ask for are applied through the runtime's
update path after the lock is released (never while holding it: the update takes the
container's lock, which a create or update holding that lock may be waiting on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cripy.api import api_pb2 as pb
from cripy.config import NriConfig
from cripy.errors import CripyError, NotFoundError
from cripy.nri import api_pb2 as nri
from cripy.nri.adjust import (
    CreateResult,
    Owners,
    apply_adjustment,
    cri_to_nri_resources,
    inject_cdi_devices,
    merge_resources,
    merge_update,
    update_to_cri,
)
from cripy.nri.plugins import Plugin, PluginError, PluginRegistry
from cripy.nri.ttrpc import MAX_MESSAGE_LENGTH
from cripy.oci import cdi
from cripy.runtime.events import STOPPED
from cripy.runtime.store import Container, ContainerState, PodState, Sandbox

if TYPE_CHECKING:
    from cripy.runtime.container import ContainerManager
    from cripy.runtime.events import EventBus
    from cripy.runtime.sandbox import SandboxManager

log = logging.getLogger(__name__)

_STATES = {ContainerState.CREATING: nri.CONTAINER_CREATED,
           ContainerState.CREATED: nri.CONTAINER_CREATED,
           ContainerState.RUNNING: nri.CONTAINER_RUNNING,
           ContainerState.EXITED: nri.CONTAINER_STOPPED}
EVICT_TIMEOUT = 0.0
RESCTRL_INFO = "/sys/fs/resctrl/info"


@dataclass
class FollowUps:
    """What an UpdateContainer's plugins asked for besides the container's resources."""

    updates: list[nri.ContainerUpdate] = field(default_factory=list)
    evictions: list[nri.ContainerEviction] = field(default_factory=list)


class Nri:
    """The lifecycle's view of NRI. Inert until `start` (NRI off: it stays so)."""

    def __init__(self) -> None:
        self.registry: PluginRegistry | None = None
        self.lock = asyncio.Lock()
        self._sandboxes: SandboxManager | None = None
        self._containers: ContainerManager | None = None
        self._announced: set[str] = set()  # pods and containers plugins were told of
        self._stop_told: set[str] = set()  # containers whose StopContainer went out
        self._shown: dict[str, nri.Container] = {}  # containers as created (adjusted)
        self._watcher: asyncio.Task[None] | None = None
        self._resctrl = False
        self._cdi_spec_dirs: list[str] = []  # where plugins' CDI devices resolve

    # --- daemon wiring ------------------------------------------------------------------

    async def start(self, config: NriConfig, runtime_version: str,
                    sandboxes: SandboxManager, containers: ContainerManager,
                    events: EventBus) -> None:
        self._sandboxes, self._containers = sandboxes, containers
        self._cdi_spec_dirs = list(containers.config.cdi.spec_dirs)
        # Everything that exists now was made before any plugin could be told.
        self._announced = {s.id for s in sandboxes.all()} | {c.id for c in containers.all()}
        self._stop_told = {c.id for c in containers.all() if not c.live}
        self._resctrl = await asyncio.to_thread(os.path.isdir, RESCTRL_INFO)
        self.registry = PluginRegistry(config, runtime_version, self._synchronize,
                                       self._unsolicited_updates)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_exits(events))
        await self.registry.start()

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.registry is not None:
            await self.registry.stop()

    def _plugins(self, event: int) -> list[Plugin]:
        return [] if self.registry is None else self.registry.subscribed(event)

    async def _watch_exits(self, events: EventBus) -> None:
        """Containers that exit on their own: StopContainer, once."""
        async for event in events.subscribe():
            if event.kind != STOPPED or event.object_id == event.sandbox_id:
                continue
            container = self._find_container(event.object_id)
            if container is not None:
                try:
                    await self.stop_container(container)
                except Exception:  # noqa: BLE001 - one bad plugin must not end the watch
                    log.exception("NRI StopContainer for %s failed", event.object_id[:12])

    def _find_container(self, container_id: str) -> Container | None:
        return None if self._containers is None else self._containers.store.find(container_id)

    # --- what plugins are shown ---------------------------------------------------------

    def pod(self, sandbox: Sandbox) -> nri.PodSandbox:
        config = sandbox.config
        out = nri.PodSandbox(
            id=sandbox.id, name=config.metadata.name, uid=config.metadata.uid,
            namespace=config.metadata.namespace, labels=dict(config.labels),
            annotations=dict(config.annotations), runtime_handler=sandbox.runtime_handler,
            pid=sandbox.infra_pid or 0, ips=list(sandbox.ips))
        out.linux.cgroup_parent = config.linux.cgroup_parent
        for kind, path in sorted(sandbox.namespaces.items()):
            out.linux.namespaces.add(type="network" if kind == "net" else kind, path=path)
        if config.linux.HasField("resources"):
            out.linux.pod_resources.CopyFrom(cri_to_nri_resources(config.linux.resources))
        if config.linux.HasField("overhead"):
            out.linux.pod_overhead.CopyFrom(cri_to_nri_resources(config.linux.overhead))
        return out

    def container(self, container: Container) -> nri.Container:
        """The container with its current state (as created, if created since start)."""
        out = nri.Container()
        shown = self._shown.get(container.id)
        if shown is not None:
            out.CopyFrom(shown)
        else:
            config = container.config
            out.args.extend([*config.command, *config.args])
            out.env.extend(f"{kv.key}={kv.value}" for kv in config.envs)
            for m in config.mounts:
                out.mounts.add(destination=m.container_path, source=m.host_path, type="bind",
                               options=["rbind", "ro" if m.readonly else "rw"])
            out.linux.resources.CopyFrom(cri_to_nri_resources(config.linux.resources))
            out.labels.update(config.labels)
            out.annotations.update(config.annotations)
            out.CDI_devices.extend(nri.CDIDevice(name=d.name) for d in config.CDI_devices)
        out.id, out.pod_sandbox_id = container.id, container.sandbox_id
        out.name = container.config.metadata.name
        out.state = _STATES[container.state]
        out.pid = container.pid
        out.created_at, out.started_at = container.created_at, container.started_at
        out.finished_at, out.exit_code = container.finished_at, container.exit_code
        out.status_reason, out.status_message = container.reason, container.message
        return out

    def _pod_of(self, container: Container) -> nri.PodSandbox:
        sandbox = None if self._sandboxes is None else \
            self._sandboxes.find(container.sandbox_id)
        if sandbox is None:
            return nri.PodSandbox(id=container.sandbox_id)
        return self.pod(sandbox)

    # --- dispatch -----------------------------------------------------------------------

    async def _notify(self, event: int, pod: nri.PodSandbox,
                      container: nri.Container | None, *, fail: bool,
                      announce: str = "") -> None:
        """A notification to every subscribed plugin, in index order. `announce`: the ID
        of the object this event makes known (whatever the plugins answer)."""
        registry = self.registry
        if registry is None:
            return
        async with self.lock:
            try:
                for plugin in self._plugins(event):
                    try:
                        await registry.event(plugin, event, pod, container)
                    except PluginError as exc:
                        if fail:
                            raise
                        log.warning("%s", exc)
            finally:
                if announce:
                    self._announced.add(announce)

    async def _container_event(self, event: int, container: Container, *, fail: bool
                               ) -> None:
        if self.registry is not None:
            await self._notify(event, self._pod_of(container), self.container(container),
                               fail=fail)

    # --- pods ---------------------------------------------------------------------------

    async def run_pod_sandbox(self, sandbox: Sandbox) -> None:
        """Before the pod turns ready (and visible). A plugin error fails RunPodSandbox."""
        await self._notify(nri.RUN_POD_SANDBOX, self.pod(sandbox), None, fail=True,
                           announce=sandbox.id)

    async def pod_failed(self, sandbox_id: str) -> None:
        """A pod whose RunPodSandbox failed after plugins heard of it: they hear it go."""
        if sandbox_id in self._announced and self._sandboxes is not None:
            sandbox = self._sandboxes.find(sandbox_id)
            if sandbox is not None:
                await self.remove_pod_sandbox(sandbox, [], was_ready=True)
        self._announced.discard(sandbox_id)

    async def stop_pod_sandbox(self, sandbox: Sandbox, members: Iterable[Container]) -> None:
        """Its containers are stopped; the pod is still there (queryable)."""
        for container in members:
            current = self._find_container(container.id)
            if current is not None:
                await self.stop_container(current)
        await self._notify(nri.STOP_POD_SANDBOX, self.pod(sandbox), None, fail=False)

    async def remove_pod_sandbox(self, sandbox: Sandbox, members: Iterable[Container], *,
                                 was_ready: bool) -> None:
        """After the pod and its containers are gone."""
        members = list(members)
        if was_ready:
            await self.stop_pod_sandbox(sandbox, [])
        for container in members:
            await self.remove_container(container)
        if sandbox.id in self._announced:
            await self._notify(nri.REMOVE_POD_SANDBOX, self.pod(sandbox), None, fail=False)
        self._announced.discard(sandbox.id)

    async def update_pod_sandbox(self, sandbox: Sandbox, overhead: pb.LinuxContainerResources,
                                 resources: pb.LinuxContainerResources) -> None:
        registry = self.registry
        if registry is None:
            return
        request = nri.UpdatePodSandboxRequest(
            pod=self.pod(sandbox), overhead_linux_resources=cri_to_nri_resources(overhead),
            linux_resources=cri_to_nri_resources(resources))
        async with self.lock:
            for plugin in self._plugins(nri.UPDATE_POD_SANDBOX):
                await registry.call(plugin, "UpdatePodSandbox", request,
                                    nri.UpdatePodSandboxResponse)
        await self._notify(nri.POST_UPDATE_POD_SANDBOX, self.pod(sandbox), None, fail=False)

    # --- containers ---------------------------------------------------------------------

    async def create_container(self, sandbox: Sandbox, container: Container,
                               spec: dict[str, Any], *, cgroup_v2: bool) -> None:
        """Ask the plugins; apply their merged adjustments to `spec` (in place). A plugin
        error or a conflict between plugins fails CreateContainer."""
        registry = self.registry
        if registry is None:
            return
        evictions: list[nri.ContainerEviction] = []
        async with self.lock:
            pristine = container_from_spec(self.container(container), spec)
            result = CreateResult(nri.Container())
            result.container.CopyFrom(pristine)
            self._shown[container.id] = result.container
            self._announced.add(container.id)  # a failure tells the plugins it is gone
            pod = self.pod(sandbox)
            for plugin in self._plugins(nri.CREATE_CONTAINER):
                request = nri.CreateContainerRequest(pod=pod, container=result.container)
                reply = await registry.call(plugin, "CreateContainer", request,
                                            nri.CreateContainerResponse)
                if reply is not None:
                    result.apply(reply, plugin.full_name)
                    evictions.extend(reply.evict)
            await self._validate(registry, pod, pristine, result)
            apply_adjustment(spec, result.adjust, cgroup_v2=cgroup_v2,
                             privileged=container.config.linux.security_context.privileged,
                             resctrl=self._resctrl)
            requests = result.cdi_requests()
            if requests:  # after the other adjustments, as containerd does
                await asyncio.to_thread(inject_cdi_devices, spec, requests,
                                        self._cdi_spec_dirs,
                                        applied=cdi.requested_devices(container.config))
        await self._apply_updates(list(result.updates.values()), fail=True)
        await self._evict(evictions)

    async def _validate(self, registry: PluginRegistry, pod: nri.PodSandbox,
                        pristine: nri.Container, result: CreateResult) -> None:
        """Validating plugins (NRI v0.12) may reject the merged adjustment."""
        validators = self._plugins(nri.VALIDATE_CONTAINER_ADJUSTMENT)
        if not validators:
            return
        request = nri.ValidateContainerAdjustmentRequest(
            pod=pod, container=pristine, adjust=result.adjust,
            update=list(result.updates.values()),
            plugins=[nri.PluginInstance(name=p.name, index=p.index)
                     for p in self._plugins(nri.CREATE_CONTAINER)])
        for plugin in validators:
            reply = await registry.call(plugin, "ValidateContainerAdjustment", request,
                                        nri.ValidateContainerAdjustmentResponse)
            if reply is not None and reply.reject:
                raise PluginError(f"NRI plugin {plugin.full_name} rejected the adjustments "
                                  f"of container {pristine.name!r}: "
                                  f"{reply.reason or 'no reason given'}")

    async def container_failed(self, container_id: str) -> None:
        """A create that failed after plugins heard of it: they hear it go."""
        container = self._find_container(container_id)
        if container is not None and container_id in self._announced:
            await self.remove_container(container)
        self._forget(container_id)

    async def post_create_container(self, container: Container) -> None:
        await self._container_event(nri.POST_CREATE_CONTAINER, container, fail=False)

    async def start_container(self, container: Container) -> None:
        """Before the process starts; a plugin error fails StartContainer."""
        await self._container_event(nri.START_CONTAINER, container, fail=True)

    async def post_start_container(self, container: Container) -> None:
        await self._container_event(nri.POST_START_CONTAINER, container, fail=False)

    async def update_container(self, container: Container,
                               resources: pb.LinuxContainerResources
                               ) -> tuple[pb.LinuxContainerResources, FollowUps]:
        """The resources to apply (plugins may change them) and what to do once the
        container's lock is released (`after_update`). A plugin error or a conflict fails
        UpdateContainerResources."""
        follow_ups = FollowUps()
        registry = self.registry
        if registry is None:
            return resources, follow_ups
        wanted = cri_to_nri_resources(resources)
        async with self.lock:
            owners = Owners()
            updates: dict[str, nri.ContainerUpdate] = {}
            for plugin in self._plugins(nri.UPDATE_CONTAINER):
                request = nri.UpdateContainerRequest(
                    pod=self._pod_of(container), container=self.container(container),
                    linux_resources=wanted)
                reply = await registry.call(plugin, "UpdateContainer", request,
                                            nri.UpdateContainerResponse)
                if reply is None:
                    continue
                for update in reply.update:
                    if update.container_id == container.id:
                        if update.linux.HasField("resources"):
                            merge_resources(wanted, update.linux.resources, owners,
                                            container.id, plugin.full_name)
                    else:
                        merge_update(updates, update, owners, plugin.full_name)
                follow_ups.evictions.extend(reply.evict)
        follow_ups.updates.extend(updates.values())
        return update_to_cri(resources, wanted), follow_ups

    async def after_update(self, container: Container, follow_ups: FollowUps) -> None:
        """Outside the container's lock: others' updates, evictions, PostUpdateContainer."""
        await self._apply_updates(follow_ups.updates, fail=False)
        await self._evict(follow_ups.evictions)
        current = self._find_container(container.id)
        if current is not None:
            await self._container_event(nri.POST_UPDATE_CONTAINER, current, fail=False)

    async def stop_container(self, container: Container) -> None:
        """After it stopped (CRI StopContainer, the pod's stop, or an exit), once."""
        if container.id in self._stop_told or container.id not in self._announced:
            return
        self._stop_told.add(container.id)
        registry = self.registry
        if registry is None:
            return
        updates: dict[str, nri.ContainerUpdate] = {}
        async with self.lock:
            owners = Owners()
            request = nri.StopContainerRequest(pod=self._pod_of(container),
                                               container=self.container(container))
            for plugin in self._plugins(nri.STOP_CONTAINER):
                try:
                    reply = await registry.call(plugin, "StopContainer", request,
                                                nri.StopContainerResponse)
                except PluginError as exc:
                    log.warning("%s", exc)
                    continue
                for update in reply.update if reply is not None else []:
                    try:
                        merge_update(updates, update, owners, plugin.full_name)
                    except CripyError as exc:
                        log.warning("NRI StopContainer updates: %s", exc)
        await self._apply_updates(list(updates.values()), fail=False)

    async def remove_container(self, container: Container) -> None:
        """After it is gone."""
        if container.id in self._announced:
            if container.id not in self._stop_told:
                await self.stop_container(container)
            await self._container_event(nri.REMOVE_CONTAINER, container, fail=False)
        self._forget(container.id)

    def _forget(self, container_id: str) -> None:
        self._announced.discard(container_id)
        self._stop_told.discard(container_id)
        self._shown.pop(container_id, None)

    # --- synchronization and updates from plugins ----------------------------------------

    async def _synchronize(self, plugin: Plugin) -> None:
        """A configured plugin: the present pods and containers, then its events."""
        registry = self.registry
        if registry is None or self._sandboxes is None or self._containers is None:
            return
        async with self.lock:
            pods = [self.pod(s) for s in self._sandboxes.all()
                    if s.state != PodState.CREATING or s.id in self._announced]
            containers = [self.container(c) for c in self._containers.all()
                          if c.state != ContainerState.CREATING or c.id in self._announced]
            reply: nri.SynchronizeResponse | None = None
            try:
                for part in sync_parts(pods, containers):
                    reply = await registry.call(plugin, "Synchronize", part,
                                                nri.SynchronizeResponse)
                    if reply is None:
                        return
                    if part.more and not reply.more:
                        raise PluginError(f"NRI plugin {plugin.full_name} cannot take the "
                                          "state in parts, and it is too large for one")
            except PluginError as exc:
                await registry.disconnect(plugin, str(exc))
                return
            if reply is None:
                return
            registry.activate(plugin)
        log.info("NRI plugin %s synchronized with %d pods and %d containers",
                 plugin.full_name, len(pods), len(containers))
        await self._apply_updates(list(reply.update), fail=False, plugin=plugin.full_name)

    async def _unsolicited_updates(self, plugin: Plugin, request: nri.UpdateContainersRequest
                                   ) -> nri.UpdateContainersResponse:
        failed = await self._apply_updates(list(request.update), fail=False,
                                           plugin=plugin.full_name)
        await self._evict(list(request.evict))
        return nri.UpdateContainersResponse(failed=failed)

    async def _apply_updates(self, updates: list[nri.ContainerUpdate], *, fail: bool,
                             plugin: str = "") -> list[nri.ContainerUpdate]:
        """Through the runtime's update path; returns those that failed. With `fail`, a
        failure of an update that did not ask for ignore_failure is raised."""
        failed: list[nri.ContainerUpdate] = []
        first_error: CripyError | None = None
        for update in updates:
            try:
                await self._apply_update(update)
            except CripyError as exc:
                log.warning("NRI%s update of container %s failed: %s",
                            f" plugin {plugin}" if plugin else "", update.container_id[:12],
                            exc)
                failed.append(update)
                if not update.ignore_failure and first_error is None:
                    first_error = exc
        if fail and first_error is not None:
            raise first_error
        return failed

    async def _apply_update(self, update: nri.ContainerUpdate) -> None:
        if self._containers is None:
            return
        container = self._containers.store.find(update.container_id)
        if container is None:
            raise NotFoundError(f"container {update.container_id!r} not found")
        if not update.linux.HasField("resources"):
            return
        resources = update_to_cri(container.config.linux.resources, update.linux.resources)
        await self._containers.update_resources(container.id, resources, from_nri=True)

    async def _evict(self, evictions: list[nri.ContainerEviction]) -> None:
        if self._containers is None:
            return
        for eviction in evictions:
            log.warning("NRI: evicting container %s: %s", eviction.container_id[:12],
                        eviction.reason or "no reason given")
            try:
                await self._containers.stop(eviction.container_id, EVICT_TIMEOUT)
            except CripyError as exc:
                log.warning("NRI: evicting container %s failed: %s",
                            eviction.container_id[:12], exc)

    def describe(self) -> list[dict[str, object]]:
        return [] if self.registry is None else self.registry.describe()


#: Room left in a Synchronize part for the ttrpc envelope (the state is split, as NRI
#: does, when one message would exceed ttrpc's limit).
SYNC_PART_BYTES = MAX_MESSAGE_LENGTH - 64 * 1024


def sync_parts(pods: list[nri.PodSandbox], containers: list[nri.Container]
               ) -> list[nri.SynchronizeRequest]:
    """The state as Synchronize requests of at most SYNC_PART_BYTES, all but the last
    marked `more`."""
    parts = [nri.SynchronizeRequest()]
    size = 0
    for field_name, items in (("pods", pods), ("containers", containers)):
        for item in items:
            item_size = item.ByteSize() + 8  # its tag and length
            if size + item_size > SYNC_PART_BYTES and size:
                parts[-1].more = True
                parts.append(nri.SynchronizeRequest())
                size = 0
            getattr(parts[-1], field_name).append(item)
            size += item_size
    return parts


def container_from_spec(base: nri.Container, spec: dict[str, Any]) -> nri.Container:
    """The container being created as NRI shows it: from its OCI spec."""
    out = nri.Container()
    out.CopyFrom(base)
    process = spec.get("process", {})
    del out.args[:]
    out.args.extend(process.get("args", []))
    del out.env[:]
    out.env.extend(process.get("env", []))
    out.annotations.update(spec.get("annotations", {}))
    del out.mounts[:]
    for m in spec.get("mounts", []):
        out.mounts.add(destination=m.get("destination", ""), type=m.get("type", ""),
                       source=m.get("source", ""), options=m.get("options", []))
    for r in process.get("rlimits", []):
        out.rlimits.add(type=r["type"], hard=r["hard"], soft=r["soft"])
    hooks = spec.get("hooks", {})
    for kind, oci_kind in (("prestart", "prestart"), ("create_runtime", "createRuntime"),
                           ("create_container", "createContainer"),
                           ("start_container", "startContainer"), ("poststart", "poststart"),
                           ("poststop", "poststop")):
        for h in hooks.get(oci_kind, []):
            hook = getattr(out.hooks, kind).add(path=h["path"], args=h.get("args", []),
                                                env=h.get("env", []))
            if "timeout" in h:
                hook.timeout.value = h["timeout"]
    linux = spec.get("linux", {})
    out.linux.Clear()
    for ns in linux.get("namespaces", []):
        out.linux.namespaces.add(type=ns.get("type", ""), path=ns.get("path", ""))
    for d in linux.get("devices", []):
        device = out.linux.devices.add(path=d["path"], type=d["type"], major=d["major"],
                                       minor=d["minor"])
        for key, name in (("fileMode", "file_mode"), ("uid", "uid"), ("gid", "gid")):
            if key in d:
                getattr(device, name).value = d[key]
    out.linux.resources.CopyFrom(oci_to_nri_resources(linux.get("resources", {})))
    out.linux.cgroups_path = linux.get("cgroupsPath", "")
    if "oomScoreAdj" in process:
        out.linux.oom_score_adj.value = process["oomScoreAdj"]
    return out


def oci_to_nri_resources(res: dict[str, Any]) -> nri.LinuxResources:
    out = nri.LinuxResources()
    memory = res.get("memory", {})
    for oci_name, name in (("limit", "limit"), ("reservation", "reservation"),
                           ("swap", "swap"), ("swappiness", "swappiness")):
        if oci_name in memory:
            getattr(out.memory, name).value = memory[oci_name]
    cpu = res.get("cpu", {})
    for oci_name, name in (("shares", "shares"), ("quota", "quota"), ("period", "period")):
        if oci_name in cpu:
            getattr(out.cpu, name).value = cpu[oci_name]
    out.cpu.cpus = cpu.get("cpus", "")
    out.cpu.mems = cpu.get("mems", "")
    for h in res.get("hugepageLimits", []):
        out.hugepage_limits.add(page_size=h["pageSize"], limit=h["limit"])
    out.unified.update(res.get("unified", {}))
    if "pids" in res:
        out.pids.limit = res["pids"].get("limit", 0)
    return out

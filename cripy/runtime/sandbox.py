"""Pod sandboxes: pinned namespaces, pod files, /dev/shm, CNI, and (for a shared PID
namespace) an infra process. No infra container otherwise, as in CRI-O's "drop infra".

A sandbox's record is written, in state "creating", before anything is made for it, so
a restart after a crash knows what to clean up; it turns "ready" once all is in place.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cripy.api import api_pb2 as pb
from cripy.config import Config
from cripy.crashpoints import crash_point
from cripy.errors import (
    CripyError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from cripy.fsutil import atomic_write_json, remove_tree
from cripy.metrics import POD_CREATION_STEPS, POD_TEARDOWN_STEPS, record_steps
from cripy.network.cni import PortMapping
from cripy.nri.hooks import Nri
from cripy.oci.apparmor import AppArmorHost
from cripy.oci.spec import SpecContext, build_infra_spec, host_cgroup_v2
from cripy.oci.userns import check_handler, own_infra_rootfs, pod_userns, sandbox_userns
from cripy.runtime import pod_resources
from cripy.runtime.events import CREATED, DELETED, STARTED, STOPPED, Event, EventBus
from cripy.runtime.locks import LockTable
from cripy.runtime.podfiles import pod_hostname, write_pod_files
from cripy.runtime.ports import HOST, Host, Network, OciDriver
from cripy.runtime.store import PodState, Sandbox, Store
from cripy.runtime.timing import Steps
from cripy.tasks import all_done

if TYPE_CHECKING:
    from cripy.runtime.container import ContainerManager

log = logging.getLogger(__name__)

CREATING, READY, NOTREADY = PodState.CREATING, PodState.READY, PodState.NOTREADY
SHM_OPTIONS = "nosuid,nodev,noexec,mode=1777,size=65536k"
INFRA_STOP_TIMEOUT = 2.0
_PROTOCOLS = {pb.TCP: "tcp", pb.UDP: "udp", pb.SCTP: "sctp"}


class SandboxManager:
    """The pod lifecycle controller: its state is the store's, nothing of its own."""

    def __init__(self, config: Config, oci: OciDriver, cni: Network,
                 events: EventBus | None = None, host: Host = HOST) -> None:
        self.config = config
        self.events = events or EventBus()
        self.oci = oci
        self.cni = cni
        self.host = host
        root = Path(config.root)
        self.store: Store[Sandbox] = Store(Sandbox, root / "pods", root / "quarantine")
        self.run_dir = Path(config.runroot) / "pods"
        self.infra_rootfs = Path(config.runroot) / "infra-rootfs"
        self.locks = LockTable()
        self.containers: ContainerManager  # set by the daemon once both exist
        self.apparmor = AppArmorHost()  # the node's AppArmor, probed by the daemon at start
        self.nri = Nri()  # the daemon's, once it started NRI

    # --- lookups (snapshots, from memory) -----------------------------------------------

    def get(self, sandbox_id: str) -> Sandbox:
        """A sandbox by ID or unique ID prefix."""
        return self.store.get(sandbox_id)

    def find(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox with exactly this ID, if any."""
        return self.store.find(sandbox_id)

    def all(self) -> list[Sandbox]:
        """Every sandbox, those being created too."""
        return self.store.all()

    def matching(self, flt: pb.PodSandboxFilter | None) -> list[Sandbox]:
        result = [s for s in self.store if s.state != CREATING]
        if flt is None:
            return result
        if flt.id:
            result = [s for s in result if s.id.startswith(flt.id)]
        if flt.HasField("state"):
            want = READY if flt.state.state == pb.SANDBOX_READY else NOTREADY
            result = [s for s in result if s.state == want]
        for key, value in flt.label_selector.items():
            result = [s for s in result if s.config.labels.get(key) == value]
        return result

    def pod_dir(self, sandbox_id: str) -> Path:
        return self.run_dir / sandbox_id

    # --- RunPodSandbox ------------------------------------------------------------------

    async def run(self, config: pb.PodSandboxConfig, runtime_handler: str) -> Sandbox:
        steps = Steps()
        _validate(config)
        pod_resources.pod_limits(config.linux.resources, config.linux.overhead)
        handler = self.oci.handler(runtime_handler)  # known, and usable on this host
        userns = pod_userns(config)
        check_handler(userns, handler.name, handler.features.user_namespaces.supported,
                      handler.features.user_namespaces.reason)
        self.oci.cgroups.parent(config.linux.cgroup_parent)  # suits the cgroup driver
        sandbox = await self.store.add(Sandbox(
            id=secrets.token_hex(32), config=config, runtime_handler=runtime_handler,
            created_at=time.time_ns()))
        async with self.locks.hold(sandbox.id):
            try:
                built = await self._build(sandbox, steps)
                await steps.timed("nri", self.nri.run_pod_sandbox(
                    replace(self.store.get(sandbox.id), **built)))
            except BaseException as exc:
                log.warning("RunPodSandbox %s failed, cleaning up: %s", sandbox.name, exc)
                await asyncio.shield(self.nri.pod_failed(sandbox.id))
                await asyncio.shield(self._destroy(sandbox.id))
                raise
            sandbox = await self.store.set(sandbox.id, state=READY,
                                           creation_steps=steps.durations(), **built)
        record_steps(POD_CREATION_STEPS, sandbox.creation_steps)
        self._publish(CREATED, sandbox)
        self._publish(STARTED, sandbox)
        log.info("pod %s (%s) ready, ips %s", sandbox.id[:12], sandbox.name, list(sandbox.ips))
        return sandbox

    async def _build(self, sandbox: Sandbox, steps: Steps) -> dict[str, Any]:
        """Make the pod's cgroup, namespaces, /dev/shm, network and files; returns the
        record's new fields. The pinned namespaces are recorded with the ready state only:
        what a crash before leaves is found by its place (`_release` unpins the pod's ns
        directory and DELs the network its CNI cache names, whatever the record holds)."""
        config, options = sandbox.config, sandbox.options
        pod_dir = self.pod_dir(sandbox.id)
        await asyncio.to_thread(_make_dirs, pod_dir, config.log_directory)
        hostname = pod_hostname(config, socket.gethostname())
        kinds = []
        if options.network != pb.NODE:
            kinds += ["net", "uts"]
        if options.ipc != pb.NODE:
            kinds.append("ipc")
        userns = pod_userns(config)

        async def namespaces() -> dict[str, str]:
            if not kinds:
                return {}
            pinned = await steps.timed("namespaces", self.host.pin_namespaces(
                pod_dir / "ns", kinds, hostname if "uts" in kinds else None, userns))
            crash_point("run-pod-after-namespaces")
            return {kind: str(path) for kind, path in pinned.items()}

        async def shm() -> None:
            if options.ipc != pb.NODE:
                await steps.timed("shm", self.host.mount_tmpfs(pod_dir / "shm", SHM_OPTIONS))

        # Independent of each other; all of them finish (or fail) before any cleanup.
        _, pinned, _ = await all_done(
            steps.timed("cgroup", pod_resources.apply(
                self, sandbox, config.linux.resources, config.linux.overhead)),
            namespaces(), shm())
        sandbox = replace(sandbox, namespaces=pinned)
        ips: list[str] = []
        if options.network != pb.NODE:
            network = await steps.timed("cni", self.cni.setup(
                sandbox.id, Path(sandbox.namespaces["net"]),
                pod_name=config.metadata.name, pod_namespace=config.metadata.namespace,
                pod_uid=config.metadata.uid, port_mappings=_port_mappings(config),
                lo_is_up=True,  # pinned with lo up (cripy.network.namespaces)
            ))
            ips = list(network.ips)
            crash_point("run-pod-after-network")
        await steps.timed("pod_files", asyncio.to_thread(
            write_pod_files, pod_dir, config, hostname, ips[0] if ips else None))
        infra_pid = (await steps.timed("infra", self._start_infra(sandbox))
                     if sandbox.shares_pid else None)
        return {"ips": tuple(ips), "infra_pid": infra_pid, "namespaces": pinned}

    async def _start_infra(self, sandbox: Sandbox) -> int:
        """catatonit as the PID 1 every container of the pod shares."""
        bundle = self.pod_dir(sandbox.id) / "infra"

        def write_bundle() -> None:  # file reads and writes: in a thread
            rootfs = self._ensure_infra_rootfs()
            bundle.mkdir(exist_ok=True)
            userns = sandbox_userns(sandbox.config, sandbox.namespaces)
            if userns is not None:
                rootfs = own_infra_rootfs(rootfs, bundle / "rootfs", userns)
            spec = build_infra_spec(sandbox.config,
                                    self.spec_context(sandbox, sandbox.id, rootfs), rootfs)
            atomic_write_json(bundle / "config.json", spec)

        await asyncio.to_thread(write_bundle)
        pid = await self.oci.create(sandbox.id, bundle, bundle / "infra.log",
                                    handler=sandbox.runtime_handler,
                                    cgroup_parent=sandbox.config.linux.cgroup_parent)
        await self.oci.start(sandbox.id)
        return pid

    def _ensure_infra_rootfs(self) -> Path:
        binary = self.infra_rootfs / "catatonit"
        if not binary.exists():
            source = shutil.which("catatonit")
            if source is None:
                raise FailedPreconditionError(
                    "a shared PID namespace needs catatonit, which is not installed")
            self.infra_rootfs.mkdir(parents=True, exist_ok=True)
            tmp = self.infra_rootfs / ".catatonit.tmp"
            shutil.copy2(source, tmp)
            tmp.rename(binary)
        return self.infra_rootfs

    def spec_context(self, sandbox: Sandbox, container_id: str, rootfs: Path) -> SpecContext:
        """What the OCI spec of a container in `sandbox` needs (reads /proc: blocks)."""
        pod_dir = self.pod_dir(sandbox.id)
        handler = self.oci.handler(sandbox.runtime_handler)
        return SpecContext(
            container_id=container_id,
            sandbox_id=sandbox.id,
            rootfs=rootfs,
            network_ns=sandbox.namespaces.get("net"),
            ipc_ns=sandbox.namespaces.get("ipc"),
            uts_ns=sandbox.namespaces.get("uts"),
            pod_pid_ns=f"/proc/{sandbox.infra_pid}/ns/pid" if sandbox.infra_pid else None,
            pod_files={p: str(pod_dir / Path(p).name)
                       for p in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")},
            shm_path=str(pod_dir / "shm") if sandbox.options.ipc != pb.NODE else None,
            oom_score_adj_min=_own_oom_score_adj(),
            cgroup_v2=host_cgroup_v2(),
            cgroups=self.oci.cgroups,
            default_seccomp_profile=self.config.runtime.seccomp_profile,
            apparmor=self.apparmor,
            userns=sandbox_userns(sandbox.config, sandbox.namespaces),
            handler=handler.name,
            features=handler.features,
        )

    # --- StopPodSandbox / RemovePodSandbox ----------------------------------------------

    # The pod's lock orders these against RunPodSandbox and CreateContainer: a container
    # is registered under it, so once a stop holds it, every container of the pod is in
    # the store (those still being created too: stopping one waits for its create).

    async def stop(self, sandbox_id: str) -> None:
        """Stop every container, the infra process and the network. Idempotent."""
        try:
            sandbox = self.get(sandbox_id)
        except NotFoundError:
            return  # the CRI: stopping what is gone succeeds
        steps = Steps()
        async with self.locks.hold(sandbox.id):
            current = self.find(sandbox.id)
            if current is None:  # removed while we waited
                return
            # With NRI off nobody is told of anything between the containers' stop and the
            # network's DEL, and neither needs the other (the containers are killed): the
            # network goes while they die. Plugins, and an infra process, keep the order.
            side_by_side = self.nri.registry is None and current.infra_pid is None
            await all_done(
                steps.timed("containers", self.containers.stop_all_in(current.id)),
                *([self._release_network(current, steps)] if side_by_side else []))
            crash_point("stop-pod-after-containers")
            current = self.find(sandbox.id)
            if current is None:
                return
            if current.state == READY:  # plugins hear of the first stop only
                await steps.timed("nri", self.nri.stop_pod_sandbox(
                    current, self.containers.in_sandbox(current.id)))
            await self._release(current, steps, network_released=side_by_side)
            if current.state == READY:
                with steps.step("record"):
                    stopped = await self.store.set(current.id, state=NOTREADY)
                self._publish(STOPPED, stopped)
        record_steps(POD_TEARDOWN_STEPS, steps.durations(), "StopPodSandbox")
        log.info("pod %s stopped", sandbox.id[:12])

    async def remove(self, sandbox_id: str) -> None:
        try:
            sandbox = self.get(sandbox_id)
        except NotFoundError:
            return
        steps = Steps()
        async with self.locks.hold(sandbox.id):
            members = self.containers.in_sandbox(sandbox.id)
            await steps.timed("containers", self.containers.remove_all_in(sandbox.id))
            current = self.find(sandbox.id)
            if current is None:
                return
            await self._destroy(sandbox.id, steps)
        record_steps(POD_TEARDOWN_STEPS, steps.durations(), "RemovePodSandbox")
        self._publish(DELETED, sandbox)
        await self.nri.remove_pod_sandbox(current, members, was_ready=current.state == READY)
        log.info("pod %s removed", sandbox.id[:12])

    async def _release(self, sandbox: Sandbox, steps: Steps | None = None, *,
                       network_released: bool = False) -> None:
        """Give back what a running pod holds; safe to repeat and after a crash."""
        steps = steps or Steps()
        if sandbox.infra_pid is not None:
            with steps.step("infra"):
                await self.oci.stop(sandbox.id, INFRA_STOP_TIMEOUT)
                await self.oci.delete(sandbox.id)
        if not network_released:
            await self._release_network(sandbox, steps)
        crash_point("stop-pod-after-network")
        await steps.timed("namespaces", self.host.unpin_namespaces(
            self.pod_dir(sandbox.id) / "ns"))

    async def _release_network(self, sandbox: Sandbox, steps: Steps) -> None:
        """CNI DEL and the /dev/shm unmount, side by side (the DEL needs the network
        namespace, still pinned, and nothing of /dev/shm)."""
        async def network() -> None:
            if sandbox.options.network != pb.NODE:
                net = sandbox.namespaces.get("net")
                await steps.timed("cni", self.cni.teardown(sandbox.id,
                                                           Path(net) if net else None))

        await all_done(network(), steps.timed(
            "shm", self.host.unmount(self.pod_dir(sandbox.id) / "shm")))

    async def _destroy(self, sandbox_id: str, steps: Steps | None = None) -> None:
        steps = steps or Steps()
        sandbox = self.find(sandbox_id)
        if sandbox is not None:
            try:
                await self._release(sandbox, steps)
            except CripyError as exc:
                log.warning("pod %s: releasing resources failed: %s", sandbox_id[:12], exc)
                raise
        await steps.timed("pod_dir", asyncio.to_thread(remove_tree, self.pod_dir(sandbox_id)))
        crash_point("remove-pod-after-pod-dir")
        await steps.timed("record", self.store.delete(sandbox_id))

    def _publish(self, kind: str, sandbox: Sandbox) -> None:
        """Pod events carry the sandbox ID as the container ID, as other runtimes do."""
        peers = self.containers.listed_in(sandbox.id)
        self.events.publish(Event(kind, sandbox.id, sandbox.id, time.time_ns(),
                                  (sandbox, peers)))

    # --- runtime configuration ----------------------------------------------------------

    @property
    def _runtime_config_path(self) -> Path:
        return Path(self.config.root) / "runtime-config.json"

    async def set_pod_cidr(self, cidr: str) -> None:
        """Pods created from now on get addresses from `cidr` (kept across restarts)."""
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise InvalidArgumentError(f"pod CIDR {cidr!r} is not a network") from None
        self.cni.pod_cidr = str(network)
        await asyncio.to_thread(atomic_write_json, self._runtime_config_path,
                                {"pod_cidr": self.cni.pod_cidr})
        log.info("pod CIDR set to %s", network)

    # --- start-up -----------------------------------------------------------------------

    async def recover(self) -> None:
        """Load the records; finish off pods a crash left half made."""
        try:
            saved = json.loads(await asyncio.to_thread(self._runtime_config_path.read_text))
            self.cni.pod_cidr = str(saved.get("pod_cidr", ""))
        except (OSError, ValueError):
            pass
        for loaded in await self.store.load():
            sandbox = loaded.obj
            if sandbox is None:
                await self._destroy_leftover(loaded.id)
            elif sandbox.state == CREATING:
                log.info("pod %s was being created at the crash: removing it", loaded.id[:12])
                await self._destroy(sandbox.id)
            elif sandbox.state == READY and not await asyncio.to_thread(
                    self._namespaces_alive, sandbox):
                log.info("pod %s lost its namespaces (reboot?): marking it not ready",
                         loaded.id[:12])
                await self._release(sandbox)
                await self.store.set(sandbox.id, state=NOTREADY)

    async def _destroy_leftover(self, sandbox_id: str) -> None:
        """A pod directory without a usable record: give back what it may hold."""
        pod_dir = self.pod_dir(sandbox_id)
        try:
            await self.cni.teardown(sandbox_id, None)
        except CripyError as exc:
            log.warning("pod %s: network teardown failed: %s", sandbox_id[:12], exc)
        await self.host.unmount(pod_dir / "shm")
        await self.host.unpin_namespaces(pod_dir / "ns")
        await asyncio.to_thread(remove_tree, pod_dir)
        await asyncio.to_thread(remove_tree, self.store.object_dir(sandbox_id))

    def _namespaces_alive(self, sandbox: Sandbox) -> bool:
        return all(self.host.is_pinned(Path(path)) for path in sandbox.namespaces.values())


def _validate(config: pb.PodSandboxConfig) -> None:
    m = config.metadata
    for field_name, value in (("name", m.name), ("namespace", m.namespace), ("uid", m.uid)):
        if not value:
            raise InvalidArgumentError(f"pod sandbox metadata.{field_name} is empty")
        if "/" in value or "\x00" in value or len(value) > 253:
            raise InvalidArgumentError(f"pod sandbox metadata.{field_name} {value!r} is invalid")
    if config.log_directory and not config.log_directory.startswith("/"):
        raise InvalidArgumentError(
            f"log_directory {config.log_directory!r} must be an absolute path")
    if ".." in Path(config.log_directory).parts:
        raise InvalidArgumentError(f"log_directory {config.log_directory!r} contains '..'")
    options = config.linux.security_context.namespace_options
    if options.pid == pb.TARGET:
        raise InvalidArgumentError("pod PID namespace mode TARGET is only valid for containers")
    for mapping in config.port_mappings:
        if not 0 < mapping.container_port < 65536 or not 0 <= mapping.host_port < 65536:
            raise InvalidArgumentError(
                f"port mapping {mapping.host_port}:{mapping.container_port} is out of range")


def _make_dirs(pod_dir: Path, log_directory: str) -> None:
    pod_dir.mkdir(parents=True, exist_ok=True)
    if log_directory:
        Path(log_directory).mkdir(parents=True, exist_ok=True)


def _port_mappings(config: pb.PodSandboxConfig) -> list[PortMapping]:
    return [
        PortMapping(protocol=_PROTOCOLS.get(p.protocol, "tcp"), container_port=p.container_port,
                    host_port=p.host_port, host_ip=p.host_ip)
        for p in config.port_mappings if p.host_port > 0
    ]


CAP_SYS_RESOURCE = 24


def _own_oom_score_adj() -> int:
    """The lowest oom_score_adj containers may get: any without CAP_SYS_RESOURCE's
    blessing, else no lower than the daemon's own (the kernel refuses that)."""
    try:
        status = Path("/proc/self/status").read_text()
        cap_eff = int(next(line.split()[1] for line in status.splitlines()
                           if line.startswith("CapEff:")), 16)
        if cap_eff & (1 << CAP_SYS_RESOURCE):
            return -1000
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError, StopIteration):
        return 0

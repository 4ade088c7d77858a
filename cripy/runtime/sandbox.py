"""Pod sandboxes: pinned namespaces, pod files, /dev/shm, CNI, and (for a shared PID
namespace) an infra process. No infra container otherwise, as in CRI-O's "drop infra".

A sandbox's record is written, in state "creating", before anything is made for it, so
a restart after a crash knows what to clean up; it turns "ready" once all is in place.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import ipaddress
import json
import logging
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cripy.api import api_pb2 as pb
from cripy.config import Config
from cripy.crashpoints import crash_point
from cripy.errors import (
    AlreadyExistsError,
    CripyError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from cripy.fsutil import atomic_write_json, remove_tree
from cripy.network.cni import CNIManager, PortMapping
from cripy.network.namespaces import is_pinned, pin_namespaces, unpin_namespaces
from cripy.oci.apparmor import AppArmorHost
from cripy.oci.runtime import OciRuntime
from cripy.oci.spec import SpecContext, build_infra_spec, host_cgroup_v2
from cripy.runtime.events import CREATED, DELETED, STARTED, STOPPED, Event, EventBus
from cripy.runtime.locks import LockTable
from cripy.runtime.podfiles import pod_hostname, write_pod_files
from cripy.runtime.records import RecordDir
from cripy.storage.overlay import mount_tmpfs, unmount

if TYPE_CHECKING:
    from cripy.runtime.container import ContainerManager

log = logging.getLogger(__name__)

CREATING, READY, NOTREADY = "creating", "ready", "notready"
SHM_OPTIONS = "nosuid,nodev,noexec,mode=1777,size=65536k"
INFRA_STOP_TIMEOUT = 2.0
_PROTOCOLS = {pb.TCP: "tcp", pb.UDP: "udp", pb.SCTP: "sctp"}


@dataclass
class Sandbox:
    id: str
    config: pb.PodSandboxConfig
    runtime_handler: str
    created_at: int
    state: str = CREATING
    ips: list[str] = field(default_factory=list)
    namespaces: dict[str, str] = field(default_factory=dict)  # kind -> pinned file
    infra_pid: int | None = None

    @property
    def name(self) -> str:
        m = self.config.metadata
        return f"k8s_{m.name}_{m.namespace}_{m.uid}_{m.attempt}"

    @property
    def options(self) -> pb.NamespaceOption:
        return self.config.linux.security_context.namespace_options

    @property
    def shares_pid(self) -> bool:
        return self.options.pid == pb.POD

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "config": base64.b64encode(self.config.SerializeToString()).decode(),
            "runtime_handler": self.runtime_handler,
            "created_at": self.created_at,
            "state": self.state,
            "ips": self.ips,
            "namespaces": self.namespaces,
            "infra_pid": self.infra_pid,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Sandbox:
        config = pb.PodSandboxConfig()
        config.ParseFromString(base64.b64decode(record["config"]))
        return cls(
            id=record["id"], config=config, runtime_handler=record["runtime_handler"],
            created_at=record["created_at"], state=record["state"], ips=record["ips"],
            namespaces=record["namespaces"], infra_pid=record.get("infra_pid"),
        )


class SandboxManager:
    def __init__(self, config: Config, oci: OciRuntime, cni: CNIManager,
                 events: EventBus | None = None) -> None:
        self.config = config
        self.events = events or EventBus()
        self.oci = oci
        self.cni = cni
        self.records = RecordDir(Path(config.root) / "pods", "pod")
        self.run_dir = Path(config.runroot) / "pods"
        self.infra_rootfs = Path(config.runroot) / "infra-rootfs"
        self.sandboxes: dict[str, Sandbox] = {}
        self.locks = LockTable()
        self._names = asyncio.Lock()
        self.containers: ContainerManager  # set by the daemon once both exist
        self.apparmor = AppArmorHost()  # the node's AppArmor, probed by the daemon at start

    # --- lookups ------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> Sandbox:
        """A sandbox by ID or unique ID prefix."""
        if not sandbox_id:
            raise InvalidArgumentError("pod sandbox ID is empty")
        found = self.sandboxes.get(sandbox_id)
        if found is None:
            matches = [s for i, s in self.sandboxes.items() if i.startswith(sandbox_id)]
            if len(matches) > 1:
                raise InvalidArgumentError(f"pod sandbox ID prefix {sandbox_id!r} is ambiguous")
            if not matches:
                raise NotFoundError(f"pod sandbox {sandbox_id!r} not found")
            found = matches[0]
        return found

    def matching(self, flt: pb.PodSandboxFilter | None) -> list[Sandbox]:
        result = [s for s in self.sandboxes.values() if s.state != CREATING]
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
        _validate(config)
        self.oci.handler(runtime_handler)  # known, and usable on this host
        self.oci.cgroups.parent(config.linux.cgroup_parent)  # suits the cgroup driver
        async with self._names:
            sandbox = Sandbox(id=secrets.token_hex(32), config=config,
                              runtime_handler=runtime_handler, created_at=time.time_ns())
            holder = next((s for s in self.sandboxes.values() if s.name == sandbox.name), None)
            if holder is not None:
                raise AlreadyExistsError(
                    f"pod sandbox name {sandbox.name!r} is already in use by {holder.id}"
                )
            self.sandboxes[sandbox.id] = sandbox
            await self._save(sandbox)
        async with self.locks.hold(sandbox.id):
            try:
                await self._build(sandbox)
            except BaseException as exc:
                log.warning("RunPodSandbox %s failed, cleaning up: %s", sandbox.name, exc)
                await asyncio.shield(self._destroy(sandbox))
                raise
            sandbox.state = READY
            await self._save(sandbox)
        self._publish(CREATED, sandbox)
        self._publish(STARTED, sandbox)
        log.info("pod %s (%s) ready, ips %s", sandbox.id[:12], sandbox.name, sandbox.ips)
        return sandbox

    async def _build(self, sandbox: Sandbox) -> None:
        config, options = sandbox.config, sandbox.options
        pod_dir = self.pod_dir(sandbox.id)
        pod_dir.mkdir(parents=True, exist_ok=True)
        if config.log_directory:
            Path(config.log_directory).mkdir(parents=True, exist_ok=True)
        hostname = pod_hostname(config, socket.gethostname())
        kinds = []
        if options.network != pb.NODE:
            kinds += ["net", "uts"]
        if options.ipc != pb.NODE:
            kinds.append("ipc")
        if kinds:
            pinned = await pin_namespaces(pod_dir / "ns", kinds,
                                          hostname if "uts" in kinds else None)
            sandbox.namespaces = {kind: str(path) for kind, path in pinned.items()}
            await self._save(sandbox)
            crash_point("run-pod-after-namespaces")
        if options.ipc != pb.NODE:
            await mount_tmpfs(pod_dir / "shm", SHM_OPTIONS)
        if options.network != pb.NODE:
            network = await self.cni.setup(
                sandbox.id, Path(sandbox.namespaces["net"]),
                pod_name=config.metadata.name, pod_namespace=config.metadata.namespace,
                pod_uid=config.metadata.uid, port_mappings=_port_mappings(config),
            )
            sandbox.ips = network.ips
            crash_point("run-pod-after-network")
        write_pod_files(pod_dir, config, hostname, sandbox.ips[0] if sandbox.ips else None)
        if sandbox.shares_pid:
            sandbox.infra_pid = await self._start_infra(sandbox)

    async def _start_infra(self, sandbox: Sandbox) -> int:
        """catatonit as the PID 1 every container of the pod shares."""
        rootfs = await asyncio.to_thread(self._ensure_infra_rootfs)
        bundle = self.pod_dir(sandbox.id) / "infra"
        bundle.mkdir(exist_ok=True)
        spec = build_infra_spec(sandbox.config, self.spec_context(sandbox, sandbox.id, rootfs),
                                rootfs)
        await asyncio.to_thread(atomic_write_json, bundle / "config.json", spec)
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
        pod_dir = self.pod_dir(sandbox.id)
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
        )

    # --- StopPodSandbox / RemovePodSandbox ----------------------------------------------

    async def stop(self, sandbox_id: str) -> None:
        """Stop every container, the infra process and the network. Idempotent."""
        try:
            sandbox = self.get(sandbox_id)
        except NotFoundError:
            return  # the CRI: stopping what is gone succeeds
        await self.containers.stop_all_in(sandbox.id)
        crash_point("stop-pod-after-containers")
        async with self.locks.hold(sandbox.id):
            await self._release(sandbox)
            if sandbox.state != NOTREADY:
                sandbox.state = NOTREADY
                await self._save(sandbox)
                self._publish(STOPPED, sandbox)
        log.info("pod %s stopped", sandbox.id[:12])

    async def remove(self, sandbox_id: str) -> None:
        try:
            sandbox = self.get(sandbox_id)
        except NotFoundError:
            return
        await self.containers.remove_all_in(sandbox.id)
        async with self.locks.hold(sandbox.id):
            await self._destroy(sandbox)
        self._publish(DELETED, sandbox)
        log.info("pod %s removed", sandbox.id[:12])

    async def _release(self, sandbox: Sandbox) -> None:
        """Give back what a running pod holds; safe to repeat and after a crash."""
        if sandbox.infra_pid is not None:
            await self.oci.stop(sandbox.id, INFRA_STOP_TIMEOUT)
            await self.oci.delete(sandbox.id)
        if sandbox.options.network != pb.NODE:
            net = sandbox.namespaces.get("net")
            await self.cni.teardown(sandbox.id, Path(net) if net else None)
        pod_dir = self.pod_dir(sandbox.id)
        await unmount(pod_dir / "shm")
        await unpin_namespaces(pod_dir / "ns")

    async def _destroy(self, sandbox: Sandbox) -> None:
        try:
            await self._release(sandbox)
        except CripyError as exc:
            log.warning("pod %s: releasing resources failed: %s", sandbox.id[:12], exc)
            raise
        await asyncio.to_thread(remove_tree, self.pod_dir(sandbox.id))
        await asyncio.to_thread(remove_tree, self.records.object_dir(sandbox.id))
        self.sandboxes.pop(sandbox.id, None)

    def _publish(self, kind: str, sandbox: Sandbox) -> None:
        """Pod events carry the sandbox ID as the container ID, as other runtimes do."""
        peers = [copy.copy(c) for c in self.containers.in_sandbox(sandbox.id)]
        self.events.publish(Event(kind, sandbox.id, sandbox.id, time.time_ns(),
                                  (copy.copy(sandbox), peers)))

    async def _save(self, sandbox: Sandbox) -> None:
        await asyncio.to_thread(self.records.save, sandbox.id, sandbox.to_record())

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
            saved = json.loads(self._runtime_config_path.read_text())
            self.cni.pod_cidr = str(saved.get("pod_cidr", ""))
        except (OSError, ValueError):
            pass
        for sandbox_id, record in await asyncio.to_thread(lambda: list(self.records.load_all())):
            if record is None:
                await asyncio.to_thread(remove_tree, self.records.object_dir(sandbox_id))
                continue
            sandbox = Sandbox.from_record(record)
            self.sandboxes[sandbox.id] = sandbox
            if sandbox.state == CREATING:
                log.info("pod %s was being created at the crash: removing it", sandbox_id[:12])
                await self._destroy(sandbox)
            elif sandbox.state == READY and not _namespaces_alive(sandbox):
                log.info("pod %s lost its namespaces (reboot?): marking it not ready",
                         sandbox_id[:12])
                await self._release(sandbox)
                sandbox.state = NOTREADY
                await self._save(sandbox)


def _namespaces_alive(sandbox: Sandbox) -> bool:
    return all(is_pinned(Path(path)) for path in sandbox.namespaces.values())


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

"""Pod and container helpers for integration tests: configs, a CNI network, leak checks."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.json_format import ParseDict

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon

CGROUP_ROOT = Path("/sys/fs/cgroup")


@contextmanager
def bridge_network(cni_dir: Path, state_dir: Path, subnet_octet: int,
                   subnet: str = "") -> Iterator[str]:
    """A bridge + host-local + portmap conflist with its own bridge and subnet
    (10.216.`subnet_octet`.0/24 unless `subnet` names another).

    Yields the bridge name; deletes the bridge afterwards."""
    bridge = "cripyt" + secrets.token_hex(2)
    conflist = {
        "cniVersion": "1.0.0",
        "name": f"cripy-test-{bridge}",
        "plugins": [
            {
                "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(state_dir / "ipam"),
                         "ranges": [[{"subnet": subnet or f"10.216.{subnet_octet}.0/24"}]],
                         "routes": [{"dst": "0.0.0.0/0"}]},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (cni_dir / "10-test.conflist").write_text(json.dumps(conflist))
    try:
        yield bridge
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def pod_config(name: str, log_dir: Path, *, cgroup_parent: str = "",
               pid: pb.NamespaceMode = pb.CONTAINER,
               network: pb.NamespaceMode = pb.POD,
               ipc: pb.NamespaceMode = pb.POD,
               port_mappings: list[pb.PortMapping] | None = None,
               labels: dict[str, str] | None = None,
               resources: pb.LinuxContainerResources | None = None,
               overhead: pb.LinuxContainerResources | None = None) -> pb.PodSandboxConfig:
    """`resources` and `overhead`: the pod-level ones (LinuxPodSandboxConfig)."""
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="cripy-test",
                                       uid=secrets.token_hex(8), attempt=0),
        hostname=name,
        log_directory=str(log_dir),
        labels=labels or {},
        port_mappings=port_mappings or [],
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=network, pid=pid, ipc=ipc)),
            resources=resources, overhead=overhead,
        ),
    )


def container_config(name: str, image: str, command: list[str], *,
                     log_path: str | None = None, **linux: object) -> pb.ContainerConfig:
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=image),
        command=command,
        log_path=log_path if log_path is not None else f"{name}.log",
    )
    if linux:
        config.linux.CopyFrom(pb.LinuxContainerConfig(**linux))  # type: ignore[arg-type]
    return config


def cgroup_dirs(parent: str) -> list[Path]:
    """Every directory of `parent`: one per cgroup v1 controller, or the cgroup v2 one."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        unified = CGROUP_ROOT / parent.lstrip("/")
        return [unified] if unified.is_dir() else []
    found = []
    for controller in CGROUP_ROOT.iterdir():
        path = controller / parent.lstrip("/")
        if path.is_dir():
            found.append(path)
    return found


def remove_cgroup(parent: str) -> None:
    for path in cgroup_dirs(parent):
        for child in sorted(path.glob("**/"), key=lambda p: -len(p.parts)):
            if child != path:
                child.rmdir()
        path.rmdir()


def leftovers(daemon: Daemon, bridge: str, cgroup_parent: str) -> list[str]:
    """What a test could leak, described; empty when clean."""
    found = []
    marker = str(daemon.workdir)
    found += [f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines()
              if marker in line]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and "cripy daemon" not in cmdline and "-m cripy" not in cmdline:
            found.append(f"process {pid}: {cmdline[:120]}")
    links = subprocess.run(["ip", "-o", "link", "show", "master", bridge],
                           capture_output=True, text=True).stdout
    found += [f"veth {line.split(':')[1].strip()}" for line in links.splitlines() if line]
    for path in cgroup_dirs(cgroup_parent):
        found += [f"cgroup {child}" for child in path.iterdir() if child.is_dir()]
    return found


@dataclass
class Node:
    daemon: Daemon
    bridge: str
    image: str
    tmp: Path


@dataclass
class Pods:
    """Creates pods for one test and removes them (and their cgroups) afterwards."""

    node: Node
    log_dir: Path
    cgroup_parent: str = field(default_factory=lambda: "/cripy-it-" + secrets.token_hex(4))
    created: list[str] = field(default_factory=list)

    @property
    def runtime(self) -> Any:
        return self.node.daemon.runtime

    def run(self, name: str = "", **kwargs: Any) -> str:
        config = pod_config(name or "pod-" + secrets.token_hex(3), self.log_dir,
                            cgroup_parent=self.cgroup_parent, **kwargs)
        pod_id: str = self.runtime.RunPodSandbox(
            pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
        self.created.append(pod_id)
        return pod_id

    def config(self, pod_id: str) -> pb.PodSandboxConfig:
        info = self.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)).info["info"]
        config = pb.PodSandboxConfig()
        ParseDict(json.loads(info)["config"], config)
        return config

    def create(self, pod_id: str, name: str, command: list[str], *, start: bool = True,
               **kwargs: Any) -> str:
        config = container_config(name, self.node.image, command, **kwargs)
        return self.create_from(pod_id, config, start=start)

    def create_from(self, pod_id: str, config: pb.ContainerConfig, *,
                    start: bool = True) -> str:
        """A container of the pod made from a whole config (and started)."""
        cid: str = self.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=self.config(pod_id)),
            timeout=60).container_id
        if start:
            self.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        return cid

    def status(self, cid: str, verbose: bool = False) -> pb.ContainerStatusResponse:
        response: pb.ContainerStatusResponse = self.runtime.ContainerStatus(
            pb.ContainerStatusRequest(container_id=cid, verbose=verbose))
        return response

    def exec(self, cid: str, *cmd: str, timeout: int = 10) -> pb.ExecSyncResponse:
        response: pb.ExecSyncResponse = self.runtime.ExecSync(
            pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout), timeout=60)
        return response

    def wait_exited(self, cid: str, within: float = 30) -> pb.ContainerStatus:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            status = self.status(cid).status
            if status.state == pb.CONTAINER_EXITED:
                return status
            time.sleep(0.1)
        raise AssertionError(f"container {cid} did not exit within {within}s")

    def cleanup(self) -> None:
        for pod_id in self.created:
            self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                        timeout=60)
            self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                          timeout=60)

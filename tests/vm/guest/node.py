"""The guest's test node: the kubelet's cgroup layout for each cgroup driver, a daemon
per driver, pods made in that layout, and what an operator reads from cgroup files.

Used by tests/vm/guest/conftest.py and by the checks themselves.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import Node, Pods, leftovers, pod_config

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The controllers the kubelet enables for its pod cgroups.
CONTROLLERS = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids")
#: Where the guest writes what the host keeps (the results share).
RESULTS = Path(os.environ.get("CRIPY_VM_RESULTS", "/tmp"))

DRIVERS = ("cgroupfs", "systemd")


def cgroup_file(directory: Path, name: str) -> str:
    return (directory / name).read_text().strip()


def flat_keyed(directory: Path, name: str) -> dict[str, int]:
    """A "key value" per line cgroup file (memory.events, cpu.stat, ...)."""
    pairs = (line.split() for line in (directory / name).read_text().splitlines())
    return {key: int(value) for key, value in pairs}


def wait_for(what: str, check: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(0.1)


def oom_killed_container(pods: GuestPods) -> str:
    """A container that outgrows its 16 MiB memory.max; checks it is reported OOMKilled
    with exit code 137 and returns its ID."""
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=16 << 20)
    cid = pods.create(pods.run("oom"), "hog",
                      ["sh", "-c", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done"],
                      resources=resources)
    status = pods.wait_exited(cid, within=120)
    assert (status.reason, status.exit_code) == ("OOMKilled", 137)
    return cid


def enable_controllers(directory: Path) -> None:
    """Let `directory`'s children use the pod controllers (cgroup v2 subtree_control)."""
    (directory / "cgroup.subtree_control").write_text(" ".join("+" + c for c in CONTROLLERS))


def systemctl(*args: str) -> str:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"systemctl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


# --- the kubelet's layout --------------------------------------------------------------


class KubeletLayout:
    """Pod cgroups as the kubelet makes them (QoS class burstable); the runtime makes the
    containers' cgroups below them."""

    driver: str

    def create_pod(self, uid: str) -> str:
        """Make the pod's cgroup; returns the cgroup_parent the kubelet would send."""
        raise NotImplementedError

    def pod_dir(self, uid: str) -> Path:
        raise NotImplementedError

    def remove_pod(self, uid: str) -> None:
        raise NotImplementedError

    def expected_container_dir(self, uid: str, container_id: str) -> Path:
        raise NotImplementedError

    def leaked_units(self) -> list[str]:
        """Units the runtime left (systemd driver), described."""
        return []

    def close(self) -> None:
        """Remove the QoS-level parents."""


class CgroupfsLayout(KubeletLayout):
    driver = "cgroupfs"

    def __init__(self) -> None:
        self.qos = CGROUP_ROOT / "kubepods" / "burstable"
        enable_controllers(CGROUP_ROOT)
        for directory in (self.qos.parent, self.qos):
            directory.mkdir(exist_ok=True)
            enable_controllers(directory)

    def create_pod(self, uid: str) -> str:
        pod = self.pod_dir(uid)
        pod.mkdir()
        enable_controllers(pod)
        return "/" + str(pod.relative_to(CGROUP_ROOT))

    def pod_dir(self, uid: str) -> Path:
        return self.qos / f"pod{uid}"

    def remove_pod(self, uid: str) -> None:
        pod = self.pod_dir(uid)
        if pod.is_dir():
            for child in sorted(pod.glob("**/"), key=lambda p: -len(p.parts)):
                child.rmdir()

    def expected_container_dir(self, uid: str, container_id: str) -> Path:
        return self.pod_dir(uid) / f"cripy-{container_id}"

    def close(self) -> None:
        for directory in (self.qos, self.qos.parent):
            if directory.is_dir():
                directory.rmdir()


class SystemdLayout(KubeletLayout):
    driver = "systemd"

    def create_pod(self, uid: str) -> str:
        # As the kubelet does: a transient slice with accounting on; systemd makes its
        # parents kubepods.slice and kubepods-burstable.slice.
        name = self._slice(uid)
        subprocess.run(
            ["busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
             "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
             name, "replace", "4", "MemoryAccounting", "b", "true", "CPUAccounting", "b", "true",
             "TasksAccounting", "b", "true", "IOAccounting", "b", "true", "0"],
            check=True, capture_output=True, timeout=60)
        wait_for(f"{name} active", lambda: self.pod_dir(uid).is_dir())
        return name

    def _slice(self, uid: str) -> str:
        return f"kubepods-burstable-pod{uid}.slice"

    def pod_dir(self, uid: str) -> Path:
        return CGROUP_ROOT / "kubepods.slice" / "kubepods-burstable.slice" / self._slice(uid)

    def remove_pod(self, uid: str) -> None:
        systemctl("stop", self._slice(uid))

    def expected_container_dir(self, uid: str, container_id: str) -> Path:
        return self.pod_dir(uid) / f"cripy-{container_id}.scope"

    def leaked_units(self) -> list[str]:
        out = systemctl("list-units", "--all", "--plain", "--no-legend", "cripy-*.scope")
        return [f"unit {line.split()[0]}" for line in out.splitlines() if line.strip()]

    def close(self) -> None:
        systemctl("stop", "kubepods.slice")


def layout_for(driver: str) -> KubeletLayout:
    return CgroupfsLayout() if driver == "cgroupfs" else SystemdLayout()


# --- the node and its pods -------------------------------------------------------------


@dataclass
class GuestNode(Node):
    """A daemon using `driver`, its bridge network, the busybox image pulled."""

    driver: str = "cgroupfs"
    layout: KubeletLayout = field(default_factory=CgroupfsLayout)


def daemon_config(driver: str) -> str:
    # pod_cgroup_resources: the pod-level resources checks see them in the pod cgroups
    return f'[runtime]\ncgroup_manager = "{driver}"\npod_cgroup_resources = true\n'


@dataclass
class GuestPods(Pods):
    """Pods for one check, each in its own pod<uid> cgroup made by the kubelet layout;
    `cleanup()` removes them and returns what they leaked."""

    node: GuestNode
    uids: dict[str, str] = field(default_factory=dict)  # pod id -> uid

    def run(self, name: str = "", privileged: bool = False, handler: str = "",
            userns: pb.UserNamespace | None = None, **kwargs: Any) -> str:
        """RunPodSandbox in a kubelet pod cgroup of its own, by `handler`, in a pod user
        namespace when `userns` is given."""
        uid = secrets.token_hex(8)
        parent = self.node.layout.create_pod(uid)
        config = pod_config(name or "pod-" + secrets.token_hex(3), self.log_dir,
                            cgroup_parent=parent, **kwargs)
        config.metadata.uid = uid
        config.linux.security_context.privileged = privileged
        if userns is not None:
            config.linux.security_context.namespace_options.userns_options.CopyFrom(userns)
        try:
            pod_id: str = self.runtime.RunPodSandbox(
                pb.RunPodSandboxRequest(config=config, runtime_handler=handler),
                timeout=60).pod_sandbox_id
        except BaseException:
            self.node.layout.remove_pod(uid)
            raise
        self.created.append(pod_id)
        self.uids[pod_id] = uid
        return pod_id

    def pid(self, cid: str) -> int:
        info = json.loads(self.status(cid, verbose=True).info["info"])
        return int(info["pid"])

    def cgroup_dir(self, cid: str) -> Path:
        """The container's cgroup directory, read from its process's /proc/PID/cgroup as an
        operator would (and checked against the kubelet layout)."""
        lines = Path(f"/proc/{self.pid(cid)}/cgroup").read_text().splitlines()
        (path,) = [line[3:] for line in lines if line.startswith("0::")]
        return CGROUP_ROOT / path.lstrip("/")

    def pod_dir(self, pod_id: str) -> Path:
        return self.node.layout.pod_dir(self.uids[pod_id])

    def expected_dir(self, pod_id: str, cid: str) -> Path:
        return self.node.layout.expected_container_dir(self.uids[pod_id], cid)

    def remove(self) -> list[str]:
        """Stop and remove every pod, then describe what is left, then remove the pods'
        cgroups."""
        try:
            self.cleanup()
        finally:
            found = self.node.layout.leaked_units()
            for uid in self.uids.values():
                pod = self.node.layout.pod_dir(uid)
                parent = "/" + str(pod.relative_to(CGROUP_ROOT))
                found += leftovers(self.node.daemon, self.node.bridge, parent)
            for uid in self.uids.values():
                self.node.layout.remove_pod(uid)
        return found


def save_daemon_log(daemon: Daemon, name: str) -> None:
    """Keep the daemon's log in the results share (the host copies it with --keep)."""
    if RESULTS.is_dir():
        (RESULTS / f"daemon-{name}.log").write_text(daemon.log_path.read_text(errors="replace"))

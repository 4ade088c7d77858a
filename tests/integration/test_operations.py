"""What an operator relies on: runtime config, pod CIDR, log limits, reloads, crash recovery."""

from __future__ import annotations

import ipaddress
import re
import signal
import time
from pathlib import Path
from typing import Any

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import Node, Pods, bridge_network, leftovers, remove_cgroup
from tests.support.registry import Registry

CRI_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) (P|F) (.*)$")


def own_node(tmp_path: Path, registry: Registry, images: Any, octet: int,
             extra_config: str = "") -> tuple[Daemon, Any]:
    daemon = Daemon(tmp_path / "daemon", insecure_registries=[registry.host],
                    extra_config=extra_config)
    network = bridge_network(daemon.cni_dir, tmp_path, octet)
    return daemon, network


def test_runtime_config_reports_the_cgroup_driver(node: Node) -> None:
    response = node.daemon.runtime.RuntimeConfig(pb.RuntimeConfigRequest())
    assert response.linux.cgroup_driver == pb.CGROUPFS


def test_update_runtime_config_applies_the_pod_cidr(
    tmp_path: Path, registry: Registry, images: Any
) -> None:
    daemon, network = own_node(tmp_path, registry, images, 30)
    with network as bridge, daemon:
        daemon.pull(images.busybox.ref)
        pods = Pods(Node(daemon, bridge, images.busybox.ref, tmp_path), tmp_path / "logs")
        try:
            daemon.runtime.UpdateRuntimeConfig(pb.UpdateRuntimeConfigRequest(
                runtime_config=pb.RuntimeConfig(
                    network_config=pb.NetworkConfig(pod_cidr="10.216.31.0/24"))))
            daemon.restart()  # the pod CIDR is kept across restarts
            pod_id = pods.run("cidr")
            ip = daemon.runtime.PodSandboxStatus(
                pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.network.ip
            assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.216.31.0/24")
        finally:
            pods.cleanup()
            leaks = leftovers(daemon, bridge, pods.cgroup_parent)
            remove_cgroup(pods.cgroup_parent)
            assert leaks == []


def test_log_size_limit_keeps_lines_intact(
    tmp_path: Path, registry: Registry, images: Any
) -> None:
    daemon, network = own_node(tmp_path, registry, images, 32,
                               extra_config="[runtime]\nlog_size_max = 16384\n")
    with network as bridge, daemon:
        daemon.pull(images.busybox.ref)
        pods = Pods(Node(daemon, bridge, images.busybox.ref, tmp_path), tmp_path / "logs")
        try:
            pod_id = pods.run("logs")
            cid = pods.create(pod_id, "chatty", [
                "sh", "-c", "i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done"])
            pods.wait_exited(cid)
            log = Path(pods.status(cid).status.log_path)
            text = log.read_text()
            assert 0 < len(text.encode()) <= 16384
            lines = text.splitlines()
            assert all(CRI_LOG_LINE.match(line) for line in lines), lines[:3]
            assert lines[-1].endswith("line-2999")
        finally:
            pods.cleanup()
            leaks = leftovers(daemon, bridge, pods.cgroup_parent)
            remove_cgroup(pods.cgroup_parent)
            assert leaks == []


def test_reopen_container_log_continues_in_a_new_file(pods: Pods) -> None:
    loop = "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.05; done"
    cid = pods.create(pods.run("reopen"), "ticker", ["sh", "-c", loop])
    log = Path(pods.status(cid).status.log_path)
    time.sleep(0.5)
    rotated = log.with_name(log.name + ".1")
    log.rename(rotated)
    pods.runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    time.sleep(0.5)
    old, new = rotated.read_text().splitlines(), log.read_text().splitlines()
    assert old and new
    assert all(CRI_LOG_LINE.match(line) for line in old + new)
    numbers = [int(line.rsplit("-", 1)[1]) for line in old + new]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_sighup_reloads_settings_without_touching_containers(pods: Pods,
                                                             tmp_path: Path) -> None:
    daemon = pods.node.daemon
    cid = pods.create(pods.run("reload"), "steady", ["sleep", "300"])
    original = daemon.config_path.read_text()
    new_cni = tmp_path / "cni"
    new_cni.mkdir()
    try:
        daemon.config_path.write_text(original.replace(
            f'cni_config_dir = "{daemon.cni_dir}"', f'cni_config_dir = "{new_cni}"'))
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        network = {c.type: c for c in daemon.runtime.Status(
            pb.StatusRequest()).status.conditions}["NetworkReady"]
        assert not network.status and str(new_cni) in network.message
        assert pods.status(cid).status.state == pb.CONTAINER_RUNNING

        daemon.config_path.write_text("log_level = 5\n")  # a broken file changes nothing
        daemon.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reload failed" in daemon.log()
    finally:
        daemon.config_path.write_text(original)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not {c.type: c for c in daemon.runtime.Status(
                pb.StatusRequest()).status.conditions}["NetworkReady"].status:
            time.sleep(0.1)
    assert pods.exec(cid, "true").exit_code == 0


def test_image_fs_info_counts_container_layers(pods: Pods) -> None:
    cid = pods.create(pods.run("layers"), "writer", ["sleep", "300"])
    before = pods.node.daemon.images.ImageFsInfo(pb.ImageFsInfoRequest())
    assert pods.exec(cid, "dd", "if=/dev/zero", "of=/tmp/blob", "bs=1M", "count=2").exit_code == 0
    time.sleep(2.5)  # layer usage is cached for two seconds
    after = pods.node.daemon.images.ImageFsInfo(pb.ImageFsInfoRequest())
    (fs,) = after.container_filesystems
    assert fs.fs_id.mountpoint == str(pods.node.daemon.root / "containers")
    grown = fs.used_bytes.value - sum(f.used_bytes.value for f in before.container_filesystems)
    assert grown >= 2 * 1024 * 1024

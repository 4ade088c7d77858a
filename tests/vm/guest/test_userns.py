"""Pods in their own user namespace (the kubelet's hostUsers: false) with crun.

The guest keeps its state on tmpfs, which Linux 6.1 cannot idmap; so this node's daemon
keeps its root (layers, writable layers) and the volumes on an ext4 filesystem in a loop
file, as a real node's /var/lib would be. On the tmpfs node the feature is reported
unsupported, with that reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import bridge_network, container_config, pod_config
from tests.support.registry import Registry
from tests.vm.guest.node import GuestNode, GuestPods, daemon_config, layout_for

HOST_ID = 200000  # where the pod's IDs 0..65535 start on the host
SIZE = 65536


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def ext4() -> Iterator[Path]:
    # Not under pytest's 0700 temp directories: the pod's root (a host uid of its own)
    # must be able to pass through every directory above its rootfs and volumes, as it
    # can on a node (/var/lib and /run are world-searchable).
    tmp = Path(tempfile.mkdtemp(prefix="cripy-userns-", dir="/tmp"))
    tmp.chmod(0o711)
    image, mountpoint = tmp / "fs.img", tmp / "fs"
    mountpoint.mkdir()
    _run("modprobe", "loop")
    _run("modprobe", "ext4")
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    _run("mkfs.ext4", "-q", "-F", str(image))
    _run("mount", "-o", "loop", str(image), str(mountpoint))
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def node(ext4: Path, registry: Registry, busybox: str) -> Iterator[GuestNode]:
    """A cgroupfs node whose daemon keeps all its state on the ext4 filesystem."""
    daemon = Daemon(ext4 / "daemon", insecure_registries=[registry.host],
                    extra_config=daemon_config("cgroupfs"))
    layout = layout_for("cgroupfs")
    try:
        with bridge_network(daemon.cni_dir, ext4, 7) as bridge, daemon:
            daemon.pull(busybox)
            yield GuestNode(daemon, bridge, busybox, ext4, driver="cgroupfs", layout=layout)
    finally:
        layout.close()


def userns_pod(pods: GuestPods, handler: str, name: str) -> str:
    mapping = [pb.IDMapping(host_id=HOST_ID, container_id=0, length=SIZE)]
    return pods.run(name, handler=handler,
                    userns=pb.UserNamespace(mode=pb.POD, uids=mapping, gids=mapping))


def features(pods: GuestPods) -> dict[str, pb.RuntimeHandlerFeatures]:
    status = pods.runtime.Status(pb.StatusRequest())
    return {h.name: h.features for h in status.runtime_handlers}


def test_status_reports_user_namespaces_for_crun_only(pods: GuestPods) -> None:
    found = features(pods)
    assert set(found) == {"", "runc", "crun"}
    assert found["crun"].user_namespaces and found["crun"].recursive_read_only_mounts
    assert not found["runc"].user_namespaces and found["runc"].recursive_read_only_mounts
    assert found[""] == found["runc"]
    info = json.loads(pods.runtime.Status(pb.StatusRequest(verbose=True))
                      .info["runtime_handlers"])
    runc = next(h for h in info if h["name"] == "runc")
    assert "no idmapped mounts" in runc["features"]["user_namespaces"]["reason"]


def test_a_crun_pod_runs_in_its_user_namespace_with_idmapped_rootfs_and_volume(
        pods: GuestPods, ext4: Path) -> None:
    volume = ext4 / ("vol-" + secrets.token_hex(3))
    volume.mkdir()
    (volume / "from-host").write_text("x")
    os.chown(volume / "from-host", 1234, 1234)
    try:
        pod_id = userns_pod(pods, "crun", "userns")
        config = container_config("app", pods.node.image, ["sleep", "300"])
        config.mounts.append(pb.Mount(container_path="/vol", host_path=str(volume)))
        cid = pods.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pods.config(pod_id)),
            timeout=60).container_id
        pods.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)

        # uid 0 in the container is HOST_ID on the host.
        pid = pods.pid(cid)
        assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", str(HOST_ID), str(SIZE)]
        assert Path(f"/proc/{pid}/gid_map").read_text().split() == ["0", str(HOST_ID), str(SIZE)]
        assert os.stat(f"/proc/{pid}").st_uid == HOST_ID
        assert pods.exec(cid, "id", "-u").stdout == b"0\n"

        # The image's files belong to the container's root; its writes land as HOST_ID.
        assert pods.exec(cid, "stat", "-c", "%u:%g", "/bin/sh").stdout == b"0:0\n"
        assert pods.exec(cid, "sh", "-c", "echo hi > /etc/written").exit_code == 0
        upper = next(pods.node.daemon.root.glob(f"containers/{cid}/upper"))
        assert (upper / "etc" / "written").stat().st_uid == HOST_ID

        # The volume is idmapped: IDs are the same on both sides.
        assert pods.exec(cid, "stat", "-c", "%u", "/vol/from-host").stdout == b"1234\n"
        assert pods.exec(cid, "sh", "-c", "echo hi > /vol/by-root && "
                         "chown 1000:1000 /vol/by-root && echo x > /vol/by-root-2"
                         ).exit_code == 0
        assert (volume / "by-root").stat().st_uid == 1000
        assert (volume / "by-root-2").stat().st_uid == 0

        # /proc, /sys and the cgroup mount are the pod's own.
        assert pods.exec(cid, "cat", "/proc/self/uid_map").stdout.split() == \
            [b"0", str(HOST_ID).encode(), str(SIZE).encode()]
        assert pods.exec(cid, "ls", "/sys/class/net").stdout.split() == [b"eth0", b"lo"]
        assert int(pods.exec(cid, "cat", "/sys/class/net/lo/flags").stdout, 16) & 0x1  # up
        assert pods.exec(cid, "cat", "/sys/fs/cgroup/cgroup.controllers").exit_code == 0
        assert pods.exec(cid, "hostname").stdout == b"userns\n"
    finally:
        for entry in volume.iterdir():
            entry.unlink()
        with contextlib.suppress(OSError):
            volume.rmdir()


def test_runc_refuses_a_user_namespace_pod_with_the_reason(pods: GuestPods) -> None:
    with pytest.raises(grpc.RpcError) as info:
        userns_pod(pods, "runc", "userns-runc")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    assert "runtime handler 'runc' cannot run pods in a user namespace" in details
    assert "no idmapped mounts" in details



def test_a_shared_pid_namespace_pod_keeps_its_infra_in_the_user_namespace(
        pods: GuestPods) -> None:
    uid = secrets.token_hex(8)
    config = pod_config("userns-pid", pods.log_dir, pid=pb.POD,
                        cgroup_parent=pods.node.layout.create_pod(uid))
    config.metadata.uid = uid
    mapping = [pb.IDMapping(host_id=HOST_ID, container_id=0, length=SIZE)]
    config.linux.security_context.namespace_options.userns_options.CopyFrom(
        pb.UserNamespace(mode=pb.POD, uids=mapping, gids=mapping))
    pods.uids[f"pending-{uid}"] = uid
    pod_id = pods.runtime.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler="crun"),
        timeout=60).pod_sandbox_id
    pods.uids[pod_id] = pods.uids.pop(f"pending-{uid}")
    pods.created.append(pod_id)
    config_c = container_config("app", pods.node.image, ["sleep", "300"])
    config_c.linux.security_context.namespace_options.pid = pb.POD
    cid = pods.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config_c, sandbox_config=pods.config(pod_id)),
        timeout=60).container_id
    pods.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    # PID 1 is the pod's infra process, in the same user namespace as the container.
    pid = pods.pid(cid)
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    ps = pods.exec(cid, "cat", "/proc/1/uid_map").stdout.split()
    assert ps == [b"0", str(HOST_ID).encode(), str(SIZE).encode()]

"""Checkpoint and restore with CRIU on the cgroup v2 node: a running counter is
checkpointed (and keeps running), the archive has CRI-O's layout, and a new pod with
another IP restores it from the archive with its memory, files and deletions."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import grpc
import pytest

from cripy.api import api_pb2 as pb
from cripy.oci.checkpoint import CHECKPOINT_ANNOTATION
from tests.support.images import ImageSpec, Layer, push_image
from tests.support.pods import container_config
from tests.support.registry import Registry
from tests.vm.guest.node import GuestPods, wait_for
from tests.vm.guest.test_crun import run_with

#: Counts in memory; writes each value to a file and to its log; a file written and one
#: of the image's files deleted before the checkpoint. A second process keeps a file open
#: and appends to it all the time: the archive's copy of it must have the size CRIU saw.
COUNTER = ["sh", "-c", "echo before > /tmp/marker; rm /bin/vi; "
           "(while true; do echo more; sleep 0.1; done) > /tmp/appended & i=0; "
           "while true; do i=$((i+1)); echo $i > /tmp/count; echo count $i; sleep 0.2; done"]


def count(pods: GuestPods, cid: str) -> int:
    return int(pods.exec(cid, "cat", "/tmp/count").stdout.strip() or 0)


def logged_counts(path: Path) -> list[int]:
    """The counter values of a CRI log ("<time> stdout F count N")."""
    values = []
    for line in path.read_text().splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[3].startswith("count "):
            values.append(int(parts[3].split()[1]))
    return values


def pod_ip(pods: GuestPods, pod_id: str) -> str:
    status = pods.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    ip: str = status.status.network.ip
    return ip


def checkpoint(pods: GuestPods, cid: str, location: str, timeout: int = 120) -> None:
    pods.runtime.CheckpointContainer(pb.CheckpointContainerRequest(
        container_id=cid, location=location, timeout=timeout), timeout=timeout + 30)


def work_dirs(pods: GuestPods) -> list[str]:
    root = pods.node.daemon.root / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# CRIU dumps and restores processes and files; the driver only places the restored
# container's cgroup. So each check runs on one driver: the restore on systemd (the
# kubelet's driver on a systemd node, where the restored container gets a new scope),
# the refusals and the probe on cgroupfs.
@pytest.mark.drivers("cgroupfs")
def test_status_says_checkpointing_is_available(pods: GuestPods) -> None:
    info = pods.runtime.Status(pb.StatusRequest(verbose=True)).info
    report = json.loads(info["checkpoint_restore"])
    assert report["available"] is True, report
    assert report["version"] == "3.17.1"


def restore(pods: GuestPods, pod_id: str, name: str, image: str) -> str:
    """CreateContainer from a checkpoint, StartContainer; returns the container ID."""
    config = container_config(name, image, COUNTER)
    cid: str = pods.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pods.config(pod_id)),
        timeout=120).container_id
    assert pods.status(cid).status.state == pb.CONTAINER_CREATED
    pods.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
    return cid


@pytest.mark.drivers("systemd")
def test_checkpoint_a_running_counter_and_restore_it_in_a_new_pod(
        pods: GuestPods, tmp_path: Path, registry: Registry) -> None:
    source_pod = pods.run("ckpt-src")
    cid = pods.create(source_pod, "counter", COUNTER)
    wait_for("the counter counts", lambda: count(pods, cid) >= 5, within=60)
    before = count(pods, cid)
    location = tmp_path / "counter.tar"
    checkpoint(pods, cid, str(location))

    # The container keeps running and counting.
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    after = count(pods, cid)
    wait_for("the counter goes on", lambda: count(pods, cid) > after, within=30)
    assert work_dirs(pods) == []

    # The archive has CRI-O's layout.
    with tarfile.open(location) as tf:
        names = set(tf.getnames())
        config = json.load(tf.extractfile("config.dump"))  # type: ignore[arg-type]
        spec = json.load(tf.extractfile("spec.dump"))  # type: ignore[arg-type]
        deleted = json.load(tf.extractfile("deleted.files"))  # type: ignore[arg-type]
        diff = tf.extractfile("rootfs-diff.tar")
        assert diff is not None
        with tarfile.open(fileobj=diff) as rootfs:
            changed = set(rootfs.getnames())
        log = tf.extractfile("container.log")
        assert log is not None and b"count 1\n" in log.read()
    assert {"checkpoint", "checkpoint/inventory.img", "config.dump", "spec.dump",
            "rootfs-diff.tar", "deleted.files", "container.log", "dump.log"} <= names
    assert any(n.startswith("checkpoint/pages-") for n in names)
    assert config["id"] == cid and config["rootfsImageName"] == pods.node.image
    annotations = spec["annotations"]
    assert annotations["io.kubernetes.pod.name"] == "ckpt-src"
    assert annotations["io.kubernetes.container.name"] == "counter"
    assert annotations["io.kubernetes.cri-o.ImageName"] == pods.node.image
    assert {"tmp/marker", "tmp/count", "tmp/appended"} <= changed
    assert not any(n in changed for n in ("proc", "sys", "etc/hosts", "etc/resolv.conf"))
    assert deleted == ["/bin/vi"]

    # Restored into a new pod, with another IP: memory, files and deletions are back.
    target_pod = pods.run("ckpt-dst")
    assert pod_ip(pods, target_pod) != pod_ip(pods, source_pod)
    restored = restore(pods, target_pod, "restored", str(location))
    status = pods.status(restored, verbose=True)
    assert status.status.state == pb.CONTAINER_RUNNING
    info = json.loads(status.info["info"])
    assert info["pid"] > 0
    assert info["runtimeSpec"]["annotations"]["io.cripy.restored-from"] == str(location)
    assert pods.exec(restored, "cat", "/tmp/marker").stdout == b"before\n"
    assert pods.exec(restored, "ls", "/bin/vi").exit_code != 0
    wait_for("the restored counter counts", lambda: count(pods, restored) > after, within=30)
    # It went on from its memory, not from 1: its first logged value follows the
    # checkpointed ones.
    log_path = pods.log_dir / "restored.log"
    wait_for("the restored counter logs", lambda: bool(logged_counts(log_path)), within=30)
    values = logged_counts(log_path)
    assert values[0] > before and 1 not in values
    assert values == sorted(values)
    # The appender's open file came back with it and keeps growing.
    size = len(pods.exec(restored, "cat", "/tmp/appended").stdout)
    wait_for("the restored appender appends",
             lambda: len(pods.exec(restored, "cat", "/tmp/appended").stdout) > size, within=30)
    # Its pod's network is the new one.
    route = pods.exec(restored, "ip", "addr", "show", "eth0").stdout.decode()
    assert pod_ip(pods, target_pod) in route
    # The original still runs on, independently.
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    restore_dir = pods.node.daemon.root / "containers" / restored / "restore"
    assert not restore_dir.exists()
    assert work_dirs(pods) == []

    # An OCI image made of the archive (one layer, CRI-O's checkpoint annotation), pulled
    # from a registry, restores the same way.
    image = push_image(registry, "checkpoints/counter", "v1", ImageSpec(
        layers=[Layer(location.read_bytes(), "gzip")],
        annotations={CHECKPOINT_ANNOTATION: "counter"}))
    pods.node.daemon.pull(image.ref)
    from_image = restore(pods, pods.run("ckpt-img"), "from-image", image.ref)
    assert pods.status(from_image).status.state == pb.CONTAINER_RUNNING
    assert pods.exec(from_image, "cat", "/tmp/marker").stdout == b"before\n"
    wait_for("the counter from the image counts",
             lambda: count(pods, from_image) > after, within=30)
    wait_for("it logs", lambda: bool(logged_counts(pods.log_dir / "from-image.log")),
             within=30)
    values = logged_counts(pods.log_dir / "from-image.log")
    assert values[0] > before
    assert work_dirs(pods) == []


@pytest.mark.drivers("cgroupfs")
def test_checkpoint_errors_leave_the_container_running_and_nothing_behind(
        pods: GuestPods, tmp_path: Path) -> None:
    pod = pods.run("ckpt-err")
    cid = pods.create(pod, "counter", COUNTER)
    out = tmp_path / "out"
    out.mkdir()
    created = pods.create(pod, "idle", ["sleep", "300"], start=False)

    def refused(container_id: str, location: str) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            checkpoint(pods, container_id, location)
        return info.value

    error = refused(created, str(out / "a.tar"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only a running container" in (error.details() or "")
    error = refused(cid, "relative.tar")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an absolute path" in (error.details() or "")
    error = refused(cid, str(out / "missing" / "a.tar"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not exist" in (error.details() or "")
    error = refused(cid, str(pods.node.daemon.runroot / "a.tar"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = refused("0" * 64, str(out / "a.tar"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # What CRIU refuses (an established TCP connection) is answered with its reason.
    # (The listener's stdin never ends: at its end busybox nc half-closes the connection.)
    tcp = pods.create(pod, "tcp", ["sh", "-c", "sleep 3600 | nc -l -p 9000 >/dev/null & "
                                   "while true; do "
                                   "(while true; do echo x; sleep 1; done) | "
                                   f"nc {pod_ip(pods, pod)} 9000; sleep 0.5; done"])
    wait_for("the connection is up", lambda: b" 01 " in pods.exec(
        tcp, "cat", "/proc/net/tcp").stdout, within=30)
    error = refused(tcp, str(out / "tcp.tar"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Connected TCP socket" in (error.details() or ""), error.details()
    assert pods.status(tcp).status.state == pb.CONTAINER_RUNNING
    assert b" 01 " in pods.exec(tcp, "cat", "/proc/net/tcp").stdout

    # Debian's crun is built without CRIU: a crun container is refused, saying so.
    crun = pods.create(run_with(pods, "crun", "ckpt-crun"), "app", ["sleep", "300"])
    error = refused(crun, str(out / "crun.tar"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "built without CRIU support" in (error.details() or ""), error.details()

    assert sorted(p.name for p in out.iterdir()) == []
    assert work_dirs(pods) == []
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    # A good checkpoint still works afterwards (here through `cripy ctl checkpoint`).
    done = pods.node.daemon.ctl("checkpoint", "--export", str(out / "good.tar"), cid[:12])
    assert done.stdout.strip() == cid
    assert sorted(p.name for p in out.iterdir()) == ["good.tar"]
    with tarfile.open(out / "good.tar") as tf:
        assert "checkpoint/inventory.img" in tf.getnames()

"""What a current kubelet sets and reads on containers: the stop signal (KEP-4960),
ContainerStatus.user, and ExecSync replies that always fit the gRPC message limit."""

from __future__ import annotations

import time

import grpc
import pytest

from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from cripy.oci.runtime import EXEC_OUTPUT_LIMIT
from tests.integration.test_pods import rpc_error
from tests.support import images as img
from tests.support.pods import Node, Pods, container_config
from tests.support.registry import Registry

#: The largest message the kubelet's CRI client takes.
KUBELET_MESSAGE_LIMIT = 16 * 1024 * 1024
#: A shell that reports the signal it got in its exit code.
TRAPS = ("trap 'exit 3' QUIT; trap 'exit 10' USR1; trap 'exit 15' TERM; "
         "while true; do sleep 0.1; done")


@pytest.fixture(scope="module")
def quit_image(node: Node, registry: Registry) -> str:
    """busybox whose image config says STOPSIGNAL SIGQUIT, pulled."""
    spec = img.ImageSpec([img.Layer(img.busybox_rootfs_layer())],
                         img.ImageConfig(cmd=["sh"], stop_signal="SIGQUIT"))
    pushed = img.push_image(registry, "stopsignal", "quit", spec)
    node.daemon.pull(pushed.ref)
    return pushed.ref


def stopped_by(pods: Pods, cid: str) -> int:
    """Stop the container (long grace period) and return its exit code."""
    time.sleep(0.5)  # the traps are set
    pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=20), timeout=60)
    status = pods.status(cid).status
    assert status.state == pb.CONTAINER_EXITED
    return int(status.exit_code)


# --- stop signal ------------------------------------------------------------------------


def test_the_image_stop_signal_is_used_and_reported(pods: Pods, quit_image: str) -> None:
    cid = pods.create_from(pods.run(), container_config("quit", quit_image, ["sh", "-c", TRAPS]))
    assert pods.status(cid).status.stop_signal == pb.SIGQUIT
    assert stopped_by(pods, cid) == 3
    assert pods.status(cid).status.stop_signal == pb.SIGQUIT


def test_the_config_stop_signal_overrides_the_image(pods: Pods, quit_image: str) -> None:
    config = container_config("usr1", quit_image, ["sh", "-c", TRAPS])
    config.stop_signal = pb.SIGUSR1
    cid = pods.create_from(pods.run(), config)
    assert pods.status(cid).status.stop_signal == pb.SIGUSR1
    assert stopped_by(pods, cid) == 10


def test_without_either_it_is_sigterm(pods: Pods) -> None:
    cid = pods.create(pods.run(), "term", ["sh", "-c", TRAPS])
    assert pods.status(cid).status.stop_signal == pb.SIGTERM
    assert stopped_by(pods, cid) == 15


def test_an_unknown_stop_signal_is_refused(pods: Pods) -> None:
    pod_id = pods.run()
    config = container_config("bad", pods.node.image, ["true"])
    config.stop_signal = 99  # type: ignore[assignment]
    err = rpc_error(pods.runtime.CreateContainer, pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pods.config(pod_id)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop_signal 99" in str(err.details())


# --- ExecSync output cap ----------------------------------------------------------------


def test_exec_sync_output_past_16_mib_is_cut_to_fit_the_kubelets_limit(
        pods: Pods, node: Node) -> None:
    cid = pods.create(pods.run(), "chatty", ["sleep", "300"])
    twenty_mib = 20 * 1024 * 1024
    # The kubelet takes messages of at most 16 MiB: a client with that limit.
    with grpc.insecure_channel(node.daemon.endpoint, options=[
            ("grpc.max_receive_message_length", KUBELET_MESSAGE_LIMIT)]) as channel:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)
        reply = stub.ExecSync(pb.ExecSyncRequest(container_id=cid, timeout=60, cmd=[
            "sh", "-c", f"echo first >&2; head -c {twenty_mib} /dev/zero | tr '\\0' o; "
                        "echo last >&2; exit 3"]), timeout=120)
    assert reply.exit_code == 3
    assert reply.stderr.startswith(b"first\n")
    assert len(reply.stdout) + len(reply.stderr) == EXEC_OUTPUT_LIMIT
    assert EXEC_OUTPUT_LIMIT > 16 * 1024 * 1024 - 64
    assert set(reply.stdout) == {ord("o")}
    assert reply.ByteSize() <= KUBELET_MESSAGE_LIMIT
    # Output that fits is whole, and the container is fine afterwards.
    assert pods.exec(cid, "sh", "-c", "echo out; echo err >&2").stderr == b"err\n"


# --- ContainerStatus.user ---------------------------------------------------------------


def test_status_reports_the_user_the_process_runs_as(pods: Pods) -> None:
    security = pb.LinuxContainerSecurityContext(
        run_as_user=pb.Int64Value(value=1000), run_as_group=pb.Int64Value(value=2000),
        supplemental_groups=[4242, 5000])
    cid = pods.create(pods.run(), "who", ["sleep", "300"], security_context=security)
    user = pods.status(cid).status.user.linux
    # busybox's /etc/group makes app (uid 1000) a member of users (100).
    assert (user.uid, user.gid, sorted(user.supplemental_groups)) == \
        (1000, 2000, [100, 2000, 4242, 5000])
    # What the container's first process has, as the kernel sees it.
    fields = dict(line.split(":", 1) for line in
                  pods.exec(cid, "cat", "/proc/1/status").stdout.decode().splitlines())
    assert fields["Uid"].split()[0] == "1000" and fields["Gid"].split()[0] == "2000"
    assert sorted(int(g) for g in fields["Groups"].split()) == sorted(user.supplemental_groups)
    # The image's user when the config names none (root in busybox).
    root = pods.status(pods.create(pods.run(), "root", ["sleep", "300"])).status.user.linux
    assert (root.uid, root.gid) == (0, 0)

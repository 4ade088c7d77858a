"""CheckpointContainer and restores on this host: what is refused, and why.

The full checkpoint and restore runs on the VM node (tests/vm/guest/test_checkpoint.py):
this host's kernel may not let CRIU work, and then the daemon says so with CRIU's own
reason (the same one `criu check` gives).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.integration.test_monitoring import cripy_status
from tests.support.daemon import Daemon
from tests.support.pods import Pods, container_config

SLEEPER = ["sleep", "300"]


def criu_check() -> tuple[bool, str]:
    """What `criu check` says on this host: (works, its error lines)."""
    proc = subprocess.run(["criu", "check"], capture_output=True, text=True, timeout=60)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error (" in line]
    return proc.returncode == 0, "; ".join(errors)


def checkpoint_error(daemon: Daemon, cid: str, location: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        daemon.runtime.CheckpointContainer(pb.CheckpointContainerRequest(
            container_id=cid, location=location, timeout=60), timeout=120)
    return info.value


def test_status_reports_whether_checkpointing_works_here(pods: Pods) -> None:
    info = pods.runtime.Status(pb.StatusRequest(verbose=True)).info
    report = json.loads(info["checkpoint_restore"])
    works, errors = criu_check()
    assert report["available"] is works
    if not works:
        assert "criu check" in report["reason"] and errors.split("; ")[-1] in \
            report["reason"]
    # `cripy status info` tells the same.
    shown = json.loads(cripy_status(pods.node.daemon, "info").stdout)["checkpoint_restore"]
    assert shown == report


def test_bad_requests_are_refused_and_leave_the_container_running(
        pods: Pods, tmp_path: Path) -> None:
    pod = pods.run("ckpt-bad")
    cid = pods.create(pod, "app", SLEEPER)
    idle = pods.create(pod, "idle", SLEEPER, start=False)
    out = tmp_path / "out"
    out.mkdir()
    daemon = pods.node.daemon
    cases = [
        (idle, str(out / "a.tar"), grpc.StatusCode.FAILED_PRECONDITION,
         "only a running container"),
        (cid, "a.tar", grpc.StatusCode.INVALID_ARGUMENT, "not an absolute path"),
        (cid, "", grpc.StatusCode.INVALID_ARGUMENT, "location is empty"),
        (cid, str(out / "no" / "a.tar"), grpc.StatusCode.INVALID_ARGUMENT, "does not exist"),
        (cid, str(out), grpc.StatusCode.INVALID_ARGUMENT, "is a directory"),
        (cid, str(daemon.root / "a.tar"), grpc.StatusCode.INVALID_ARGUMENT, "not allowed"),
        (cid, "/proc/a.tar", grpc.StatusCode.INVALID_ARGUMENT, "not allowed"),
        ("f" * 64, str(out / "a.tar"), grpc.StatusCode.NOT_FOUND, "not found"),
        ("", str(out / "a.tar"), grpc.StatusCode.INVALID_ARGUMENT, "container_id is empty"),
    ]
    for container_id, location, code, text in cases:
        error = checkpoint_error(daemon, container_id, location)
        assert (error.code(), text in (error.details() or "")) == (code, True), \
            (location, error.details())
    assert list(out.iterdir()) == []
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING


def test_a_checkpoint_here_succeeds_or_is_refused_with_criu_s_reason(
        pods: Pods, tmp_path: Path) -> None:
    cid = pods.create(pods.run("ckpt-host"), "app", SLEEPER)
    out = tmp_path / "out"
    out.mkdir()
    location = out / "app.tar"
    works, errors = criu_check()
    if works:
        pods.runtime.CheckpointContainer(pb.CheckpointContainerRequest(
            container_id=cid, location=str(location), timeout=120), timeout=180)
        assert location.is_file()
    else:
        error = checkpoint_error(pods.node.daemon, cid, str(location))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = error.details() or ""
        assert "checkpoint/restore is not available on this node" in details
        assert errors.split("; ")[-1] in details
        # `cripy ctl checkpoint` says the same.
        result = pods.node.daemon.ctl("checkpoint", "--export", str(location), cid[:12],
                                      check=False)
        assert result.returncode != 0 and errors.split("; ")[-1] in result.stderr
        assert list(out.iterdir()) == []
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    work = pods.node.daemon.root / "checkpoints"
    assert not work.exists() or list(work.iterdir()) == []


def test_an_image_that_is_not_a_checkpoint_archive_is_refused(
        pods: Pods, tmp_path: Path) -> None:
    pod = pods.run("restore-bad")
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(b"this is no tar archive" * 100)
    config = container_config("restored", str(bogus), SLEEPER)
    with pytest.raises(grpc.RpcError) as info:
        pods.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pods.config(pod)), timeout=60)
    works, _ = criu_check()
    if works:
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(bogus) in (info.value.details() or "")
    else:
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "checkpoint/restore is not available" in (info.value.details() or "")
    listed = pods.runtime.ListContainers(pb.ListContainersRequest()).containers
    assert pod not in [c.pod_sandbox_id for c in listed]


def test_criu_support_can_be_turned_off(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "daemon", extra_config="[runtime]\nenable_criu_support = false\n")
    with daemon:
        info = daemon.runtime.Status(pb.StatusRequest(verbose=True)).info
        report = json.loads(info["checkpoint_restore"])
        assert report == {"available": False, "criu": "", "version": "",
                          "reason": "disabled by [runtime] enable_criu_support = false"}

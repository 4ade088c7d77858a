"""The status API (`cripy status`) and the Prometheus endpoint of a real daemon."""

from __future__ import annotations

import contextlib
import json
import stat
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import Pods
from tests.support.registry import Registry, free_port


def cripy_status(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cripy", "status", "--socket",
         str(daemon.runroot / "status.sock"), *args],
        capture_output=True, text=True, timeout=60)


def test_status_api_info_config_containers_pause(pods: Pods) -> None:
    daemon = pods.node.daemon
    sock = (daemon.runroot / "status.sock").stat()
    assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_uid == 0
    info = json.loads(cripy_status(daemon, "info").stdout)
    assert info["storage_root"] == str(daemon.root)
    assert info["cgroup_driver"] == "cgroupfs"
    config = tomllib.loads(cripy_status(daemon, "config").stdout)
    assert config["root"] == str(daemon.root)

    cid = pods.create(pods.run("status"), "c", ["sleep", "300"])
    shown = json.loads(cripy_status(daemon, "containers", cid[:12]).stdout)
    assert shown["pid"] > 0 and shown["state"] == "running"
    assert cripy_status(daemon, "pause", cid).returncode == 0
    assert json.loads(cripy_status(daemon, "containers", cid).stdout)["state"] == "paused"
    assert cripy_status(daemon, "unpause", cid).returncode == 0
    assert pods.exec(cid, "true").exit_code == 0

    missing = cripy_status(daemon, "containers", "nope")
    assert missing.returncode != 0
    assert len(missing.stderr.strip().splitlines()) == 1 and "404" in missing.stderr



def test_prometheus_metrics(tmp_path: Path, registry: Registry, images: Any) -> None:
    port = free_port()
    config = f"[monitoring]\nmetrics_port = {port}\n"
    with Daemon(tmp_path, insecure_registries=[registry.host], extra_config=config) as daemon:
        daemon.pull(images.busybox.ref)
        daemon.runtime.Version(pb.VersionRequest())
        with contextlib.suppress(grpc.RpcError):  # the error is what is counted below
            daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id="x"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    assert 'cripy_operations_total{operation="Version"}' in text
    assert 'cripy_operations_errors_total{code="NOT_FOUND",operation="PodSandboxStatus"}' \
        in text
    assert "cripy_operations_latency_seconds_bucket" in text
    pulled = [line for line in text.splitlines()
              if line.startswith("cripy_image_pulls_bytes_total")]
    assert pulled and float(pulled[0].split()[-1]) > 1_000_000
    assert 'cripy_containers{state="running"}' in text

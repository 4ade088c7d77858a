"""The daemon process: socket, Version, Status, UNIMPLEMENTED, config errors, shutdown."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from tests.support.daemon import Daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with Daemon(tmp_path) as d:
        yield d


def test_version_names_cripy_and_v1(daemon: Daemon) -> None:
    resp = daemon.runtime.Version(pb.VersionRequest(version="v1"))
    assert resp.runtime_name == "cripy"
    assert resp.runtime_api_version == "v1"
    assert resp.runtime_version


def test_socket_is_0660_and_root_owned(daemon: Daemon) -> None:
    st = daemon.socket.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, 0)


def conditions(daemon: Daemon) -> dict[str, pb.RuntimeCondition]:
    status = daemon.runtime.Status(pb.StatusRequest()).status
    return {c.type: c for c in status.conditions}


def test_status_reports_network_not_ready_without_cni_config(daemon: Daemon) -> None:
    found = conditions(daemon)
    assert found["RuntimeReady"].status is True
    network = found["NetworkReady"]
    assert network.status is False
    assert network.reason == "NetworkPluginNotReady"
    assert str(daemon.cni_dir) in network.message


def test_status_turns_network_ready_with_a_usable_conflist(daemon: Daemon) -> None:
    (daemon.cni_dir / "10-test.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "test",
        "plugins": [{"type": "bridge"}, {"type": "portmap"}],
    }))
    assert conditions(daemon)["NetworkReady"].status is True
    (daemon.cni_dir / "10-test.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "test", "plugins": [{"type": "no-such-plugin"}],
    }))
    network = conditions(daemon)["NetworkReady"]
    assert network.status is False and "no-such-plugin" in network.message


def test_verbose_status_carries_the_config(daemon: Daemon) -> None:
    resp = daemon.runtime.Status(pb.StatusRequest(verbose=True))
    assert json.loads(resp.info["config"])["root"] == str(daemon.root)


def test_unbuilt_rpcs_answer_unimplemented_with_their_name(daemon: Daemon) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(daemon.runtime.StreamPodSandboxes(pb.StreamPodSandboxesRequest(), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "StreamPodSandboxes" in (info.value.details() or "")


def test_sigterm_shuts_down_cleanly_and_removes_the_socket(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path).start()
    try:
        assert daemon.stop() == 0
        assert not daemon.socket.exists()
    finally:
        daemon.kill()


def test_a_stale_socket_from_a_killed_daemon_is_replaced(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path).start()
    try:
        daemon.kill()
        assert daemon.socket.exists()
        daemon.start()
        assert daemon.runtime.Version(pb.VersionRequest()).runtime_name == "cripy"
    finally:
        daemon.stop()


def test_a_second_daemon_on_the_same_root_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cripy", "daemon", "--config", str(daemon.config_path),
         "--listen", f"unix://{tmp_path / 'other.sock'}"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "another cripy daemon is using" in result.stderr
    assert daemon.runtime.Version(pb.VersionRequest()).runtime_name == "cripy"


def run_cripy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cripy", *args],
                          capture_output=True, text=True, timeout=30)


def test_bad_config_is_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[image]\npull_concurrency = \"many\"\n")
    result = run_cripy("daemon", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cripy: config: config file {config}: image.pull_concurrency: expected an integer, "
        "got a string"
    ]


def test_cripy_config_prints_what_the_daemon_loads(tmp_path: Path) -> None:
    printed = run_cripy("config", "--defaults")
    assert printed.returncode == 0
    config = tmp_path / "cripy.toml"
    config.write_text(printed.stdout)
    again = run_cripy("config", "--config", str(config))
    header, _, body = again.stdout.partition("\n")
    assert header == f"# Merged from: {config}"
    assert body == printed.stdout


def test_cripy_config_shows_the_drop_ins_merged(tmp_path: Path) -> None:
    main = tmp_path / "cripy.toml"
    main.write_text('log_level = "warning"\n[image]\npull_concurrency = 4\n')
    drop_ins = tmp_path / "cripy.d"
    drop_ins.mkdir()
    (drop_ins / "50-mirror.toml").write_text(
        '[registries."127.0.0.1:5000"]\nmirrors = ["127.0.0.1:5001"]\n')
    (drop_ins / "10-image.toml").write_text("[image]\npull_concurrency = 8\n")
    printed = run_cripy("config", "--config", str(main), "--config-dir", str(drop_ins))
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith(
        f"# Merged from: {main}, {drop_ins}/10-image.toml, {drop_ins}/50-mirror.toml\n")
    data = tomllib.loads(printed.stdout)
    assert data["log_level"] == "warning"
    assert data["image"]["pull_concurrency"] == 8
    assert data["registries"]["127.0.0.1:5000"]["mirrors"] == ["127.0.0.1:5001"]


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    sock = tmp_path / "flag.sock"
    daemon = Daemon(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cripy", "daemon", "--config", str(daemon.config_path),
         "--listen", f"unix://{sock}", "--log-level", "warning"],
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            stub = api_pb2_grpc.RuntimeServiceStub(channel)
            assert stub.Version(pb.VersionRequest(), timeout=10).runtime_name == "cripy"
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0
    assert not sock.exists()

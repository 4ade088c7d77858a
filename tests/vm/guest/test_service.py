"""cripy as the node service cripy.service: installed by `cripy install-service`, ready
when `systemctl start` returns, nothing left behind by `systemctl stop` but the running
containers KillMode=process keeps, those containers served again by the next start (a
`systemctl restart` is that stop and start), logs in the journal, and the /etc/cripy
files (with drop-ins) as its configuration."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.pods import Node, Pods, bridge_network, leftovers, remove_cgroup
from tests.support.registry import Registry

UNIT = "cripy.service"
ETC = Path("/etc/cripy")
UNIT_FILE = Path("/etc/systemd/system") / UNIT


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): "
                             f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def systemctl(*args: str, check: bool = True) -> str:
    return run("systemctl", *args, check=check).stdout.strip()


def show(prop: str) -> str:
    return systemctl("show", "-P", prop, UNIT)


def journal(since: str) -> str:
    return run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", "--since", since).stdout


def unit_pids() -> list[int]:
    group = show("ControlGroup")
    procs = Path("/sys/fs/cgroup") / group.lstrip("/") / "cgroup.procs"
    if not group or not procs.exists():
        return []
    return [int(p) for p in procs.read_text().split()]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
            busybox: str) -> Iterator[tuple[Daemon, str, Path]]:
    """cripy.service installed with its state under a scratch directory (overlayfs
    cannot stack on the guest's overlay root), configured by /etc/cripy/cripy.toml plus
    a drop-in; stopped, uninstalled and cleaned up afterwards."""
    assert not UNIT_FILE.exists() and not ETC.exists(), "the guest has a cripy set-up already"
    tmp = tmp_path_factory.mktemp("service")
    # Daemon only for its config file and clients: systemd runs the process.
    client = Daemon(tmp / "daemon", insecure_registries=[registry.host])
    config = client.config_path.read_text().replace('log_level = "debug"', 'log_level = "info"')
    (ETC / "cripy.d").mkdir(parents=True)
    (ETC / "cripy.toml").write_text(config)
    (ETC / "cripy.d" / "50-debug.toml").write_text('log_level = "debug"\n')
    cripy = str(Path(sys.executable).parent / "cripy")
    installed = run(cripy, "install-service")
    assert f"wrote {UNIT_FILE}" in installed.stdout and "daemon-reload" in installed.stdout
    try:
        with bridge_network(client.cni_dir, tmp, 7) as bridge:
            yield client, bridge, tmp
    finally:
        systemctl("stop", UNIT, check=False)
        systemctl("reset-failed", UNIT, check=False)
        UNIT_FILE.unlink(missing_ok=True)
        systemctl("daemon-reload", check=False)
        shutil.rmtree(ETC, ignore_errors=True)


def test_cripy_config_merges_the_drop_ins(service: tuple[Daemon, str, Path]) -> None:
    printed = run(str(Path(sys.executable).parent / "cripy"), "config").stdout
    assert printed.startswith(
        f"# Merged from: {ETC}/cripy.toml, {ETC}/cripy.d/50-debug.toml\n")
    assert '\nlog_level = "debug"\n' in printed


def test_start_stop_start(service: tuple[Daemon, str, Path], busybox: str) -> None:
    client, bridge, tmp = service
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    systemctl("start", UNIT)
    # Type=notify: start returned after READY=1, so the socket serves right now.
    assert systemctl("is-active", UNIT) == "active"
    assert client.runtime.Version(pb.VersionRequest(), timeout=10).runtime_name == "cripy"
    assert show("StatusText") == f"serving on {client.endpoint}"
    main_pid = int(show("MainPID"))
    assert b"cripy\0daemon" in Path(f"/proc/{main_pid}/cmdline").read_bytes()

    client.pull(busybox)
    pods = Pods(Node(client, bridge, busybox, tmp), tmp / "logs")
    leaks: list[str] = []
    try:
        cid = pods.create(pods.run("service"), "kept", ["sleep", "600"])
        pid = json.loads(pods.status(cid, verbose=True).info["info"])["pid"]

        # (No separate `systemctl restart`: for this unit it is the stop and start below,
        # and each start of the daemon costs many seconds under emulation.)
        systemctl("stop", UNIT)
        assert systemctl("is-active", UNIT, check=False) == "inactive"
        assert show("MainPID") == "0"
        assert not client.socket.exists()  # the daemon removed its sockets on the way out
        assert not (client.runroot / "status.sock").exists()
        assert Path(f"/proc/{pid}").exists()  # still running, waiting for the next daemon
        # What remains in the unit's cgroup is the container's monitor, nothing else.
        remaining = unit_pids()
        assert all(b"conmon" in Path(f"/proc/{p}/cmdline").read_bytes() for p in remaining), \
            remaining

        systemctl("start", UNIT)
        assert systemctl("is-active", UNIT) == "active"
        assert int(show("MainPID")) != main_pid
        assert Path(f"/proc/{pid}").exists()  # KillMode=process: the container lived on
        assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
        assert pods.exec(cid, "echo", "still here").stdout == b"still here\n"
    finally:
        pods.cleanup()
        leaks = leftovers(client, bridge, pods.cgroup_parent)
        remove_cgroup(pods.cgroup_parent)
    assert leaks == []
    systemctl("stop", UNIT)
    assert unit_pids() == []  # pods removed and the daemon stopped: the unit holds nothing

    logged = journal(since)
    assert f"cripy serving on unix://{client.socket}" in logged
    assert "shutting down" in logged
    assert "level=debug" in logged  # the drop-in's log level
    assert "time=" not in logged  # the journal keeps the timestamps
    warnings = run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", "--since", since,
                   "-p", "info").stdout
    assert "level=debug" not in warnings  # priorities reach the journal


def test_a_broken_drop_in_fails_the_start_with_the_file_named(
        service: tuple[Daemon, str, Path]) -> None:
    bad = ETC / "cripy.d" / "60-typo.toml"
    bad.write_text("[image]\npull_concurency = 2\n")
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        assert run("systemctl", "start", UNIT, check=False).returncode != 0
        assert systemctl("is-active", UNIT, check=False) == "failed"  # and not restarted
        assert f"config file {bad}: unknown config key image.pull_concurency" in journal(since)
    finally:
        bad.unlink()
        systemctl("stop", UNIT, check=False)
        systemctl("reset-failed", UNIT, check=False)

"""`cripy ctl` pod and container verbs against a real daemon, runc, conmon and CNI.

The whole crictl-style cycle: runp, pods, inspectp, create (pulling the image), start, ps,
inspect, logs, exec, update, stop, rm, stopp, rmp; `run`; `logs -f`; and the one-line
errors. Every pod a test makes is removed (`rmp -f`) by the fixture afterwards.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.registry import Registry

CGROUP_ROOT = Path("/sys/fs/cgroup")
LABEL = "cripy-ctl-test"
SLEEPER = ["sh", "-c", "echo hello; echo oops >&2; sleep 30"]


@dataclass
class Node:
    daemon: Daemon
    image: str


def _conflist(bridge: str, subnet_octet: int, ipam_dir: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": f"cripy-ctl-{bridge}",
        "plugins": [
            {
                "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                         "ranges": [[{"subnet": f"10.214.{subnet_octet}.0/24"}]],
                         "routes": [{"dst": "0.0.0.0/0"}]},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
         images: Any) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("ctl-runtime")
    daemon = Daemon(tmp / "daemon", insecure_registries=[registry.host])
    bridge = "cripyc" + secrets.token_hex(2)
    conflist = _conflist(bridge, random.randint(1, 250), tmp / "ipam")
    (daemon.cni_dir / "10-ctl.conflist").write_text(json.dumps(conflist))
    try:
        with daemon:
            try:
                yield Node(daemon, images.busybox.ref)
            finally:  # a safety net: the per-test fixture removes its own pods
                daemon.ctl("rmp", "-f", "-a", check=False)
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


@dataclass
class Ctl:
    """`cripy ctl` for one test: writes config files and remembers the pods it made."""

    node: Node
    tmp: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    pods: list[str] = field(default_factory=list)

    @property
    def cgroup_parent(self) -> str:
        return f"/cripyctl-{self.tag}"

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.node.daemon.ctl(*args, check=check, timeout=timeout, input=input)

    def pod_file(self, name: str) -> Path:
        config = {
            "metadata": {"name": f"{name}-{self.tag}", "namespace": "cripy-ctl",
                         "uid": secrets.token_hex(16), "attempt": 0},
            "hostname": name,
            "log_directory": str(self.tmp / "logs" / name),
            "labels": {LABEL: self.tag},
            "linux": {
                "cgroup_parent": self.cgroup_parent,
                "security_context": {"namespace_options": {"pid": "CONTAINER"}},
            },
        }
        path = self.tmp / f"pod-{name}.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def container_file(self, name: str, command: list[str]) -> Path:
        config = {"metadata": {"name": name}, "image": {"image": self.node.image},
                  "command": command, "logPath": f"{name}.log",
                  "linux": {"security_context": {"namespace_options": {"pid": "CONTAINER"}}}}
        path = self.tmp / f"ctr-{name}.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def runp(self, name: str) -> tuple[str, Path]:
        config = self.pod_file(name)
        pod_id = self("runp", str(config)).stdout.strip()
        self.pods.append(pod_id)
        return pod_id, config

    def inspect(self, container_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self("inspect", container_id).stdout)["status"]
        return data

    def wait_state(self, container_id: str, state: str, within: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            status = self.inspect(container_id)
            if status["state"] == state or time.monotonic() > deadline:
                assert status["state"] == state, status
                return status
            time.sleep(0.2)

    def cleanup(self) -> None:
        for pod_id in self.pods:
            self("rmp", "-f", pod_id, check=False)
        for controller in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else []:
            parent = controller / self.cgroup_parent.lstrip("/")
            if parent.is_dir():
                for child in sorted(parent.glob("**/"), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        child.rmdir()


@pytest.fixture
def ctl(node: Node, tmp_path: Path) -> Iterator[Ctl]:
    helper = Ctl(node, tmp_path)
    try:
        yield helper
    finally:
        helper.cleanup()


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def columns(line: str) -> list[str]:
    """A table row's cells (cells are 3+ spaces apart; "5 seconds ago" stays whole)."""
    return re.split(r"\s{3,}", line.strip())


def row_for(table: str, first_cell: str) -> list[str]:
    for line in table.splitlines()[1:]:
        if columns(line)[0] == first_cell:
            return columns(line)
    raise AssertionError(f"no row for {first_cell} in:\n{table}")


# --- the whole cycle ------------------------------------------------------------------


def test_pod_and_container_lifecycle(ctl: Ctl) -> None:
    pod_id, pod_config = ctl.runp("cycle")
    assert re.fullmatch(r"[0-9a-f]{12,}", pod_id), pod_id
    pod_name = f"cycle-{ctl.tag}"

    # pods: table, filters, JSON
    table = ctl("pods").stdout
    assert columns(table.splitlines()[0]) == [
        "POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"]
    row = row_for(table, pod_id[:13])
    assert row[1].endswith(" ago")
    assert row[2:] == ["Ready", pod_name, "cripy-ctl", "0", "(default)"]
    assert ctl("pods", "-q", "--label", f"{LABEL}={ctl.tag}").stdout.split() == [pod_id]
    assert ctl("pods", "-q", "--name", f"^{pod_name}$", "--state", "ready").stdout.split() == [
        pod_id]
    assert pod_id not in ctl("pods", "-q", "--state", "notready").stdout
    assert ctl("pods", "-q", "--id", pod_id[:10]).stdout.split() == [pod_id]
    assert row_for(ctl("pods", "--no-trunc").stdout, pod_id)[0] == pod_id
    listed = json.loads(ctl("pods", "-o", "json", "--label", f"{LABEL}={ctl.tag}").stdout)
    assert [item["id"] for item in listed["items"]] == [pod_id]
    assert listed["items"][0]["state"] == "SANDBOX_READY"

    inspected = json.loads(ctl("inspectp", pod_id[:12]).stdout)
    assert inspected["status"]["id"] == pod_id
    assert inspected["status"]["state"] == "SANDBOX_READY"
    assert inspected["status"]["metadata"]["name"] == pod_name
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", inspected["status"]["createdAt"])

    # create pulls the image (the daemon has never seen it), by a pod ID prefix
    ctr_config = ctl.container_file("sleeper", SLEEPER)
    cid = ctl("create", pod_id[:12], str(ctr_config), str(pod_config)).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12,}", cid), cid
    assert cid not in ctl("ps", "-q").stdout  # only running ones by default
    created = row_for(ctl("ps", "-a").stdout, cid[:13])
    assert created[3] == "Created"

    assert ctl("start", cid[:12]).stdout.strip() == cid
    table = ctl("ps").stdout
    assert columns(table.splitlines()[0]) == [
        "CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID", "POD"]
    row = row_for(table, cid[:13])
    assert row[1] == ctl.node.image
    assert row[2].endswith(" ago")
    assert row[3:] == ["Running", "sleeper", "0", pod_id[:13], pod_name]
    assert ctl("ps", "-q", "--pod", pod_id[:12]).stdout.split() == [cid]
    assert ctl("ps", "-q", "--name", "^sleeper$", "--pod", pod_id).stdout.split() == [cid]
    assert ctl("ps", "-q", "--image", ctl.node.image, "--pod", pod_id).stdout.split() == [cid]
    assert ctl("ps", "-q", "--state", "exited", "--pod", pod_id).stdout.split() == []
    listed = json.loads(ctl("ps", "-o", "json", "--pod", pod_id).stdout)
    assert [c["id"] for c in listed["containers"]] == [cid]

    status = ctl.inspect(cid)
    assert status["state"] == "CONTAINER_RUNNING"
    assert status["logPath"] == str(ctl.tmp / "logs" / "cycle" / "sleeper.log")

    # logs: stdout to stdout, stderr to stderr
    deadline = time.monotonic() + 15
    while True:
        logs = ctl("logs", cid)
        if ("hello" in logs.stdout and "oops" in logs.stderr) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert logs.stdout == "hello\n"
    assert logs.stderr == "oops\n"
    last = ctl("logs", "--tail", "1", cid)
    assert sorted((last.stdout + last.stderr).splitlines()) in (["hello"], ["oops"])
    assert ctl("logs", "--tail", "0", cid).stdout == ""
    stamped = ctl("logs", "-t", cid).stdout
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d) hello\n",
                        stamped), stamped
    assert ctl("logs", "--stream", "stderr", cid).stdout == ""
    future = ctl("logs", "--since", "2999-01-01T00:00:00Z", cid)
    assert (future.stdout, future.stderr) == ("", "")

    # exec: output and exit codes pass through
    hi = ctl("exec", cid[:12], "echo", "hi")
    assert (hi.returncode, hi.stdout, hi.stderr) == (0, "hi\n", "")
    three = ctl("exec", "-s", cid, "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert (three.returncode, three.stdout, three.stderr) == (3, "out\n", "err\n")
    assert ctl("exec", cid, "sh", "-c", "exit 3", check=False).returncode == 3
    assert ctl("exec", "--timeout", "10", cid, "cat", "/etc/hostname").stdout == "cycle\n"

    # update keeps what it is not told to change
    assert ctl("update", "--memory", "64m", cid).stdout.strip() == cid
    limits = ctl.inspect(cid)["resources"]["linux"]
    assert int(limits["memoryLimitInBytes"]) == 64 * 1024 * 1024

    # rm refuses a running container; stop waits the grace period, then kills
    refused = one_line_error(ctl("rm", cid, check=False))
    assert refused.startswith("cripy ctl rm: FAILED_PRECONDITION: ")
    started = time.monotonic()
    assert ctl("stop", "-t", "2", cid).stdout.strip() == cid
    assert 1.5 <= time.monotonic() - started < 30  # sh as PID 1 ignores SIGTERM
    exited = ctl.wait_state(cid, "CONTAINER_EXITED")
    assert exited["finishedAt"] != "0001-01-01T00:00:00Z"
    assert row_for(ctl("ps", "-a").stdout, cid[:13])[3] == "Exited"
    assert cid in ctl("ps", "-q", "--state", "exited").stdout

    log_file = Path(status["logPath"])
    assert log_file.exists()
    assert ctl("rm", cid).stdout.strip() == cid
    assert cid not in ctl("ps", "-a", "-q").stdout
    assert not log_file.exists()  # crictl removes the log file too
    assert "NOT_FOUND" in one_line_error(ctl("inspect", cid, check=False))

    # the pod: stop, then remove
    assert ctl("rmp", pod_id, check=False).returncode == 1  # ready pods need -f
    assert ctl("stopp", pod_id[:12]).stdout.strip() == f"Stopped sandbox {pod_id}"
    assert ctl("pods", "-q", "--state", "notready", "--id", pod_id).stdout.split() == [pod_id]
    assert json.loads(ctl("inspectp", pod_id).stdout)["status"]["state"] == "SANDBOX_NOTREADY"
    assert ctl("rmp", pod_id).stdout.strip() == f"Removed sandbox {pod_id}"
    assert pod_id not in ctl("pods", "-q").stdout
    assert "NOT_FOUND" in one_line_error(ctl("inspectp", pod_id, check=False))


def test_run_starts_a_container_in_a_new_pod(ctl: Ctl) -> None:
    pod_config = ctl.pod_file("run")
    ctr_config = ctl.container_file("runner", SLEEPER)
    cid = ctl("run", str(ctr_config), str(pod_config)).stdout.strip()
    listed = json.loads(ctl("ps", "-o", "json", "--id", cid).stdout)["containers"]
    assert [c["id"] for c in listed] == [cid]
    pod_id = listed[0]["podSandboxId"]
    ctl.pods.append(pod_id)
    assert listed[0]["state"] == "CONTAINER_RUNNING"
    assert ctl("pods", "-q", "--id", pod_id).stdout.split() == [pod_id]
    assert ctl("exec", cid, "echo", "ran").stdout == "ran\n"

    removed = ctl("rmp", "-f", pod_id).stdout
    assert f"Removed sandbox {pod_id}" in removed
    assert cid not in ctl("ps", "-a", "-q").stdout


def test_logs_follow_until_the_container_exits(ctl: Ctl) -> None:
    pod_id, pod_config = ctl.runp("follow")
    command = ["sh", "-c", "echo one; sleep 2; echo two >&2; sleep 1; echo three"]
    ctr_config = ctl.container_file("talker", command)
    container_id = ctl("create", pod_id, str(ctr_config), str(pod_config)).stdout.strip()
    ctl("start", container_id)
    started = time.monotonic()
    followed = ctl("logs", "-f", container_id, timeout=60)
    assert followed.stdout == "one\nthree\n"
    assert followed.stderr == "two\n"
    assert time.monotonic() - started >= 2  # it waited for the later lines
    ctl.wait_state(container_id, "CONTAINER_EXITED")
    assert ctl.inspect(container_id)["exitCode"] == 0
    # following an exited container prints the log and returns at once
    assert ctl("logs", "-f", "--tail", "1", container_id, timeout=30).stdout == "three\n"


# --- errors ---------------------------------------------------------------------------


def test_unknown_ids_are_one_line_not_found(ctl: Ctl) -> None:
    unknown = "0123456789abcdef" * 4
    for verb in (["inspect"], ["start"], ["stop"], ["rm"], ["logs"], ["exec", "-s"],
                 ["update", "--memory", "64m"], ["inspectp"], ["stopp"], ["rmp"]):
        args = [*verb, unknown]
        if verb[0] == "exec":
            args.append("true")
        line = one_line_error(ctl(*args, check=False))
        assert line.startswith(f"cripy ctl {verb[0]}: NOT_FOUND: "), line
        assert unknown in line
    pod_id, pod_config = ctl.runp("errs")
    ctr_config = ctl.container_file("c", ["true"])
    line = one_line_error(ctl("create", unknown, str(ctr_config), str(pod_config), check=False))
    assert line.startswith("cripy ctl create: NOT_FOUND: ")


def test_config_file_errors(ctl: Ctl) -> None:
    bad = ctl.tmp / "bad.json"
    bad.write_text('{"metadata": {"name": "x",')
    line = one_line_error(ctl("runp", str(bad), check=False))
    assert line.startswith(f"cripy ctl runp: INVALID_ARGUMENT: {bad}: ")

    missing = ctl.tmp / "missing.json"
    line = one_line_error(ctl("runp", str(missing), check=False))
    assert line.startswith("cripy ctl runp: NOT_FOUND: ") and str(missing) in line

    unknown_field = ctl.tmp / "unknown.json"
    unknown_field.write_text(json.dumps({"metadata": {"name": "x", "namespace": "y"},
                                         "no_such_field": 1}))
    line = one_line_error(ctl("runp", str(unknown_field), check=False))
    assert "INVALID_ARGUMENT" in line and "no_such_field" in line

    pod_id, pod_config = ctl.runp("cfg")
    line = one_line_error(ctl("create", pod_id, str(missing), str(pod_config), check=False))
    assert line.startswith("cripy ctl create: NOT_FOUND: ") and str(missing) in line
    line = one_line_error(ctl("run", str(bad), str(pod_config), check=False))
    assert line.startswith("cripy ctl run: INVALID_ARGUMENT: ")


def test_interactive_exec_and_port_forward(ctl: Ctl) -> None:
    pod_config = ctl.pod_file("stream")
    cid = ctl("run", str(ctl.container_file("shell", SLEEPER)), str(pod_config)).stdout.strip()
    pod_id = json.loads(ctl("ps", "-o", "json", "--id", cid).stdout)["containers"][0][
        "podSandboxId"]
    ctl.pods.append(pod_id)
    result = ctl("exec", "-i", cid, "sh", "-c", "read x; echo got-$x; exit 5",
                 input="hello\n", check=False)
    assert (result.returncode, result.stdout) == (5, "got-hello\n")

    server = ["nc", "-ll", "-p", "8080", "127.0.0.1", "-e", "echo", "via-port-forward"]
    ctl("create", pod_id, str(ctl.container_file("server", server)), str(pod_config))
    server_id = json.loads(ctl("ps", "-a", "-o", "json", "--name", "server").stdout)[
        "containers"][0]["id"]
    ctl("start", server_id)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()[1]
    forward = subprocess.Popen(
        [sys.executable, "-m", "cripy", "ctl", "-r", ctl.node.daemon.endpoint,
         "port-forward", pod_id, f"{local}:8080"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C as a terminal sends it, even when this suite runs as a background job
        # (which starts children with SIGINT ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=5) as conn:
                    data = conn.recv(100)
                if data.strip() == b"via-port-forward":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "port-forward never answered"
            time.sleep(0.2)
    finally:
        forward.send_signal(signal.SIGINT)
        forward.wait(15)

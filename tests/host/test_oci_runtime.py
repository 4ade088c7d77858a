"""OciRuntime against the real runc and conmon, with busybox-static bundles.

Each container gets its own bundle and the cgroup /cripy-test/<id>; every test removes
its containers, conmons and cgroups even when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cripy.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from cripy.oci.runtime import KILLED_FILE, OciRuntime

RUNC = shutil.which("runc") or "/usr/sbin/runc"
CONMON = shutil.which("conmon") or "/usr/bin/conmon"
BUSYBOX = "/bin/busybox"
CGROUP_PARENT = "cripy-test"
APPLETS = ["sh", "echo", "cat", "sleep", "id", "head", "tail", "ls", "printf", "pwd", "tty"]
REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


#: A CRI log line: RFC 3339 timestamp with nanoseconds, stream, partial/full tag, text.
LOG_LINE = re.compile(
    r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{1,9}(?:Z|[+-]\d\d:\d\d)) "
    r"(?P<stream>stdout|stderr) (?P<tag>[PF]) (?P<msg>.*)"
)

_ALL_IDS: set[str] = set()


@functools.lru_cache(maxsize=1)
def _spec_template() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([RUNC, "spec", "--bundle", d], check=True, timeout=30)
        spec: dict[str, Any] = json.loads((Path(d) / "config.json").read_text())
    return spec


def make_bundle(
    where: Path,
    cid: str,
    args: list[str],
    *,
    memory: int | None = None,
    tty: bool = False,
    env: list[str] | None = None,
) -> Path:
    bundle = where / f"bundle-{cid}"
    bindir = bundle / "rootfs" / "bin"
    bindir.mkdir(parents=True)
    (bundle / "rootfs" / "tmp").mkdir()
    shutil.copy2(BUSYBOX, bindir / "busybox")
    for applet in APPLETS:
        (bindir / applet).symlink_to("busybox")
    spec = copy.deepcopy(_spec_template())
    process = spec["process"]
    process["terminal"] = tty
    process["args"] = args
    process["env"] = [*process["env"], *(env or [])]
    process.pop("oomScoreAdj", None)  # lowering it needs CAP_SYS_RESOURCE
    spec["root"] = {"path": "rootfs", "readonly": False}
    linux = spec["linux"]
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
    linux["cgroupsPath"] = f"/{CGROUP_PARENT}/{cid}"
    if memory is not None:
        linux["resources"]["memory"] = {"limit": memory, "swap": memory}
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    return bundle


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from the state field on (state, ppid, pgrp, session, ...)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2 :].split()


def _live_conmons(ids: set[str]) -> list[int]:
    """Running (not zombie) conmon processes monitoring one of `ids`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        argv = _cmdline(pid)
        if not argv or os.path.basename(argv[0]) != "conmon":
            continue
        with contextlib.suppress(OSError):
            if _stat_fields(pid)[0] in ("Z", "X"):
                continue
            cids = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--cid")}
            if cids & ids:
                found.append(pid)
    return found


def _cgroup_dirs(cid: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/{CGROUP_PARENT}/{cid}")


def _force_cleanup(state_dir: Path, cid: str) -> None:
    subprocess.run(
        [RUNC, "--root", str(state_dir / "runc"), "delete", "--force", cid],
        capture_output=True,
        timeout=60,
    )
    for pid in _live_conmons({cid}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for d in _cgroup_dirs(cid):
        with contextlib.suppress(OSError):
            os.rmdir(d)


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    live = _live_conmons(_ALL_IDS)
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    left = [d for cid in _ALL_IDS for d in _cgroup_dirs(cid)]
    for d in glob.glob(f"/sys/fs/cgroup/*/{CGROUP_PARENT}"):
        with contextlib.suppress(OSError):  # busy if someone else uses it right now
            os.rmdir(d)
    assert not live, f"conmon processes left behind: {live}"
    assert not left, f"cgroups left behind: {left}"


@dataclass
class Env:
    rt: OciRuntime
    tmp: Path
    ids: list[str] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.rt.state_dir

    def new(self, args: list[str], **kwargs: Any) -> tuple[str, Path, Path]:
        """A fresh container ID, its bundle and its log path."""
        cid = f"t{uuid.uuid4().hex[:12]}"
        self.ids.append(cid)
        _ALL_IDS.add(cid)
        return cid, make_bundle(self.tmp, cid, args, **kwargs), self.tmp / "logs" / f"{cid}.log"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    (tmp_path / "logs").mkdir()
    rt = OciRuntime(runtime_path=RUNC, conmon_path=CONMON, state_dir=tmp_path / "state")
    e = Env(rt, tmp_path)
    try:
        yield e
    finally:
        for cid in e.ids:
            _force_cleanup(rt.state_dir, cid)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def wait_for_log(path: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            content = path.read_text()
            if text in content:
                return content
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never showed up in {path}")
        await asyncio.sleep(0.02)


def parse_log(path: Path) -> list[tuple[str, str, str]]:
    entries = []
    for line in path.read_text().splitlines():
        m = LOG_LINE.fullmatch(line)
        assert m, f"not a CRI log line: {line!r}"
        entries.append((m["stream"], m["tag"], m["msg"]))
    return entries


def assert_no_trace(env: Env, cid: str, bundle: Path) -> None:
    assert not (env.state_dir / "runc" / cid).exists()
    assert not (env.state_dir / "exits" / cid).exists()
    assert not (env.state_dir / "persist" / cid).exists()
    assert not (env.state_dir / "sockets" / cid).is_symlink()
    for name in ("ctl", "winsz", "attach"):
        assert not (bundle / name).exists()
    assert _live_conmons({cid}) == []
    assert _cgroup_dirs(cid) == []


# -- lifecycle ---------------------------------------------------------------------------


def test_exit_code_and_cri_log(env: Env) -> None:
    script = "echo out; echo err >&2; printf partial; exit 3"
    cid, bundle, log = env.new(["sh", "-c", script])

    async def body() -> None:
        pid = await env.rt.create(cid, bundle, log)
        assert pid > 0
        state = await env.rt.state(cid)
        assert state is not None
        assert state["status"] == "created" and state["pid"] == pid
        assert env.rt.exit_status(cid) is None
        began = time.time_ns()
        await env.rt.start(cid)
        status = await env.rt.wait_exit(cid, 10)
        assert status is not None
        assert status.exit_code == 3 and not status.oom_killed
        # The exit file's mtime has the kernel's coarse clock: allow some slack.
        assert began - 10**9 <= status.finished_at <= time.time_ns() + 10**9
        state = await env.rt.state(cid)
        assert state is not None and state["status"] == "stopped"
        await env.rt.delete(cid)

    run(body())
    entries = parse_log(log)
    assert ("stdout", "F", "out") in entries
    assert ("stderr", "F", "err") in entries
    # Output without a final newline is written with the partial tag.
    assert ("stdout", "P", "partial") in entries


def test_wait_exit_times_out_while_running(env: Env) -> None:
    cid, bundle, log = env.new(["sleep", "1000"])

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        await env.rt.start(cid)
        began = time.monotonic()
        assert await env.rt.wait_exit(cid, 0.3) is None
        assert 0.3 <= time.monotonic() - began < 3
        await env.rt.delete(cid)

    run(body())


def test_stop_escalates_to_sigkill_after_timeout(env: Env) -> None:
    script = 'trap "echo got-term" TERM; echo ready; while true; do sleep 0.1; done'
    cid, bundle, log = env.new(["sh", "-c", script])

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        await env.rt.start(cid)
        await wait_for_log(log, "ready")
        began = time.monotonic()
        await env.rt.stop(cid, 1.0)
        took = time.monotonic() - began
        assert 1.0 <= took < 6.0
        status = env.rt.exit_status(cid)
        assert status is not None and status.exit_code == 137 and not status.oom_killed
        # noted as the runtime's own SIGKILL, never taken for an OOM kill (systemd driver)
        assert (env.state_dir / "persist" / cid / KILLED_FILE).exists()
        await env.rt.delete(cid)

    run(body())
    assert ("stdout", "F", "got-term") in parse_log(log)


def test_stop_returns_promptly_when_the_process_exits(env: Env) -> None:
    script = 'trap "exit 0" TERM; echo ready; while true; do sleep 0.1; done'
    cid, bundle, log = env.new(["sh", "-c", script])

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        await env.rt.start(cid)
        await wait_for_log(log, "ready")
        began = time.monotonic()
        await env.rt.stop(cid, 10.0)
        assert time.monotonic() - began < 3.0
        status = env.rt.exit_status(cid)
        assert status is not None and status.exit_code == 0
        # Signalling or stopping a stopped container is no error.
        await env.rt.kill(cid, signal.SIGTERM)
        await env.rt.kill(cid, signal.SIGKILL, all_processes=True)
        await env.rt.stop(cid, 1.0)
        await env.rt.delete(cid)

    run(body())


def test_stop_created_container(env: Env) -> None:
    cid, bundle, log = env.new(["sleep", "1000"])

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        began = time.monotonic()
        await env.rt.stop(cid, 30.0)
        assert time.monotonic() - began < 5.0
        status = env.rt.exit_status(cid)
        assert status is not None and status.exit_code == 137
        await env.rt.delete(cid)

    run(body())


def test_delete_is_idempotent_and_leaves_nothing(env: Env) -> None:
    cid, bundle, log = env.new(["sleep", "1000"])

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        await env.rt.start(cid)
        conmon = env.rt.conmon_pid(cid)
        assert conmon is not None
        await env.rt.delete(cid)  # a running container: killed on the way
        await env.rt.delete(cid)
        assert await env.rt.state(cid) is None
        assert env.rt.exit_status(cid) is None
        assert env.rt.conmon_pid(cid) is None
        with pytest.raises(NotFoundError):
            await env.rt.kill(cid, signal.SIGKILL)
        with pytest.raises(NotFoundError):
            await env.rt.start(cid)
        await env.rt.delete("never-created")

    run(body())
    assert_no_trace(env, cid, bundle)


def test_duplicate_and_invalid_ids(env: Env) -> None:
    cid, bundle, log = env.new(["sleep", "1000"])

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        with pytest.raises(AlreadyExistsError):
            await env.rt.create(cid, bundle, log)
        state = await env.rt.state(cid)
        assert state is not None and state["status"] == "created"
        for bad in ("../x", "", "a/b", "-x"):
            with pytest.raises(InvalidArgumentError):
                await env.rt.create(bad, bundle, log)
        await env.rt.delete(cid)

    run(body())


# -- exec ----------------------------------------------------------------------------------


def test_exec_sync(env: Env) -> None:
    cid, bundle, log = env.new(["sleep", "1000"], env=["FOO=bar"])

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        await env.rt.start(cid)
        rt = env.rt

        r = await rt.exec_sync(cid, ["sh", "-c", "echo $FOO; echo e >&2; exit 5"], timeout=10)
        assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (5, b"bar\n", b"e\n", False)

        r = await rt.exec_sync(
            cid, ["sh", "-c", "echo $FOO; pwd"], timeout=10, env=["FOO=baz"], cwd="/bin"
        )
        assert (r.exit_code, r.stdout) == (0, b"baz\n/bin\n")

        r = await rt.exec_sync(cid, ["id", "-u"], timeout=None)
        assert (r.exit_code, r.stdout) == (0, b"0\n")

        r = await rt.exec_sync(cid, ["sh", "-c", "head -c 3000000 /dev/zero"], timeout=10)
        assert r.exit_code == 0 and r.stdout == bytes(3000000)

        # A background child keeping the pipes open does not hold up the result.
        began = time.monotonic()
        r = await rt.exec_sync(cid, ["sh", "-c", "sleep 30 & echo bg"], timeout=10)
        assert (r.exit_code, r.stdout) == (0, b"bg\n")
        assert time.monotonic() - began < 5

        r = await rt.exec_sync(cid, ["sh", "-c", "tty; echo hi"], timeout=10, tty=True)
        assert r.exit_code == 0
        assert b"/dev/pts/" in r.stdout and b"hi" in r.stdout

        for missing in ("/nope", "nope"):
            r = await rt.exec_sync(cid, [missing], timeout=10)
            assert r.exit_code == 127 and not r.timed_out
            assert missing.encode() in r.stderr

        with pytest.raises(InvalidArgumentError):
            await rt.exec_sync(cid, [], timeout=10)
        with pytest.raises(NotFoundError):
            await rt.exec_sync("t-unknown", ["true"], timeout=10)

        await rt.delete(cid)

    run(body())


def test_exec_sync_timeout_kills_the_process(env: Env) -> None:
    cid, bundle, log = env.new(["sleep", "1000"])

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        await env.rt.start(cid)
        began = time.monotonic()
        r = await env.rt.exec_sync(cid, ["sh", "-c", "echo before; sleep 30"], timeout=0.5)
        assert r.timed_out and r.exit_code == -1
        assert r.stdout == b"before\n"
        assert 0.5 <= time.monotonic() - began < 5
        # Only the container's init is left in its cgroup.
        procs = Path(f"/sys/fs/cgroup/pids/{CGROUP_PARENT}/{cid}/cgroup.procs")
        deadline = time.monotonic() + 5
        while len(procs.read_text().split()) != 1:
            assert time.monotonic() < deadline, procs.read_text()
            await asyncio.sleep(0.05)

        await env.rt.stop(cid, 0)
        with pytest.raises(FailedPreconditionError):
            await env.rt.exec_sync(cid, ["true"], timeout=10)
        await env.rt.delete(cid)

    run(body())


# -- resources -----------------------------------------------------------------------------


def test_update_memory_limit(env: Env) -> None:
    cid, bundle, log = env.new(["sleep", "1000"])
    limit = Path(f"/sys/fs/cgroup/memory/{CGROUP_PARENT}/{cid}/memory.limit_in_bytes")

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        await env.rt.start(cid)
        await env.rt.update(cid, {"memory": {"limit": 64 * MIB}})
        assert int(limit.read_text()) == 64 * MIB
        await env.rt.update(cid, {"memory": {"limit": 96 * MIB}})
        assert int(limit.read_text()) == 96 * MIB
        with pytest.raises(FailedPreconditionError, match="unmarshal"):
            await env.rt.update(cid, {"memory": {"limit": "lots"}})
        await env.rt.delete(cid)

    run(body())


def test_oom_kill_is_detected(env: Env) -> None:
    cid, bundle, log = env.new(["sh", "-c", "x=a; while true; do x=$x$x; done"], memory=8 * MIB)

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        await env.rt.start(cid)
        status = await env.rt.wait_exit(cid, 30)
        assert status is not None
        assert status.exit_code == 137 and status.oom_killed
        # Without conmon's oom file the cgroup's own counter still tells (until delete).
        (env.state_dir / "persist" / cid / "oom").unlink()
        status = env.rt.exit_status(cid)
        assert status is not None and status.oom_killed
        await env.rt.delete(cid)

    run(body())


# -- conmon --------------------------------------------------------------------------------

_DAEMON = """
import asyncio, os, signal, sys
from pathlib import Path
from cripy.oci.runtime import OciRuntime

async def main() -> None:
    runc, conmon, state, cid, bundle, log = sys.argv[1:]
    rt = OciRuntime(runtime_path=runc, conmon_path=conmon, state_dir=Path(state))
    pid = await rt.create(cid, Path(bundle), Path(log))
    await rt.start(cid)
    print(pid, rt.conmon_pid(cid), flush=True)

asyncio.run(main())
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_container_outlives_a_killed_daemon(env: Env) -> None:
    cid, bundle, log = env.new(["sh", "-c", "while true; do echo tick; sleep 0.1; done"])
    args = [RUNC, CONMON, str(env.state_dir), cid, str(bundle), str(log)]
    daemon = subprocess.run(
        [sys.executable, "-c", _DAEMON, *args],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert daemon.returncode == -signal.SIGKILL, daemon.stderr.decode()
    pid, conmon = map(int, daemon.stdout.split())

    # conmon is nobody's child here: it runs in a session of its own, with no stdio of ours.
    state, ppid, _pgrp, session = _stat_fields(conmon)[:4]
    assert state not in ("Z", "X")
    assert int(ppid) not in (os.getpid(), 0)
    assert int(session) == conmon
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{conmon}/fd/{fd}") == "/dev/null"

    async def body() -> None:
        rt = OciRuntime(runtime_path=RUNC, conmon_path=CONMON, state_dir=env.state_dir)
        state = await rt.state(cid)
        assert state is not None and state["status"] == "running" and state["pid"] == pid
        assert rt.conmon_pid(cid) == conmon
        # ... and conmon still logs.
        size = log.stat().st_size
        await asyncio.sleep(0.3)
        assert log.stat().st_size > size
        await rt.stop(cid, 0)
        status = rt.exit_status(cid)
        assert status is not None and status.exit_code == 137
        await rt.delete(cid)

    run(body())
    assert_no_trace(env, cid, bundle)


def test_reopen_log(env: Env) -> None:
    script = "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.05; done"
    cid, bundle, log = env.new(["sh", "-c", script])
    rotated = log.with_name(log.name + ".1")

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        await env.rt.start(cid)
        await wait_for_log(log, "line3")
        log.rename(rotated)
        await env.rt.reopen_log(cid)
        assert log.exists()
        await wait_for_log(log, "line")
        size = rotated.stat().st_size
        await asyncio.sleep(0.3)
        assert rotated.stat().st_size == size  # conmon no longer writes the old file
        assert all(tag == "F" for _, tag, _ in parse_log(log))
        await env.rt.stop(cid, 0)
        with pytest.raises(FailedPreconditionError):
            await env.rt.reopen_log(cid)
        await env.rt.delete(cid)

    run(body())
    # Together the two files hold an unbroken sequence of lines.
    lines = [msg for _, _, msg in parse_log(rotated) + parse_log(log)]
    numbers = [int(msg.removeprefix("line")) for msg in lines]
    assert numbers == list(range(len(numbers)))


def test_tty_container(env: Env) -> None:
    cid, bundle, log = env.new(["sh", "-c", "tty; echo hello"], tty=True)

    async def body() -> None:
        await env.rt.create(cid, bundle, log, tty=True)
        await env.rt.start(cid)
        status = await env.rt.wait_exit(cid, 10)
        assert status is not None and status.exit_code == 0
        await env.rt.delete(cid)

    run(body())
    messages = [msg.rstrip("\r") for stream, _, msg in parse_log(log) if stream == "stdout"]
    assert "hello" in messages
    assert any(m.startswith("/dev/pts/") for m in messages)


def test_stdin_once_closes_stdin_after_the_first_attach(env: Env) -> None:
    cid, bundle, log = env.new(["cat"])

    async def body() -> None:
        await env.rt.create(cid, bundle, log, stdin=True, stdin_once=True)
        await env.rt.start(cid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(str(env.state_dir / "sockets" / cid / "attach"))
            sock.send(b"hello\n")
            await wait_for_log(log, "hello")
        # The attach session ended, so conmon closed cat's stdin and cat is done.
        status = await env.rt.wait_exit(cid, 10)
        assert status is not None and status.exit_code == 0
        await env.rt.delete(cid)

    run(body())
    assert ("stdout", "F", "hello") in parse_log(log)


def test_log_size_max(env: Env) -> None:
    script = "i=0; while [ $i -lt 3000 ]; do echo line$i; i=$((i+1)); done"
    cid, bundle, log = env.new(["sh", "-c", script])

    async def body() -> None:
        await env.rt.create(cid, bundle, log, log_size_max=4096)
        await env.rt.start(cid)
        assert await env.rt.wait_exit(cid, 10) is not None
        await env.rt.delete(cid)

    run(body())
    assert log.stat().st_size <= 4096
    assert ("stdout", "F", "line2999") in parse_log(log)


def test_exit_is_recorded_when_conmon_died(env: Env) -> None:
    cid, bundle, log = env.new(["sleep", "1000"])

    async def body() -> None:
        await env.rt.create(cid, bundle, log)
        await env.rt.start(cid)
        conmon = env.rt.conmon_pid(cid)
        assert conmon is not None
        os.kill(conmon, signal.SIGKILL)
        # Still running, only without its monitor.
        assert await env.rt.wait_exit(cid, 1.5) is None
        await env.rt.stop(cid, 0)
        status = env.rt.exit_status(cid)
        assert status is not None and status.exit_code == 255
        await env.rt.delete(cid)

    run(body())
    assert_no_trace(env, cid, bundle)


# -- failures ------------------------------------------------------------------------------


def test_create_fails_for_a_missing_binary(env: Env) -> None:
    cid, bundle, log = env.new(["/nope"])

    async def body() -> None:
        with pytest.raises(FailedPreconditionError) as err:
            await env.rt.create(cid, bundle, log)
        assert "/nope" in str(err.value)
        assert "no such file or directory" in str(err.value)
        assert await env.rt.state(cid) is None

    run(body())
    assert_no_trace(env, cid, bundle)


def test_create_fails_for_an_invalid_config(env: Env) -> None:
    cid, bundle, log = env.new(["true"])
    (bundle / "config.json").write_text("not json")

    async def body() -> None:
        with pytest.raises(FailedPreconditionError, match="invalid character"):
            await env.rt.create(cid, bundle, log)

    run(body())
    assert_no_trace(env, cid, bundle)


def test_create_fails_for_a_missing_log_directory(env: Env) -> None:
    cid, bundle, _ = env.new(["true"])
    log = env.tmp / "no-such-dir" / "c.log"

    async def body() -> None:
        with pytest.raises(FailedPreconditionError, match="conmon"):
            await env.rt.create(cid, bundle, log)

    run(body())
    assert_no_trace(env, cid, bundle)

"""Run OCI containers with runc, each under its own conmon.

conmon runs `runc create` for us, then stays with the container for its whole life: it
holds the container's stdio, writes the CRI log file, serves the attach socket, and
records the exit code (and any OOM kill) when the container's init process dies. It
double-forks and calls setsid, so it is no child of the daemon and the container keeps
running when the daemon exits or is killed.

Several runtime handlers (runc, crun) can share one OciRuntime: each container is run
with the handler given at its create, which its persist record keeps, so every later
call (and a restarted daemon) finds the same binary and state directory again.

Layout under `state_dir`:

    runc/              runc's own state (`runc --root`); other handlers' roots beside it
    exits/<id>         conmon's exit file: the exit code; its mtime is the finish time
    sockets/<id>       conmon's link to the bundle, whose `attach` socket it serves
    persist/<id>/      conmon's persist dir: conmon.pid, pidfile (the container's pid),
                       exit, oom, runc.log (runc create's own JSON log), conmon.stderr,
                       and cripy.json (the bundle, log path, handler and memory cgroup of
                       the container)
    exec/              process specs and pid files of exec_sync calls in flight

conmon also leaves `ctl` and `winsz` fifos and the `attach` socket in the bundle; `delete`
removes them with everything above.

exec_sync runs a short-lived conmon too (`conmon --exec`, which runs `runc exec --detach`
and reports the command's exit code), so its result does not wait for children the
command leaves behind; only a tty exec runs `runc exec` in the foreground.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cripy.errors import (
    AlreadyExistsError,
    CripyError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from cripy.fsutil import atomic_write, atomic_write_json, remove_tree
from cripy.oci.cgroups import CgroupDriver, CgroupfsDriver
from cripy.oci.handlers import RuntimeHandler, select

log = logging.getLogger(__name__)

#: IDs become file names here and in runc's state, so keep them to a safe alphabet.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CONMON_LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error")

#: conmon's control-fifo message that makes it reopen its log files ("type height width").
_REOPEN_LOGS = b"2 0 0\n"
#: conmon's control-fifo message type of a terminal resize, and the largest size it takes.
_CTL_RESIZE = 1
_CTL_MAX_SIZE = 1000

#: The largest gRPC message the kubelet takes (and the daemon sends): 16 MiB.
GRPC_MESSAGE_LIMIT = 16 << 20
#: What an ExecSyncResponse adds to its output: two field tags and lengths, the exit code.
EXEC_REPLY_FRAMING = 32
#: exec_sync keeps at most this much of stdout and stderr together, first come first kept
#: (CRI-O caps the two at 16 MiB together too); the rest is read and dropped, so that the
#: reply always fits one gRPC message.
EXEC_OUTPUT_LIMIT = GRPC_MESSAGE_LIMIT - EXEC_REPLY_FRAMING

#: The exit code recorded for a container whose conmon died before writing one.
UNKNOWN_EXIT_CODE = 255
#: wait_exit looks at the exit file again after this many seconds, then twice as long
#: each time, up to EXIT_POLL_MAX: an exit after SIGKILL is noticed within a few ms.
EXIT_POLL_FIRST = 0.001
EXIT_POLL_MAX = 0.1
#: Left in the persist dir when StopContainer sends SIGKILL itself.
KILLED_FILE = "killed"


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int
    finished_at: int  # ns since the epoch
    oom_killed: bool


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool


class OciRuntime:
    """A runc/crun driver; every method takes the container ID runc knows the container by.

    Without `handlers`, the single handler "runc" is `runtime_path` and `conmon_path`.
    """

    #: Upper bound for one runc command (state, start, kill, delete, update).
    command_timeout = 60.0
    #: Upper bound for conmon to answer with the pid of a created container.
    create_timeout = 120.0
    #: How long an exit may take to be recorded after SIGKILL.
    kill_wait = 10.0
    #: How long conmon may take to finish (flush logs, write the exit file) on its own.
    conmon_grace = 5.0

    def __init__(
        self,
        *,
        state_dir: Path,
        runtime_path: str = "runc",
        conmon_path: str = "conmon",
        log_level: str = "info",
        handlers: Mapping[str, RuntimeHandler] | None = None,
        default_handler: str = "runc",
        cgroups: CgroupDriver | None = None,
    ) -> None:
        level = log_level.lower()
        if level not in _CONMON_LOG_LEVELS:
            raise InvalidArgumentError(f"unknown log level {log_level!r}")
        self.state_dir = Path(state_dir).absolute()
        self.log_level = level
        if handlers is None:
            handlers = {default_handler: RuntimeHandler(
                default_handler, runtime_path, self.state_dir / "runc", conmon_path)}
        self.handlers = dict(handlers)
        self.default_handler = default_handler
        self.cgroups: CgroupDriver = cgroups or CgroupfsDriver()
        self._exits = self.state_dir / "exits"
        self._sockets = self.state_dir / "sockets"
        self._persist = self.state_dir / "persist"
        self._exec_dir = self.state_dir / "exec"
        roots = [h.root for h in self.handlers.values()]
        for d in (*roots, self._exits, self._sockets, self._persist, self._exec_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._creating: set[str] = set()  # IDs with a create in flight
        self._handler_of: dict[str, RuntimeHandler] = {}  # container ID -> its handler

    @property
    def exit_dir(self) -> Path:
        """Where conmon writes each container's exit file, named by its ID."""
        return self._exits

    @property
    def runtime_path(self) -> str:
        """The default handler's runtime binary."""
        return self.handlers[self.default_handler].runtime_path

    @property
    def conmon_path(self) -> str:
        return self.handlers[self.default_handler].monitor_path

    def handler(self, name: str) -> RuntimeHandler:
        """The handler a pod's runtime_handler names ("" is the default): unknown ones are
        an InvalidArgumentError, ones this host cannot run a FailedPreconditionError."""
        handler = select(self.handlers, self.default_handler, name)
        handler.check_usable()
        return handler

    def container_cgroup(self, cgroup_parent: str, container_id: str, handler: str) -> str:
        """Where the cgroup driver and `handler` (a pod's runtime_handler) put the
        container's processes: a path below the cgroup root. No I/O."""
        known = self.handlers.get(handler or self.default_handler)
        return self.cgroups.container_dir(cgroup_parent, container_id,
                                          known.flavor if known is not None else "")

    def handler_of(self, container_id: str) -> RuntimeHandler:
        """The handler a container was created with (the default for unknown IDs)."""
        cid = _check_id(container_id)
        found = self._handler_of.get(cid)
        if found is not None:
            return found
        record = self._record(cid)
        name = record.get("handler") if record is not None else None
        if name is None:
            # No record: the handler whose state directory knows the container.
            name = next((n for n, h in self.handlers.items() if (h.root / cid).exists()),
                        self.default_handler)
        found = self.handlers.get(name)
        if found is None:
            raise FailedPreconditionError(
                f"container {cid} was made by runtime handler {name!r}, which is no longer "
                f"configured (configured: {', '.join(sorted(self.handlers))})")
        if record is not None:
            self._handler_of[cid] = found
        return found

    # -- lifecycle -----------------------------------------------------------------------

    async def create(
        self,
        container_id: str,
        bundle: Path,
        log_path: Path,
        *,
        tty: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
        log_size_max: int = -1,
        handler: str = "",
        cgroup_parent: str = "",
        restore_from: Path | None = None,
    ) -> int:
        """Create the container under a new conmon; returns the container's pid.

        The container is left in runc's "created" state: its process waits for `start`.
        `handler` names the runtime handler ("" is the default); `cgroup_parent` is the
        pod's, for the cgroup driver to place conmon. With `restore_from` (a directory of
        CRIU images) conmon runs `runc restore --detach` instead: the container is running
        on return, and CRIU's restore.log is in the bundle.
        """
        cid = _check_id(container_id)
        chosen = self.handler(handler)
        bundle = Path(bundle).absolute()
        log_path = Path(log_path).absolute()
        if cid in self._creating or any((h.root / cid).exists() for h in self.handlers.values()):
            raise AlreadyExistsError(f"container {cid} already exists")
        self._creating.add(cid)
        self._handler_of[cid] = chosen
        try:
            return await self._create(cid, bundle, log_path, tty, stdin, stdin_once, log_size_max,
                                      chosen, cgroup_parent, restore_from)
        finally:
            self._creating.discard(cid)

    async def _create(
        self,
        cid: str,
        bundle: Path,
        log_path: Path,
        tty: bool,
        stdin: bool,
        stdin_once: bool,
        log_size_max: int,
        handler: RuntimeHandler,
        cgroup_parent: str,
        restore_from: Path | None = None,
    ) -> int:
        persist = self._persist / cid
        record: dict[str, Any] = {"bundle": str(bundle), "log_path": str(log_path),
                                  "handler": handler.name}

        def prepare() -> None:  # file system work: in a thread
            # Whatever is here belongs to an earlier container of this ID that runc forgot.
            remove_tree(persist)
            with contextlib.suppress(FileNotFoundError):
                (self._exits / cid).unlink()
            persist.mkdir(mode=0o700)
            atomic_write_json(persist / "cripy.json", record)

        await asyncio.to_thread(prepare)

        argv = [
            *self.cgroups.monitor_prefix(cgroup_parent, cid),
            handler.monitor_path,
            "--api-version", "1",
            "-c", cid,
            "-u", cid,
            "-n", cid,
            "-r", handler.runtime_path,
            "-b", str(bundle),
            "-p", str(persist / "pidfile"),
            "-P", str(persist / "conmon.pid"),
            "-l", f"k8s-file:{log_path}",
            "--exit-dir", str(self._exits),
            "--persist-dir", str(persist),
            "--socket-dir-path", str(self._sockets),
            *self._runtime_args(handler),
            "--runtime-arg", f"--log={persist / 'runc.log'}",
            "--log-level", self.log_level,
        ]  # fmt: skip
        if tty:
            argv.append("--terminal")
        if stdin:
            argv.append("--stdin")
            if not stdin_once:
                argv.append("--leave-stdin-open")
        if log_size_max > 0:
            argv += ["--log-size-max", str(log_size_max)]
        if restore_from is not None:
            argv += ["--restore", str(restore_from)]

        try:
            pid = await self._spawn_conmon(cid, argv, persist, handler)
        except BaseException:
            await self._undo_create(cid, bundle)
            raise

        def note_cgroup() -> None:  # /proc and mountinfo reads, a file write: in a thread
            cgroup = _memory_cgroup_dir(pid)
            if cgroup is None:
                return
            record["memory_cgroup"] = cgroup
            # systemd removes a scope's cgroup (and its OOM counter) as soon as it is
            # empty; the pod's cgroup above it stays and counts its descendants' OOM kills.
            pod = None
            with contextlib.suppress(InvalidArgumentError):  # the spec checked it already
                pod = _pod_memory_dir(Path(cgroup), self.cgroups.pod_dir(cgroup_parent))
            if pod is not None:
                record["pod_cgroup"] = str(pod)
                record["pod_oom_kills"] = _oom_kill_count(pod)
            atomic_write_json(persist / "cripy.json", record)

        await asyncio.to_thread(note_cgroup)
        return pid

    async def start(self, container_id: str) -> None:
        cid = _check_id(container_id)
        rc, _, err = await self._runc("start", cid)
        if rc != 0:
            raise _runc_error(f"runc start {cid}", err)

    async def kill(self, container_id: str, signal: int, *, all_processes: bool = False) -> bool:
        """Send `signal` to the container's init (or all its processes); a container that
        has already stopped is not an error (False: nothing was signalled)."""
        cid = _check_id(container_id)
        args = ["kill", *(["--all"] if all_processes else []), cid, str(int(signal))]
        rc, _, err = await self._runc(*args, cid=cid)
        if rc != 0:
            if "not running" in runc_message(err):
                return False
            raise _runc_error(f"runc kill {cid}", err)
        return True

    async def stop(
        self, container_id: str, timeout: float, stop_signal: int = signal.SIGTERM
    ) -> None:
        """Send `stop_signal`, wait up to `timeout` seconds for the exit, then SIGKILL every
        process of the container and wait for that. On return the exit is recorded."""
        cid = _check_id(container_id)
        if self.exit_status(cid) is not None:
            return
        if timeout <= 0:
            await self._kill_now(cid)
            return
        state = await self.state(cid)
        if state is None:
            return
        status = state.get("status")
        if status == "stopped":
            await self._wait_after_kill(cid)
            return
        # A created container's process is still runc's init, which ignores polite signals.
        if status != "created" and timeout > 0:
            await self.kill(cid, stop_signal)
            if await self.wait_exit(cid, timeout) is not None:
                return
        # Noted first: this SIGKILL is ours, not the OOM killer's (see _oom_killed).
        await asyncio.to_thread(_touch, self._persist / cid / KILLED_FILE)
        await self.kill(cid, signal.SIGKILL, all_processes=True)
        await self._wait_after_kill(cid)

    async def _kill_now(self, cid: str) -> None:
        """SIGKILL every process of the container and wait for the exit, with no `runc
        state` first: whatever runc's state (created, running, stopped), the kill does
        what is needed and tells a container that stopped on its own, or is unknown."""
        killed = self._persist / cid / KILLED_FILE
        # Noted first: this SIGKILL is ours, not the OOM killer's (see _oom_killed).
        await asyncio.to_thread(_touch, killed)
        try:
            signalled = await self.kill(cid, signal.SIGKILL, all_processes=True)
        except NotFoundError:  # runc does not know it: nothing to stop
            signalled = False
            known = False
        except FailedPreconditionError:
            # A runtime whose refusal to kill a stopped container reads otherwise.
            state = await self.state(cid)
            if state is None or state.get("status") != "stopped":
                await asyncio.to_thread(_unlink, killed)
                raise
            signalled, known = False, True
        else:
            known = True
        if not signalled:  # it stopped on its own (or never was): its end is not ours
            await asyncio.to_thread(_unlink, killed)
        if known:
            await self._wait_after_kill(cid)

    async def delete(self, container_id: str) -> None:
        """Forget the container: `runc delete --force` (which kills it if need be), then
        remove its exit file and conmon's leftovers. Deleting twice is fine."""
        cid = _check_id(container_id)
        rc, _, err = await self._runc("delete", "--force", cid)
        if rc != 0 and not _is_not_found(runc_message(err)):
            raise _runc_error(f"runc delete {cid}", err)
        record = await asyncio.to_thread(self._record, cid)
        await self._finish_conmon(cid)
        await self.cgroups.cleanup(cid)
        await asyncio.to_thread(self._remove_leftovers, cid,
                                Path(record["bundle"]) if record else None)
        self._handler_of.pop(cid, None)

    async def state(self, container_id: str) -> dict[str, Any] | None:
        """`runc state` as JSON; None when runc does not know the container."""
        cid = _check_id(container_id)
        rc, out, err = await self._runc("state", cid)
        if rc != 0:
            if _is_not_found(runc_message(err)):
                return None
            raise _runc_error(f"runc state {cid}", err)
        try:
            value = json.loads(out)
        except ValueError as e:
            raise UnavailableError(f"runc state {cid}: unreadable output: {e}") from None
        if not isinstance(value, dict):
            raise UnavailableError(f"runc state {cid}: unreadable output")
        return value

    def exit_status(self, container_id: str) -> ExitStatus | None:
        """The recorded exit of the container; None while it runs (or is unknown)."""
        cid = _check_id(container_id)
        for path in (self._exits / cid, self._persist / cid / "exit"):
            try:
                with open(path, "rb") as f:
                    text = f.read()
                    finished_at = os.fstat(f.fileno()).st_mtime_ns
            except FileNotFoundError:
                continue
            try:
                code = int(text.strip())
            except ValueError:
                log.warning("exit file %s holds %r, not an exit code", path, text[:40])
                code = UNKNOWN_EXIT_CODE
            return ExitStatus(code, finished_at, self._oom_killed(cid, code))
        return None

    async def wait_exit(self, container_id: str, timeout: float | None) -> ExitStatus | None:
        """Wait until the container's exit is recorded; None if `timeout` runs out first."""
        cid = _check_id(container_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(timeout, 0.0)
        delay = EXIT_POLL_FIRST
        next_check = loop.time() + 1.0
        while True:
            status = self.exit_status(cid)
            if status is not None:
                return status
            now = loop.time()
            if now >= next_check:
                # conmon writes the exit file; if it is gone, nobody ever will.
                next_check = now + 1.0
                status = await self._exit_without_conmon(cid)
                if status is not None:
                    return status
            if deadline is not None and now >= deadline:
                return None
            pause = delay if deadline is None else min(delay, max(deadline - now, 0.0))
            await asyncio.sleep(pause)
            delay = min(delay * 2, EXIT_POLL_MAX)

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """`runc update --resources -` with an OCI linux.resources object."""
        cid = _check_id(container_id)
        data = json.dumps(resources).encode()
        rc, _, err = await self._runc("update", "--resources", "-", cid, stdin=data)
        if rc != 0:
            raise _runc_error(f"runc update {cid}", err)

    async def pause(self, container_id: str) -> None:
        """Freeze every process of the container (`runc pause`)."""
        cid = _check_id(container_id)
        rc, _, err = await self._runc("pause", cid)
        if rc != 0:
            raise _runc_error(f"runc pause {cid}", err)

    async def resume(self, container_id: str) -> None:
        """Thaw a paused container (`runc resume`)."""
        cid = _check_id(container_id)
        rc, _, err = await self._runc("resume", cid)
        if rc != 0:
            raise _runc_error(f"runc resume {cid}", err)

    async def exec_sync(
        self,
        container_id: str,
        args: list[str],
        *,
        timeout: float | None,
        env: list[str] | None = None,
        cwd: str | None = None,
        tty: bool = False,
    ) -> ExecResult:
        """Run `args` in the container and collect its output.

        The process gets the container's user, environment, capabilities and working
        directory, overridden by `env` and `cwd`. A `timeout` of None or <= 0 means none;
        when it runs out the process group is killed and the result has exit code -1.
        A command that cannot be started gives exit code 127 (not found) or 126 with
        runc's message in stderr.

        Without a tty, a conmon runs `runc exec --detach` and reports the exit code as
        soon as the command exits, even if children it left behind still hold its output
        open (as CRI-O does; a foreground `runc exec` would wait for them). With a tty,
        runc runs in the foreground on a pty and stdout carries both streams.
        """
        cid = _check_id(container_id)
        if not args:
            raise InvalidArgumentError("exec needs a command")
        bundle = await self._bundle(cid)
        limit = timeout if timeout is not None and timeout > 0 else None

        def prepare() -> Path:  # file reads and writes: in a thread
            process = exec_process(load_config(bundle), args, env, cwd, tty)
            workdir = Path(tempfile.mkdtemp(prefix=f"{cid}.", dir=self._exec_dir))
            (workdir / "process.json").write_text(json.dumps(process))
            return workdir

        workdir = await asyncio.to_thread(prepare)
        try:
            spec = workdir / "process.json"
            if tty:
                return await self._exec_tty(cid, workdir, spec, limit)
            return await self._exec_conmon(cid, workdir, spec, limit)
        finally:
            await asyncio.to_thread(remove_tree, workdir)

    async def reopen_log(self, container_id: str) -> None:
        """Ask conmon to reopen the container's log file (after it was renamed away)."""
        cid = _check_id(container_id)
        record = await asyncio.to_thread(self._record, cid)
        if record is None:
            raise NotFoundError(f"container {cid} not found")
        log_path = Path(record["log_path"])
        self._write_control(cid, Path(record["bundle"]), _REOPEN_LOGS)
        # conmon acts on the message in its own time; wait until the file is there again.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.conmon_grace
        while not log_path.exists():
            if loop.time() >= deadline or not self._conmon_alive(cid):
                raise UnavailableError(f"conmon of container {cid} did not reopen {log_path}")
            await asyncio.sleep(0.01)

    async def bundle_of(self, container_id: str) -> Path:
        """The bundle the container was created from (conmon's sockets and fifos are there)."""
        return await self._bundle(_check_id(container_id))

    async def resize(self, container_id: str, height: int, width: int) -> None:
        """Give the container's terminal a new size (through conmon's control fifo)."""
        cid = _check_id(container_id)
        height = min(max(height, 0), _CTL_MAX_SIZE)
        width = min(max(width, 0), _CTL_MAX_SIZE)
        bundle = await self._bundle(cid)
        self._write_control(cid, bundle, f"{_CTL_RESIZE} {height} {width}\n".encode())

    def _write_control(self, cid: str, bundle: Path, message: bytes) -> None:
        """One message to conmon's control fifo ("type height width\\n")."""
        ctl = bundle / "ctl"
        try:
            if not stat.S_ISFIFO(os.lstat(ctl).st_mode):
                raise FailedPreconditionError(f"{ctl} is not conmon's control fifo")
            # Non-blocking: opening a fifo nobody reads fails with ENXIO instead of hanging.
            fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FailedPreconditionError(
                f"conmon of container {cid} has no control fifo"
            ) from None
        except OSError as e:
            raise FailedPreconditionError(
                f"conmon of container {cid} is not running ({e.strerror})"
            ) from None
        try:
            os.write(fd, message)
        finally:
            os.close(fd)

    def conmon_pid(self, container_id: str) -> int | None:
        """The pid of the container's conmon while it runs."""
        cid = _check_id(container_id)
        pid = self._read_conmon_pid(cid)
        return pid if pid is not None and _is_conmon_of(pid, cid) else None

    # -- helpers ------------------------------------------------------------------------

    def runc_argv(self, *args: str, container_id: str | None = None) -> list[str]:
        """A runtime command line for `container_id`'s handler (without one: the
        default handler's): binary, global flags, then `args`."""
        handler = (self.handler_of(container_id) if container_id is not None
                   else self.handlers[self.default_handler])
        return [handler.runtime_path, "--root", str(handler.root), "--log-format", "json",
                *self.cgroups.runtime_args, *args]

    def _runtime_args(self, handler: RuntimeHandler) -> list[str]:
        """conmon's --runtime-arg flags: the runtime's global flags."""
        flags = [f"--root={handler.root}", "--log-format=json", *self.cgroups.runtime_args]
        return [part for flag in flags for part in ("--runtime-arg", flag)]

    async def _runc(self, *args: str, stdin: bytes | None = None, cid: str | None = None
                    ) -> tuple[int, bytes, bytes]:
        """Run a runtime command for container `cid` (by default the last argument)."""
        cid = cid or args[-1]
        handler = self.handler_of(cid)
        argv = self.runc_argv(*args, container_id=cid)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            raise UnavailableError(f"cannot run {handler.runtime_path}: {e}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.command_timeout)
        except BaseException as e:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            if isinstance(e, TimeoutError):
                raise UnavailableError(
                    f"runc {args[0]} {args[-1]} did not finish within {self.command_timeout:g}s"
                ) from None
            raise
        assert proc.returncode is not None
        return proc.returncode, out, err

    async def _spawn_conmon(self, cid: str, argv: list[str], persist: Path,
                            handler: RuntimeHandler) -> int:
        """Start conmon and wait for its sync-pipe answer: the container pid or runc's error."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        stderr_path = persist / "conmon.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("_OCI_")}
        env["_OCI_SYNCPIPE"] = str(write_fd)
        try:
            with open(stderr_path, "wb") as errfile:
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *argv,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=errfile,
                        pass_fds=(write_fd,),
                        env=env,
                        cwd=persist,  # conmon drops an "oom" file into its working directory
                        start_new_session=True,
                    )
                except OSError as e:
                    raise UnavailableError(
                        f"cannot run conmon {handler.monitor_path}: {e}") from None
            os.close(write_fd)
            write_fd = -1
            # conmon forks, writes the conmon pid file and exits; its child carries on.
            try:
                rc = await asyncio.wait_for(proc.wait(), self.command_timeout)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise
            if rc != 0:
                text = _tail(stderr_path) or f"exit status {rc}"
                raise FailedPreconditionError(f"conmon for container {cid} failed: {text}")
            try:
                line = await _read_line(read_fd, self.create_timeout)
            except TimeoutError:
                raise UnavailableError(
                    f"runc create of container {cid} did not finish within {self.create_timeout:g}s"
                ) from None
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        if not line:
            text = _tail(stderr_path) or "no message"
            raise UnavailableError(f"conmon for container {cid} exited without an answer: {text}")
        try:
            answer = json.loads(line)
            pid = int(answer["data"])
        except (ValueError, KeyError, TypeError):
            raise UnavailableError(
                f"conmon for container {cid} sent an unreadable answer: {line[:200]!r}"
            ) from None
        if pid <= 0:
            message = runc_message(str(answer.get("message", "")).encode())
            if not message:
                message = runc_log_errors(persist / "runc.log") or _tail(stderr_path)
            raise FailedPreconditionError(
                f"runc create of container {cid} failed: {message or 'no error message'}"
            )
        return pid

    async def _undo_create(self, cid: str, bundle: Path) -> None:
        """Leave nothing of a failed create: no conmon, no runc state, no files."""
        try:
            await self._finish_conmon(cid)
            rc, _, err = await self._runc("delete", "--force", cid)
            if rc != 0 and not _is_not_found(runc_message(err)):
                log.warning("cleaning up container %s: %s", cid, runc_message(err))
        except CripyError as e:
            log.warning("cleaning up container %s: %s", cid, e)
        await self.cgroups.cleanup(cid)
        await asyncio.to_thread(self._remove_leftovers, cid, bundle)
        self._handler_of.pop(cid, None)

    async def _finish_conmon(self, cid: str) -> None:
        """Give conmon a moment to finish on its own, then kill it."""
        pid = self.conmon_pid(cid)
        if pid is None:
            return
        if await _wait_gone(pid, self.conmon_grace):
            return
        log.warning("conmon %d of container %s did not exit; killing it", pid, cid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await _wait_gone(pid, 1.0)

    def _remove_leftovers(self, cid: str, bundle: Path | None) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._exits / cid).unlink()
        remove_tree(self._persist / cid)
        link = self._sockets / cid
        if link.is_symlink():
            link.unlink()
        if bundle is not None:
            # Only conmon's fifos and socket: the bundle itself belongs to the caller.
            for name in ("ctl", "winsz", "attach"):
                path = bundle / name
                with contextlib.suppress(FileNotFoundError):
                    mode = os.lstat(path).st_mode
                    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                        path.unlink()

    async def _wait_after_kill(self, cid: str) -> None:
        if await self.wait_exit(cid, self.kill_wait) is None:
            raise UnavailableError(
                f"container {cid} did not exit within {self.kill_wait:g}s of SIGKILL"
            )

    async def _exit_without_conmon(self, cid: str) -> ExitStatus | None:
        """The exit of a container whose conmon died without recording it, if it exited."""
        if self._conmon_alive(cid):
            return None
        status = self.exit_status(cid)  # conmon may have written it just before exiting
        if status is not None:
            return status
        state = await self.state(cid)
        if state is None:
            if not (self._persist / cid).exists():
                raise NotFoundError(f"container {cid} not found")
        elif state.get("status") != "stopped":
            return None  # still running, just without its monitor
        log.warning("conmon of container %s is gone without an exit code", cid)
        atomic_write(self._exits / cid, str(UNKNOWN_EXIT_CODE).encode(), mode=0o644)
        return self.exit_status(cid)

    async def _exec_conmon(
        self, cid: str, workdir: Path, spec: Path, timeout: float | None
    ) -> ExecResult:
        pidfile = workdir / "pid"
        handler = self.handler_of(cid)
        argv = [
            handler.monitor_path,
            "--api-version", "1",
            "-c", cid,
            "-u", workdir.name,
            "-r", handler.runtime_path,
            "-p", str(pidfile),
            "-P", str(workdir / "conmon.pid"),
            "--exec",
            "--exec-process-spec", str(spec),
            *self._runtime_args(handler),
            # The command writes straight into our pipes. conmon's own messages would
            # land in its stderr too, so only fatal ones are let through.
            "--log-path", "passthrough",
            "--log-level", "error",
        ]  # fmt: skip
        capture = _Capture()
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        answers = bytearray()
        sync_task: asyncio.Task[None] | None = None
        timed_out = False
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("_OCI_")}
            env["_OCI_SYNCPIPE"] = str(sync_w)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=capture.out_w,
                    stderr=capture.err_w,
                    pass_fds=(sync_w,),
                    env=env,
                    cwd=workdir,
                    start_new_session=True,
                )
            except OSError as e:
                raise UnavailableError(f"cannot run conmon {handler.monitor_path}: {e}") from None
            os.close(sync_w)
            sync_w = -1
            capture.start()
            # conmon's answers: {"data": pid} once runc started the command, then
            # {"data": exit code}; then it exits, which ends the pipe.
            sync_task = asyncio.create_task(_collect(sync_r, answers))
            try:
                rc = await asyncio.wait_for(proc.wait(), self.command_timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise UnavailableError(f"conmon for an exec in {cid} did not start") from None
            if rc != 0:
                await capture.finish(1.0)
                text = capture.err.decode(errors="replace").strip() or f"exit status {rc}"
                raise FailedPreconditionError(f"conmon for an exec in {cid} failed: {text}")
            try:
                await asyncio.wait_for(asyncio.shield(sync_task), timeout)
            except TimeoutError:
                timed_out = True
                await self._kill_exec_process(pidfile, lambda: not sync_task.done())
                try:
                    await asyncio.wait_for(asyncio.shield(sync_task), self.kill_wait)
                except TimeoutError:
                    kill_pid_from(workdir / "conmon.pid")
            await capture.finish(1.0)
        except BaseException:
            if sync_task is not None and not sync_task.done():
                await self._kill_exec_process(pidfile, lambda: False)
                kill_pid_from(workdir / "conmon.pid")
            raise
        finally:
            if sync_task is not None:
                sync_task.cancel()
                await asyncio.gather(sync_task, return_exceptions=True)
            await capture.finish(0.0)
            capture.close()
            os.close(sync_r)
            if sync_w >= 0:
                os.close(sync_w)
        if timed_out:
            return ExecResult(-1, bytes(capture.out), bytes(capture.err), True)
        values: list[int] = []
        message = ""
        for line in bytes(answers).splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                answer = json.loads(line)
                values.append(int(answer["data"]))
                message = message or str(answer.get("message", ""))
        if not values or values[0] <= 0:
            # runc never started the command; its error went to the stderr we hold.
            errors = (message + "\n").encode() + bytes(capture.err)
            return self._exec_start_failure(cid, capture, errors)
        if len(values) < 2:
            raise UnavailableError(f"conmon for an exec in {cid} exited without an exit code")
        return ExecResult(values[1], bytes(capture.out), bytes(capture.err), False)

    async def _exec_tty(
        self, cid: str, workdir: Path, spec: Path, timeout: float | None
    ) -> ExecResult:
        pidfile = workdir / "pid"
        argv = self.runc_argv("exec", "--process", str(spec), "--pid-file", str(pidfile), cid,
                              container_id=cid)
        capture = _Capture()
        # runc's foreground tty mode wants a terminal of its own: it gets one as stdin.
        master, slave = os.openpty()
        timed_out = False
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=slave,
                    stdout=capture.out_w,
                    stderr=capture.err_w,
                    start_new_session=True,
                )
            except OSError as e:
                raise UnavailableError(
                    f"cannot run {self.handler_of(cid).runtime_path}: {e}") from None
            capture.start()
            try:
                try:
                    await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:
                    timed_out = True
                    await self.kill_exec(proc, pidfile)
                await capture.finish(1.0)
            except BaseException:
                if proc.returncode is None:
                    await self._kill_exec_process(pidfile, lambda: False)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
                raise
        finally:
            await capture.finish(0.0)
            capture.close()
            os.close(master)
            os.close(slave)
        if timed_out:
            return ExecResult(-1, bytes(capture.out), bytes(capture.err), True)
        rc = proc.returncode
        assert rc is not None
        if rc != 0 and not pidfile.exists():
            # runc never started the command, so stderr holds runc's own error.
            return self._exec_start_failure(cid, capture, bytes(capture.err))
        return ExecResult(rc, bytes(capture.out), bytes(capture.err), False)

    def _exec_start_failure(self, cid: str, capture: _Capture, errors: bytes) -> ExecResult:
        """The result of a command runc could not start, or the error if it was not the
        command's fault (say, a stopped container)."""
        message = runc_message(errors)
        if "unable to start container process" not in message:
            raise _runc_error(f"exec in container {cid}", errors)
        lowered = message.lower()
        code = 127 if "no such file" in lowered or "not found" in lowered else 126
        return ExecResult(code, bytes(capture.out), f"{message}\n".encode(), False)

    async def kill_exec(self, proc: asyncio.subprocess.Process, pidfile: Path) -> None:
        """SIGKILL a foreground exec's process (its group, by runc's pid file), then runc
        itself if it lingers."""
        await self._kill_exec_process(pidfile, lambda: proc.returncode is None)
        try:
            await asyncio.wait_for(proc.wait(), self.kill_wait)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _kill_exec_process(self, pidfile: Path, starting: Callable[[], bool]) -> None:
        """SIGKILL an exec'd process and its process group."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        # runc writes the pid file once the process runs; a timeout may strike just before.
        while not pidfile.exists() and starting() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        kill_pid_from(pidfile, group=True)

    async def _bundle(self, cid: str) -> Path:
        record = await asyncio.to_thread(self._record, cid)
        if record is not None:
            return Path(record["bundle"])
        state = await self.state(cid)
        if state is None:
            raise NotFoundError(f"container {cid} not found")
        return Path(str(state["bundle"]))

    def _record(self, cid: str) -> dict[str, str] | None:
        try:
            value = json.loads((self._persist / cid / "cripy.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _read_conmon_pid(self, cid: str) -> int | None:
        try:
            return int((self._persist / cid / "conmon.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _conmon_alive(self, cid: str) -> bool:
        return self.conmon_pid(cid) is not None

    def _oom_killed(self, cid: str, exit_code: int) -> bool:
        persist = self._persist / cid
        if (persist / "oom").exists():
            return True
        # conmon's event can lose the race with the exit; the cgroup's counter cannot.
        record = self._record(cid)
        if record is None or "memory_cgroup" not in record:
            return False
        own = Path(str(record["memory_cgroup"]))
        if own.exists():
            return _oom_kill_count(own) > 0
        # The cgroup went with its systemd scope: a SIGKILL exit that StopContainer did not
        # send, while the pod's cgroup counted a new OOM kill, is this container's (a
        # sibling's OOM kill and an outside SIGKILL of this one could still be confused).
        pod = record.get("pod_cgroup")
        if pod is None or exit_code != 128 + signal.SIGKILL or (persist / KILLED_FILE).exists():
            return False
        return _oom_kill_count(Path(str(pod))) > int(record.get("pod_oom_kills", 0))


# -- module helpers ---------------------------------------------------------------------


def _check_id(container_id: str) -> str:
    if not _ID_RE.fullmatch(container_id):
        raise InvalidArgumentError(f"invalid container ID {container_id!r}")
    return container_id


def runc_message(stderr: bytes) -> str:
    """runc's error text from its stderr (JSON log lines, or plain text)."""
    errors: list[str] = []
    others: list[str] = []
    for raw in stderr.decode(errors="replace").splitlines():
        line = raw.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            errors.append(line)
            continue
        if isinstance(entry, dict) and "msg" in entry:
            level = entry.get("level")
            (errors if level in ("error", "fatal", "panic") else others).append(str(entry["msg"]))
        else:
            errors.append(line)
    return "; ".join(errors or others)


def runc_log_errors(path: Path) -> str:
    try:
        data = path.read_bytes()[-65536:]
    except OSError:
        return ""
    return runc_message(data)


def _is_not_found(message: str) -> bool:
    return "does not exist" in message


def _runc_error(what: str, stderr: bytes) -> CripyError:
    message = runc_message(stderr) or "no error message"
    if _is_not_found(message):
        return NotFoundError(f"{what}: {message}")
    return FailedPreconditionError(f"{what}: {message}")


def _tail(path: Path, limit: int = 4096) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip()
    except OSError:
        return ""


async def _read_line(fd: int, timeout: float) -> bytes:
    """The first line written to a pipe (or all that came before EOF)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = bytearray()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf.extend(chunk)
        if (not chunk or b"\n" in buf) and not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(fd)
    return bytes(buf).split(b"\n", 1)[0].strip()


class _Budget:
    """How many more output bytes may be kept, shared by the streams that draw on it."""

    def __init__(self, limit: int = EXEC_OUTPUT_LIMIT) -> None:
        self.left = limit

    def keep(self, chunk: bytes) -> bytes:
        kept = chunk[:max(self.left, 0)]
        self.left -= len(kept)
        return kept


class _Capture:
    """Pipes for a child's stdout and stderr, read into buffers that together keep at
    most EXEC_OUTPUT_LIMIT bytes.

    Our own pipes rather than asyncio's: Process.wait() also waits for every holder of
    an asyncio pipe to let go, and children the command leaves behind may never do so.
    """

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self._fds: list[int] = []
        self.out_r, self.out_w = self._pipe()
        self.err_r, self.err_w = self._pipe()
        self._tasks: list[asyncio.Task[None]] = []

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        self._fds += (r, w)
        return r, w

    def start(self) -> None:
        """Start reading, once the child holds the write ends."""
        for fd in (self.out_w, self.err_w):
            os.close(fd)
            self._fds.remove(fd)
        budget = _Budget()
        self._tasks = [
            asyncio.create_task(_collect(self.out_r, self.out, budget)),
            asyncio.create_task(_collect(self.err_r, self.err, budget)),
        ]

    async def finish(self, grace: float) -> None:
        """Read until both pipes end or `grace` seconds pass, whichever comes first."""
        if self._tasks and grace > 0:
            await asyncio.wait(self._tasks, timeout=grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def kill_pid_from(pidfile: Path, *, group: bool = False) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if pid <= 1:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # runc makes an exec'd process the leader of its own session and process group.
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


async def _collect(fd: int, into: bytearray, budget: _Budget | None = None) -> None:
    """Read a pipe to its end, keeping what `budget` (default: EXEC_OUTPUT_LIMIT bytes of
    its own) allows."""
    budget = budget or _Budget()
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()

            def wake(ready: asyncio.Future[None] = ready) -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            continue
        if not chunk:
            return
        into.extend(budget.keep(chunk))


def _process_alive(pid: int, comm: str | None = None) -> bool:
    """Whether `pid` runs (zombies count as dead), and is named `comm` if given."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    close = text.rfind(")")
    name = text[text.find("(") + 1 : close]
    fields = text[close + 2 :].split()
    if not fields or fields[0] in ("Z", "X", "x"):
        return False
    return comm is None or name == comm


def _is_conmon_of(pid: int, cid: str) -> bool:
    """Whether `pid` is a live conmon monitoring `cid` (the pid may have been reused)."""
    if not _process_alive(pid, "conmon"):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"--exec" in argv or b"-e" in argv:
        return False  # an exec session's conmon
    return any(a in (b"-c", b"--cid") and b == cid.encode() for a, b in itertools.pairwise(argv))


async def _wait_gone(pid: int, timeout: float) -> bool:
    """Whether `pid` ends (or is a zombie) within `timeout` seconds: woken by its pidfd,
    which becomes readable when it exits, with no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfds here (an old kernel, a seccomp filter): poll
        return await _poll_gone(pid, timeout)
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        if not _process_alive(pid):  # already a zombie: its pidfd may not wake us
            return True
        await asyncio.wait_for(gone, timeout)
        return True
    except TimeoutError:
        return not _process_alive(pid)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _poll_gone(pid: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _process_alive(pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def load_config(bundle: Path) -> dict[str, Any]:
    path = bundle / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    except ValueError as e:
        raise FailedPreconditionError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise FailedPreconditionError(f"{path} is not a JSON object")
    return config


def exec_process(
    config: dict[str, Any], args: list[str], env: list[str] | None, cwd: str | None, tty: bool
) -> dict[str, Any]:
    """The OCI process of an exec: the container's own, with `args`, `env` and `cwd`."""
    base = config.get("process")
    if not isinstance(base, dict):
        base = {}
    merged: dict[str, str] = {}
    for item in [*(base.get("env") or []), *(env or [])]:
        name, _, _ = str(item).partition("=")
        merged[name] = str(item)
    process: dict[str, Any] = {
        "terminal": tty,
        "user": base.get("user") or {"uid": 0, "gid": 0},
        "args": list(args),
        "env": list(merged.values()),
        "cwd": cwd or base.get("cwd") or "/",
    }
    # The container's AppArmor profile too (runc does not carry it over to an exec
    # process itself; the spec names one only where the node has AppArmor). Not
    # oomScoreAdj (runc would have to set it again, which needs CAP_SYS_RESOURCE to
    # lower it).
    for key in ("capabilities", "noNewPrivileges", "rlimits", "selinuxLabel",
                "apparmorProfile"):
        if key in base:
            process[key] = base[key]
    return process


def _cgroup_mounts() -> dict[str, str]:
    """Mount points of the cgroup v1 memory hierarchy ("memory") and of cgroup v2 ("")."""
    mounts: dict[str, str] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2":
            mounts.setdefault("", fields[4])
        elif tail[0] == "cgroup" and "memory" in tail[2].split(","):
            mounts.setdefault("memory", fields[4])
    return mounts


def _memory_cgroup_dir(pid: int) -> str | None:
    """The memory cgroup directory of a process, to read its OOM counter later."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            v1 = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    mounts = _cgroup_mounts()
    if v1 is not None and "memory" in mounts:
        return os.path.join(mounts["memory"], v1.lstrip("/"))
    if v2 is not None and "" in mounts:
        candidate = os.path.join(mounts[""], v2.lstrip("/"))
        if os.path.exists(os.path.join(candidate, "memory.events")):
            return candidate
    return None


def _pod_memory_dir(container: Path, pod_dir: str) -> Path | None:
    """The pod's cgroup v2 directory above `container` (whose cgroup is `pod_dir` plus
    more), when it has memory accounting; None on v1 or when it is not an ancestor."""
    parts = tuple(p for p in pod_dir.split("/") if p)
    if not parts:
        return None
    for candidate in container.parents:
        if candidate.parts[-len(parts):] == parts:
            return candidate if (candidate / "memory.events").exists() else None
    return None


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # no persist dir: nothing to tell apart later
        path.touch()


def _oom_kill_count(cgroup: Path) -> int:
    for name in ("memory.oom_control", "memory.events"):
        try:
            text = (cgroup / name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                with contextlib.suppress(ValueError):
                    return int(value)
    return 0

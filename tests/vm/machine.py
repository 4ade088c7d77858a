"""Boots the test VM and runs the guest checks in it (host side).

qemu boots Debian's kernel with an initramfs built here (tests/vm/initramfs.py); the
guest's root is this machine's root over read-only 9p under a tmpfs overlay, systemd is
PID 1 on the unified cgroup hierarchy, and one unit runs pytest on tests/vm/guest with
the checkout's own virtualenv. Results come back over a second, writable 9p share: the
pytest output (streamed here while it is written), a junit XML file, the exit code, and
on failure the daemons' logs and the guest journal. The guest has no network interface
but loopback; everything the checks need runs inside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from tests.vm.initramfs import (
    GUEST_RESULTS,
    INIT_MARKER,
    RESULTS_TAG,
    ROOT_TAG,
    GuestSetup,
    build_initramfs,
)

QEMU = "/usr/bin/qemu-system-x86_64"
CHECKOUT = Path(__file__).resolve().parents[2]

#: Files the guest writes into the results share.
BOOTED = "booted.json"  # once its test unit starts: the guest's uptime
PYTEST_LOG = "pytest.log"
JUNIT = "junit.xml"
EXIT_CODE = "exit-code"
REQUEST = "request.json"  # written here: what the guest should run

#: How long KVM gets to show the initramfs marker before TCG is used instead.
KVM_PROBE_SECONDS = 15.0

#: Units a test node does not need; some are slow under emulation (tmpfiles-setup
#: alone took minutes scanning the host's /tmp over 9p before /tmp became a tmpfs).
MASKED_UNITS: tuple[str, ...] = (
    "systemd-tmpfiles-setup.service", "systemd-tmpfiles-clean.timer",
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-hwdb-update.service", "systemd-journal-flush.service",
    "systemd-random-seed.service", "systemd-timesyncd.service", "systemd-pstore.service",
    "systemd-update-utmp.service", "systemd-update-utmp-runlevel.service",
    "systemd-sysusers.service", "systemd-firstboot.service", "systemd-machine-id-commit.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "systemd-modules-load.service", "systemd-remount-fs.service", "systemd-fsck-root.service",
    "systemd-boot-system-token.service", "ldconfig.service", "kmod-static-nodes.service",
    "keyboard-setup.service", "console-setup.service", "apparmor.service",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "e2scrub_reap.service",
)  # fmt: skip

#: Guest paths that get their own tmpfs: /tmp holds every check's state, cripy's root and
#: runroot included (overlayfs cannot use the overlay root as an upper layer).
GUEST_TMPFS = {"/tmp": "3G", "/var/tmp": "256M", "/var/log": "256M", "/var/lib/cripy": "1G"}

SUMMARY_LINE = re.compile(r"^=*\s*(\d+ \w+|no tests ran).* in [\d.]+s.*$")


class VmError(Exception):
    """The VM could not run the checks (did not boot, timed out, left no result)."""


@dataclass
class VmOptions:
    pytest_args: Sequence[str] = ()
    memory_mib: int = 4096
    cpus: int = 2
    boot_timeout: float = 300.0  # until the test unit starts
    timeout: float = 1500.0  # the whole run
    accel: str = "auto"  # auto (KVM, else TCG), kvm or tcg
    console: bool = False  # stream the serial console too
    keep: Path | None = None  # copy the results and the console log here
    out: TextIO = field(default_factory=lambda: sys.stdout)


@dataclass
class VmRun:
    exit_code: int
    accel: str
    boot_seconds: float
    suite_seconds: float
    summary: str


def find_kernel() -> tuple[Path, Path]:
    """Debian's newest installed kernel and its modules directory."""
    found = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        if (modules / "kernel").is_dir():
            key = tuple(int(n) for n in re.findall(r"\d+", version))
            found.append((key, image, modules))
    if not found:
        raise VmError("no kernel in /boot with modules in /lib/modules "
                      "(install linux-image-amd64)")
    _, image, modules = max(found)
    return image, modules


def covered_by_tmpfs(checkout: Path) -> list[str]:
    """[checkout] when one of the guest's tmpfs mounts would hide it, else []."""
    if any(checkout.is_relative_to(path) for path in GUEST_TMPFS):
        return [str(checkout)]
    return []


def kernel_cmdline() -> str:
    return " ".join([
        "console=ttyS0", "panic=-1", "quiet", "loglevel=3",
        "systemd.unified_cgroup_hierarchy=1", "apparmor=1", "security=apparmor",
        "systemd.unit=cripy-vm.target", "systemd.show_status=error",
        "systemd.journald.forward_to_console=0",
    ])


def guest_units(checkout: Path) -> dict[str, str]:
    python = checkout / ".venv" / "bin" / "python"
    return {
        "cripy-vm.target": "\n".join([
            "[Unit]",
            "Description=cripy test node",
            "Requires=basic.target cripy-vm-checks.service",
            "After=basic.target",
            "AllowIsolate=yes",
        ]),
        "cripy-vm-checks.service": "\n".join([
            "[Unit]",
            "Description=cripy guest checks",
            "After=basic.target dbus.socket",
            "Wants=dbus.socket",
            "SuccessAction=poweroff-force",
            "FailureAction=poweroff-force",
            "[Service]",
            "Type=oneshot",
            f"WorkingDirectory={checkout}",
            "Environment=PYTHONUNBUFFERED=1 CRIPY_VM_GUEST=1 HOME=/root",
            f"Environment=CRIPY_VM_RESULTS={GUEST_RESULTS}",
            f"ExecStart={python} -m tests.vm.inguest",
            "StandardOutput=journal+console",
            "StandardError=inherit",
            "TimeoutStartSec=infinity",
        ]),
    }


def qemu_command(accel: str, opts: VmOptions, kernel: Path, initrd: Path, results: Path,
                 console_log: Path) -> list[str]:
    return [
        QEMU, "-nodefaults", "-no-reboot", "-display", "none", "-nic", "none",
        "-machine", "q35", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(opts.cpus), "-m", str(opts.memory_mib),
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", kernel_cmdline(),
        "-chardev", f"file,id=console,path={console_log}", "-serial", "chardev:console",
        "-fsdev", f"local,id={ROOT_TAG},path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev={ROOT_TAG},mount_tag={ROOT_TAG}",
        "-fsdev", f"local,id={RESULTS_TAG},path={results},security_model=none",
        "-device", f"virtio-9p-pci,fsdev={RESULTS_TAG},mount_tag={RESULTS_TAG}",
    ]


def _die_with_parent() -> None:
    """In the child: SIGKILL qemu when this process dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Follower:
    """Copies what is appended to a file to an output stream."""

    def __init__(self, path: Path, out: TextIO | None, prefix: str = "") -> None:
        self.path = path
        self.out = out
        self.prefix = prefix
        self._offset = 0
        self._partial = ""

    def poll(self, final: bool = False) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        text = self._partial + chunk.decode(errors="replace")
        lines = text.split("\n")
        self._partial = lines.pop()
        if final and self._partial:
            lines.append(self._partial)
            self._partial = ""
        if self.out is not None and lines:
            for line in lines:
                self.out.write(self.prefix + line.rstrip("\r") + "\n")
            self.out.flush()


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(none)"
    return "\n".join(line.rstrip("\r") for line in text.split("\n")[-lines:])


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C, so the cleanup below runs."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


WORKDIR_PREFIX = "cripy-vm-"
OWNER = "owner.pid"


def remove_abandoned_workdirs() -> None:
    """Remove the temp dirs of earlier runs whose runner was killed (SIGKILL leaves them;
    their qemu died with the runner)."""
    for workdir in Path(tempfile.gettempdir()).glob(WORKDIR_PREFIX + "*"):
        try:
            pid = int((workdir / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if not Path(f"/proc/{pid}").exists():
            shutil.rmtree(workdir, ignore_errors=True)


class Machine:
    """One VM run in its own temp dir; use `run()`."""

    def __init__(self, opts: VmOptions) -> None:
        self.opts = opts
        self.out = opts.out
        remove_abandoned_workdirs()
        self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        (self.workdir / OWNER).write_text(str(os.getpid()))
        self.results = self.workdir / "results"
        self.results.mkdir()
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.process: subprocess.Popen[bytes] | None = None

    def say(self, message: str) -> None:
        self.out.write(f"vm: {message}\n")
        self.out.flush()

    # --- the run ------------------------------------------------------------------------

    def run(self) -> VmRun:
        with _terminate_on_signals():
            try:
                return self._run()
            finally:
                self._stop()
                self._keep()
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _run(self) -> VmRun:
        started = time.monotonic()
        kernel, modules = find_kernel()
        setup = GuestSetup(masked_units=MASKED_UNITS, units=guest_units(CHECKOUT),
                           tmpfs=GUEST_TMPFS, default_target="cripy-vm.target",
                           keep_visible=covered_by_tmpfs(CHECKOUT))
        initrd = self.workdir / "initramfs.cpio"
        initrd.write_bytes(build_initramfs(modules, setup))
        request = {"pytest_args": list(self.opts.pytest_args)}
        (self.results / REQUEST).write_text(json.dumps(request))
        accel = self._boot(kernel, initrd)
        boot_seconds, suite_seconds = self._wait(started)
        code_file = self.results / EXIT_CODE
        if not code_file.exists():
            raise VmError("the guest powered off without a result\n"
                          f"--- serial console (tail) ---\n{_tail(self.console_log)}\n"
                          f"--- guest journal (tail) ---\n{_tail(self.results / 'journal.log')}")
        exit_code = int(code_file.read_text())
        summary = next((line for line in reversed(
            (self.results / PYTEST_LOG).read_text(errors="replace").splitlines())
            if SUMMARY_LINE.match(line)), "")
        return VmRun(exit_code, accel, boot_seconds, suite_seconds, summary)

    def _boot(self, kernel: Path, initrd: Path) -> str:
        """Start qemu: KVM when usable and the guest shows life in time, else TCG."""
        choices = [self.opts.accel] if self.opts.accel != "auto" else (
            ["kvm", "tcg"] if os.access("/dev/kvm", os.R_OK | os.W_OK) else ["tcg"])
        for accel in choices:
            self.console_log.write_bytes(b"")
            self._start(accel, kernel, initrd)
            if accel != "kvm" or len(choices) == 1:
                return accel
            if self._await_marker(KVM_PROBE_SECONDS):
                return accel
            self.say(f"KVM guest showed no sign of life in {KVM_PROBE_SECONDS:.0f}s; "
                     "booting again with TCG (emulation, slower)")
            self._stop()
        raise AssertionError("unreachable")

    def _start(self, accel: str, kernel: Path, initrd: Path) -> None:
        command = qemu_command(accel, self.opts, kernel, initrd, self.results, self.console_log)
        self.say(f"booting {kernel.name} with {accel} ({self.opts.cpus} CPUs, "
                 f"{self.opts.memory_mib} MiB)")
        self.started_at = time.monotonic()
        with self.qemu_log.open("wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def _await_marker(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if INIT_MARKER in self.console_log.read_text(errors="replace"):
                return True
            if self.process is not None and self.process.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def _wait(self, run_started: float) -> tuple[float, float]:
        """Wait for the guest to power off; returns (boot, suite) seconds."""
        assert self.process is not None
        console = _Follower(self.console_log, self.out if self.opts.console else None, "console| ")
        pytest_log = _Follower(self.results / PYTEST_LOG, None if self.opts.console else self.out)
        booted_at: float | None = None
        deadline = run_started + self.opts.timeout
        while self.process.poll() is None:
            time.sleep(0.5)
            console.poll()
            pytest_log.poll()
            now = time.monotonic()
            if booted_at is None and (self.results / BOOTED).exists():
                booted_at = now
                self.say(f"booted in {booted_at - self.started_at:.0f}s; running the checks")
            if booted_at is None and now - self.started_at > self.opts.boot_timeout:
                raise VmError(f"the VM did not boot within {self.opts.boot_timeout:.0f}s\n"
                              f"--- serial console (tail) ---\n{_tail(self.console_log)}")
            if now > deadline:
                raise VmError(f"the VM run exceeded its {self.opts.timeout:.0f}s timeout\n"
                              f"--- serial console (tail) ---\n{_tail(self.console_log)}")
        console.poll(final=True)
        pytest_log.poll(final=True)
        ended = time.monotonic()
        if booted_at is None:
            raise VmError(f"qemu exited with {self.process.returncode} before the guest booted\n"
                          f"--- qemu ---\n{_tail(self.qemu_log)}\n"
                          f"--- serial console (tail) ---\n{_tail(self.console_log)}")
        return booted_at - self.started_at, ended - booted_at

    def _stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()

    def _keep(self) -> None:
        if self.opts.keep is None:
            return
        self.opts.keep.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.results, self.opts.keep, dirs_exist_ok=True)
        if self.console_log.exists():
            shutil.copy(self.console_log, self.opts.keep / "console.log")

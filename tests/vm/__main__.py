"""`python -m tests.vm [options] [-- pytest args]`: boot the test VM and run the guest
checks (tests/vm/guest) in it. See tests/vm/README.md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.vm.machine import Machine, VmError, VmOptions


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/test-vm", description=__doc__)
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                        help="qemu accelerator; auto tries KVM and falls back to TCG")
    parser.add_argument("--memory", type=int, default=4096, help="guest memory in MiB")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1500.0,
                        help="seconds for the whole run before qemu is killed")
    parser.add_argument("--boot-timeout", type=float, default=300.0,
                        help="seconds until the guest's test unit must have started")
    parser.add_argument("--console", action="store_true",
                        help="stream the serial console (else only the guest's pytest output)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy the results share and the console log to DIR")
    opts, pytest_args = parser.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    machine = Machine(VmOptions(
        pytest_args=pytest_args, memory_mib=opts.memory, cpus=opts.cpus,
        boot_timeout=opts.boot_timeout, timeout=opts.timeout, accel=opts.accel,
        console=opts.console, keep=opts.keep))
    started = time.monotonic()
    try:
        run = machine.run()
    except VmError as error:
        print(f"vm: FAILED: {error}", flush=True)
        # the last line stays a pytest-style summary, for whoever reads only that
        reason = str(error).splitlines()[0]
        print(f"1 error in {time.monotonic() - started:.1f}s (the VM suite did not run: "
              f"{reason})", flush=True)
        return 3
    except KeyboardInterrupt as interrupt:
        print(f"vm: interrupted ({interrupt}); qemu killed, temp files removed", flush=True)
        return 130
    print(f"vm: {run.accel}: boot {run.boot_seconds:.0f}s, suite {run.suite_seconds:.0f}s, "
          f"total {run.boot_seconds + run.suite_seconds:.0f}s; guest pytest exit {run.exit_code}",
          flush=True)
    if not run.summary:
        print("vm: FAILED: the guest pytest printed no summary line", flush=True)
        return run.exit_code or 3
    print(run.summary, flush=True)
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

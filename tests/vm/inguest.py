"""Guest side of the VM run: started by the guest's cripy-vm-checks.service.

Reads the request the host left in the results share, runs pytest on tests/vm/guest
with this virtualenv's python, and writes the output, a junit XML file and the exit
code back into the share (and on failure the guest's journal). systemd powers the
guest off when this ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.vm.machine import BOOTED, EXIT_CODE, JUNIT, PYTEST_LOG, REQUEST


def main() -> int:
    results = Path(os.environ["CRIPY_VM_RESULTS"])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    (results / BOOTED).write_text(json.dumps({"uptime": uptime}))
    request = json.loads((results / REQUEST).read_text())
    # Without the hypothesis and anyio plugins, which no guest check uses: importing
    # hypothesis alone takes seconds under emulation.
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
               "-p", "no:hypothesispytest", "-p", "no:anyio", "-rfE",
               f"--junitxml={results / JUNIT}", "tests/vm/guest", *request["pytest_args"]]
    with (results / PYTEST_LOG).open("wb") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    if code != 0:
        with (results / "journal.log").open("wb") as journal:
            subprocess.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic"],
                           stdout=journal, stderr=subprocess.STDOUT)
    partial = results / (EXIT_CODE + ".tmp")
    partial.write_text(f"{code}\n")
    partial.rename(results / EXIT_CODE)
    return code


if __name__ == "__main__":
    sys.exit(main())

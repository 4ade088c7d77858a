"""Named points where the daemon can be made to die at once, to prove crash recovery.

Tests start a daemon with CRIPY_CRASH_AT=<name>; when it reaches that point it sends
itself SIGKILL, exactly as an OOM kill or a power cut would leave things.
"""

from __future__ import annotations

import os
import signal

ENV = "CRIPY_CRASH_AT"
_armed = os.environ.get(ENV, "")


def crash_point(name: str) -> None:
    if _armed == name:
        os.kill(os.getpid(), signal.SIGKILL)

"""Runtime-neutral measurement helpers: percentiles, process memory, container monitors."""

from __future__ import annotations

import os
from pathlib import Path


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


MONITORS = ("conmon", "containerd-shim")  # comm is cut at 15 characters


def monitor_pids_for(object_ids: list[str]) -> list[int]:
    """Container monitors (cripy's conmons, containerd's shims) serving these IDs."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() not in MONITORS:
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(object_id in cmdline for object_id in object_ids):
            found.append(int(pid))
    return found

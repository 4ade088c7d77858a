"""The daemon's footprint: import time and idle RSS after start.

Import time: `python -X importtime` of what `python -m cripy daemon` imports before it
serves (the CLI entry point and cripy.daemon), in a fresh interpreter each time, --runs
times; the median of the total and the modules that cost the most (cumulative, in the
median run) are printed. Idle RSS: a daemon is started in a temporary state dir (no pods,
no images), left alone for --settle seconds, and its VmRSS and thread count are read from
/proc. --cripy NAME=PYTHON measures another checkout's cripy the same way, interleaved
(before and after comparisons). Starting a daemon needs root and the test lock:

Usage: flock /tmp/cripy-test.lock python -m benchmarks.footprint [--runs 7] [--settle 5]
           [--cripy main=../main/.venv/bin/python] [--no-daemon]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.cri_bench import rss_bytes
from benchmarks.pull import named
from tests.support.daemon import Daemon

DAEMON_IMPORTS = "import cripy.cli.main, cripy.daemon, cripy.logs"
_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


@dataclass(frozen=True)
class ImportRow:
    self_us: int
    cumulative_us: int
    depth: int
    module: str


def parse_importtime(text: str) -> list[ImportRow]:
    """The rows of `-X importtime` output (stderr); other lines are skipped."""
    rows = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            rows.append(ImportRow(int(match[1]), int(match[2]), len(match[3]) // 2,
                                  match[4]))
    return rows


def total_ms(rows: list[ImportRow]) -> float:
    return sum(r.self_us for r in rows) / 1000


def import_rows(python: str, statement: str = DAEMON_IMPORTS) -> list[ImportRow]:
    # Away from this checkout, so that another interpreter imports its own cripy.
    done = subprocess.run([python, "-X", "importtime", "-c", statement],
                          capture_output=True, text=True, check=True, cwd="/")
    return parse_importtime(done.stderr)


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--no-daemon", action="store_true", help="import time only")
    parser.add_argument("--cripy", type=named, action="append", default=[],
                        metavar="NAME=PYTHON",
                        help="also another cripy, run by that interpreter (interleaved)")
    parser.add_argument("--env", type=named, action="append", default=[],
                        metavar="NAME=VALUE", help="in the daemons' environment")
    args = parser.parse_args()
    pythons = [("cripy", sys.executable), *args.cripy]

    runs: dict[str, list[list[ImportRow]]] = {name: [] for name, _ in pythons}
    for _ in range(args.runs):
        for name, python in pythons:
            runs[name].append(import_rows(python))
    for name, found in runs.items():
        found.sort(key=total_ms)
        median = found[len(found) // 2]
        print(f"[{name}] import time of the daemon ({args.runs} runs): median "
              f"{total_ms(median):.0f} ms, min {total_ms(found[0]):.0f} ms, "
              f"max {total_ms(found[-1]):.0f} ms")
        cripy_rows = [r for r in median if r.module.startswith("cripy.")]
        for row in sorted(median, key=lambda r: -r.cumulative_us)[:args.top]:
            print(f"  {row.cumulative_us / 1000:7.1f} ms  {row.module}")
        print(f"  modules imported: {len(median)} ({len(cripy_rows)} of cripy)")
    if args.no_daemon:
        return
    for name, python in pythons:
        rss, threads = idle_daemon(python if name != "cripy" else "", args.settle,
                                   dict(args.env))
        print(f"[{name}] idle daemon RSS: {rss / 2**20:.1f} MiB, {threads} threads "
              f"(after {args.settle:.0f} s idle)")


def idle_daemon(python: str, settle: float, env: dict[str, str]) -> tuple[float, int]:
    """RSS (median of five samples) and threads of a fresh daemon left alone."""
    with tempfile.TemporaryDirectory(prefix="cripy-footprint-") as tmp:
        daemon = Daemon(Path(tmp) / "daemon", python=python)
        try:
            daemon.start(env=env)
            assert daemon.process is not None
            time.sleep(settle)
            samples = []
            for _ in range(5):
                samples.append(rss_bytes(daemon.process.pid))
                time.sleep(0.2)
            return statistics.median(samples), thread_count(daemon.process.pid)
        finally:
            try:
                daemon.stop()
            finally:
                daemon.kill()


if __name__ == "__main__":
    main()

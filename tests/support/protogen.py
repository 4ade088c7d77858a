"""The staleness check of generated protobuf modules, shared by the CRI and NRI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def stale_modules(
    tmp_path: Path, committed_dir: Path, names: Iterable[str], sub: str = ""
) -> list[str]:
    """Run scripts/gen-proto into tmp_path and list the committed modules (in
    committed_dir) that differ from the fresh ones (in tmp_path/sub)."""
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / sub if sub else tmp_path
    return [n for n in names if (fresh / n).read_bytes() != (committed_dir / n).read_bytes()]

"""Runtime handlers probed on this host: the real crun. Needs root."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cripy.oci.handlers import host_problem
from tests.unit.test_handlers import CRUN


def test_the_host_rule_matches_what_crun_does_here(tmp_path: Path) -> None:
    """On this host the rule's verdict is crun's own: run crun and compare."""
    from cripy.oci.cgroups import probe_host

    host = probe_host()
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    subprocess.run([CRUN, "spec", "--rootless"], cwd=bundle, check=True, timeout=30)
    result = subprocess.run([CRUN, "--root", str(tmp_path / "root"), "run", "-b", str(bundle),
                             "probe"], capture_output=True, text=True, timeout=30)
    subprocess.run([CRUN, "--root", str(tmp_path / "root"), "delete", "-f", "probe"],
                   capture_output=True, timeout=30)
    if host_problem("crun", host, "cgroupfs"):
        assert result.returncode != 0
        assert "hybrid" in result.stderr
    else:
        assert "hybrid" not in result.stderr

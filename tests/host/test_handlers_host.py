"""Runtime handlers probed on this host: the real runc and crun binaries (crun's own
verdict on this host needs root)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cripy.config import from_dict
from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.oci.handlers import (
    host_problem,
    probe_handler,
    probe_handlers,
    runtime_version,
    select,
)
from cripy.oci.runtime import OciRuntime
from tests.unit.test_handlers import CRUN, HYBRID, RUNC


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


def test_runtime_version_of_the_real_binaries() -> None:
    flavor, version, problem = runtime_version(RUNC)
    assert (flavor, problem) == ("runc", "") and version[0].isdigit()
    flavor, version, problem = runtime_version(CRUN)
    assert (flavor, problem) == ("crun", "") and version[0].isdigit()


def test_probe_handlers_and_select(tmp_path: Path) -> None:
    config = from_dict({"runtime": {"handlers": {
        "gone": {"runtime_path": str(tmp_path / "nope")}}}}).runtime
    handlers = probe_handlers(config, tmp_path / "oci", HYBRID)
    assert handlers["runc"].flavor == "runc" and handlers["runc"].problem == ""
    assert handlers["runc"].root == tmp_path / "oci" / "runc"
    assert handlers["runc"].runtime_path == RUNC  # resolved in PATH for conmon
    assert "hybrid" in handlers["crun"].problem
    assert handlers["gone"].problem == "" and "cannot be run" in handlers["gone"].binary_problem
    assert select(handlers, "runc", "") is handlers["runc"]
    with pytest.raises(InvalidArgumentError) as info:
        select(handlers, "runc", "kata")
    assert "unknown runtime handler 'kata'" in str(info.value)
    assert "crun, gone, runc" in str(info.value)


def test_oci_runtime_handler_lookup(tmp_path: Path) -> None:
    handlers = {"runc": probe_handler("runc", RUNC, "conmon", tmp_path / "r", HYBRID,
                                      "cgroupfs"),
                "crun": probe_handler("crun", CRUN, "conmon", tmp_path / "c", HYBRID,
                                      "cgroupfs")}
    oci = OciRuntime(state_dir=tmp_path / "oci", handlers=handlers)
    assert oci.handler("") is handlers["runc"]
    assert oci.runtime_path == RUNC
    with pytest.raises(FailedPreconditionError) as info:
        oci.handler("crun")
    assert "runtime handler 'crun' cannot run containers on this host" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="unknown runtime handler 'x'"):
        oci.handler("x")
    # The container's state directory tells which handler made it.
    (tmp_path / "c" / "ctr1").mkdir()
    assert oci.handler_of("ctr1") is handlers["crun"]
    assert oci.handler_of("ctr2") is handlers["runc"]
    argv = oci.runc_argv("state", "ctr1", container_id="ctr1")
    assert argv[:3] == [CRUN, "--root", str(tmp_path / "c")]

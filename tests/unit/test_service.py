"""Tests for cripy.service: the shipped systemd unit and its installation."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.service import install, installed_cripy, render_unit


def directives(text: str) -> dict[str, dict[str, str]]:
    """A unit file's sections and keys, read the way systemd reads them."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        assert key not in current, f"{key} given twice"
        current[key] = value
    return sections


def test_the_unit_is_a_notify_service_that_spares_containers() -> None:
    cripy = installed_cripy()
    unit = directives(render_unit(cripy))
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"] == f"{cripy} daemon"
    assert service["ExecReload"] == "/bin/kill -s HUP $MAINPID"
    assert service["KillMode"] == "process"
    assert service["Delegate"] == "yes"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a config error is not retried
    assert service["LimitNOFILE"] == "1048576"
    assert service["TasksMax"] == "infinity"
    assert service["OOMScoreAdjust"] == "-999"
    assert "network-online.target" in unit["Unit"]["After"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed (Debian package systemd)"
    unit = tmp_path / "cripy.service"
    unit.write_text(render_unit(installed_cripy()))
    check = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                           timeout=60, check=False)
    assert check.returncode == 0, check.stderr
    # Unknown keys and bad values are only warnings; there must be none about our unit.
    assert "cripy.service" not in check.stderr, check.stderr


def test_exec_start_runs_this_cripy() -> None:
    cripy = installed_cripy()
    assert Path(cripy).parent == Path(os.path.abspath(sys.executable)).parent
    version = subprocess.run([cripy, "--version"], capture_output=True, text=True,
                             timeout=60, check=True)
    assert version.stdout.startswith("cripy ")


@pytest.mark.parametrize("path", ["cripy", "/opt/my cripy/bin/cripy", "/opt/$x/cripy"])
def test_exec_start_paths_systemd_would_misread_are_refused(path: str) -> None:
    with pytest.raises(InvalidArgumentError, match="must be an absolute path"):
        render_unit(path)


def test_install_without_systemd_writes_the_unit_and_drop_in_dir(tmp_path: Path) -> None:
    units, drop_ins = tmp_path / "units", tmp_path / "etc" / "cripy.d"
    done = install(unit_dir=str(units), config_dir=str(drop_ins), with_systemd=False)
    unit = units / "cripy.service"
    assert done == [f"wrote {unit}", f"made the config drop-in directory {drop_ins}",
                    "systemd is not running here: the unit takes effect where it does"]
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert unit.read_text() == render_unit(installed_cripy())
    assert drop_ins.is_dir()
    # Again: idempotent, the directory is kept.
    assert install(unit_dir=str(units), config_dir=str(drop_ins), with_systemd=False)[1:] == [
        "systemd is not running here: the unit takes effect where it does"]
    with pytest.raises(FailedPreconditionError, match="systemd is not running here"):
        install(unit_dir=str(units), config_dir=str(drop_ins), enable=True, with_systemd=False)


def test_cripy_install_service_command(tmp_path: Path) -> None:
    units, drop_ins = tmp_path / "units", tmp_path / "cripy.d"
    result = subprocess.run(
        [sys.executable, "-m", "cripy", "install-service", "--unit-dir", str(units),
         "--config-dir", str(drop_ins), "--cripy", "/usr/local/bin/cripy"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert f"wrote {units}/cripy.service" in result.stdout
    unit = directives((units / "cripy.service").read_text())
    assert unit["Service"]["ExecStart"] == "/usr/local/bin/cripy daemon"

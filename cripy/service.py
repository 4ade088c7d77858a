"""Installing cripy as a systemd service: the unit file shipped in the package, made to
point at this installation's `cripy`, written to /etc/systemd/system."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from cripy.config import DEFAULT_CONFIG_DIR
from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.fsutil import atomic_write

UNIT_NAME = "cripy.service"
UNIT_DIR = "/etc/systemd/system"
PLACEHOLDER = "@CRIPY@"
SYSTEMCTL_TIMEOUT = 120.0


def unit_template() -> str:
    return resources.files("cripy").joinpath("data", UNIT_NAME).read_text()


def render_unit(cripy: str) -> str:
    """The unit with ExecStart running `cripy` (an absolute path)."""
    if not os.path.isabs(cripy) or any(c.isspace() or c in "\\\"'$%;" for c in cripy):
        raise InvalidArgumentError(
            f"cripy executable {cripy!r} must be an absolute path without spaces, quotes, "
            "'$', '%', ';' or backslashes (systemd would read them specially)")
    return unit_template().replace(PLACEHOLDER, cripy)


def installed_cripy() -> str:
    """This installation's `cripy`: the console script next to the running Python (a
    virtualenv's bin/), else the one on PATH."""
    beside = Path(os.path.abspath(sys.executable)).parent / "cripy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("cripy")
    if found is None:
        raise FailedPreconditionError("cannot find the cripy executable; pass --cripy PATH")
    return os.path.abspath(found)


def systemd_running() -> bool:
    """Whether systemd is the init system (its own test, as sd_booted(3) does)."""
    return os.path.isdir("/run/systemd/system")


def _systemctl(*args: str) -> None:
    try:
        result = subprocess.run(["systemctl", *args], capture_output=True, text=True,
                                timeout=SYSTEMCTL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FailedPreconditionError(f"systemctl {' '.join(args)}: {exc}") from None
    if result.returncode != 0:
        raise FailedPreconditionError(
            f"systemctl {' '.join(args)} failed ({result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}")


def install(*, unit_dir: str = UNIT_DIR, config_dir: str = DEFAULT_CONFIG_DIR,
            cripy: str | None = None, enable: bool = False,
            with_systemd: bool | None = None) -> list[str]:
    """Write the unit and the drop-in directory; reload (and enable) where systemd runs.

    Returns what was done, one line each, for the operator.
    """
    text = render_unit(cripy or installed_cripy())
    done = []
    unit = Path(unit_dir) / UNIT_NAME
    unit.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(unit, text.encode(), mode=0o644)
    done.append(f"wrote {unit}")
    drop_ins = Path(config_dir)
    if not drop_ins.is_dir():
        drop_ins.mkdir(parents=True, mode=0o755)
        done.append(f"made the config drop-in directory {drop_ins}")
    if with_systemd is None:
        with_systemd = systemd_running()
    if not with_systemd:
        if enable:
            raise FailedPreconditionError(
                f"wrote {unit}, but systemd is not running here, so it cannot be enabled")
        done.append("systemd is not running here: the unit takes effect where it does")
        return done
    _systemctl("daemon-reload")
    done.append("systemctl daemon-reload")
    if enable:
        _systemctl("enable", "--now", UNIT_NAME)
        done.append(f"systemctl enable --now {UNIT_NAME}")
    return done

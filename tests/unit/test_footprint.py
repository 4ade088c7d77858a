"""The daemon loads only what it uses: client commands, NRI plugin machinery and YAML
stay out until they are needed."""

from __future__ import annotations

import subprocess
import sys

LAZY = ("cripy.cli.ctl", "cripy.cli.status", "cripy.nri.plugins", "cripy.nri.connection",
        "yaml")


def loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    return set(done.stdout.split())


def test_the_daemon_command_does_not_load_the_clients_or_nri_plugins() -> None:
    modules = loaded_after("from cripy.cli.main import build_parser\n"
                           "import cripy.daemon\n"
                           "build_parser(clients=False).parse_args(['daemon'])")
    assert "cripy.daemon" in modules
    assert not modules & set(LAZY)


def test_the_other_commands_still_have_their_clients() -> None:
    modules = loaded_after("from cripy.cli.main import build_parser\n"
                           "args = build_parser().parse_args(['ctl', 'version'])\n"
                           "assert args.verb == 'version'")
    assert {"cripy.cli.ctl", "cripy.cli.status"} <= modules


def test_daemon_help_is_shown() -> None:
    done = subprocess.run([sys.executable, "-m", "cripy", "daemon", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0
    assert "--runroot" in done.stdout

"""AppArmor on this host: apparmor_parser checks and loads the default profile. Needs root."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cripy.errors import FailedPreconditionError
from cripy.oci.apparmor import (
    DEFAULT_PROFILE,
    DEFAULT_PROFILE_TEXT,
    container_profile,
    load_profile,
    prepare_host,
    probe,
)
from tests.unit.test_apparmor import SC, fake_sys, parser


def test_the_default_profile_parses() -> None:
    """apparmor_parser compiles it (-Q: without loading, so AppArmor may be off)."""
    check = subprocess.run([parser(), "-Q", "-K"], input=DEFAULT_PROFILE_TEXT.encode(),
                           capture_output=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr.decode()
    broken = DEFAULT_PROFILE_TEXT.replace("deny mount,", "deny mount")
    check = subprocess.run([parser(), "-Q", "-K"], input=broken.encode(),
                           capture_output=True, timeout=60, check=False)
    assert check.returncode != 0 and b"syntax error" in check.stderr


def test_loading_on_this_host(tmp_path: Path) -> None:
    """The real parser against the real kernel: loads where AppArmor is on, else refuses
    with the parser's reason."""
    if probe().enabled:
        load_profile(parser(), DEFAULT_PROFILE_TEXT)
        assert DEFAULT_PROFILE in probe().loaded_profiles()
        return
    with pytest.raises(FailedPreconditionError, match="apparmor_parser -K -r exited with"):
        load_profile(parser(), DEFAULT_PROFILE_TEXT)
    # A node claiming AppArmor whose kernel refuses the load: the default is unavailable
    # with the parser's reason, and saying so beats running containers unconfined.
    host = prepare_host(fake_sys(tmp_path / "sys"))
    assert host.enabled and "loading it failed" in host.default_error
    with pytest.raises(FailedPreconditionError, match="unavailable on this node"):
        container_profile(SC(), privileged=False, host=host)

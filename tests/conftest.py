"""Fixtures shared by tests/unit and the tests/host tests that need root."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the destination that no layer may touch."""
    out = tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "sentinel").write_bytes(b"secret")
    (out / "sub/file").write_bytes(b"also secret")
    return out


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """A rootfs and a 'host' passwd next to it that must never be read."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    secret = tmp_path / "host_passwd"
    secret.write_text("evil:x:666:666::/:/bin/sh\n")
    return root, secret

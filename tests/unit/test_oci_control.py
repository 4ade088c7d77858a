"""conmon's control fifo, written by the OCI runtime (resize, reopen the log)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from cripy.errors import FailedPreconditionError
from cripy.oci.runtime import OciRuntime

CID = "c" * 64


def runtime(tmp_path: Path) -> tuple[OciRuntime, Path]:
    oci = OciRuntime(runtime_path="/nonexistent/runc", conmon_path="/nonexistent/conmon",
                     state_dir=tmp_path / "oci")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    persist = tmp_path / "oci" / "persist" / CID
    persist.mkdir(parents=True)
    (persist / "cripy.json").write_text(json.dumps(
        {"bundle": str(bundle), "log_path": str(tmp_path / "log")}))
    return oci, bundle


def test_resize_goes_to_the_control_fifo_clamped(tmp_path: Path) -> None:
    oci, bundle = runtime(tmp_path)
    os.mkfifo(bundle / "ctl")
    reader = os.open(bundle / "ctl", os.O_RDONLY | os.O_NONBLOCK)  # conmon's end
    try:
        asyncio.run(oci.resize(CID, 40, 120))
        asyncio.run(oci.resize(CID, 5000, -3))
        assert os.read(reader, 100) == b"1 40 120\n1 1000 0\n"
        assert asyncio.run(oci.bundle_of(CID)) == bundle
    finally:
        os.close(reader)


def test_no_reader_or_no_fifo_is_refused(tmp_path: Path) -> None:
    oci, bundle = runtime(tmp_path)
    with pytest.raises(FailedPreconditionError, match="has no control fifo"):
        asyncio.run(oci.resize(CID, 1, 1))
    os.mkfifo(bundle / "ctl")
    with pytest.raises(FailedPreconditionError, match="is not running"):
        asyncio.run(oci.resize(CID, 1, 1))  # nobody reads: conmon is gone
    (bundle / "ctl").unlink()
    (bundle / "ctl").write_text("")
    with pytest.raises(FailedPreconditionError, match="is not conmon's control fifo"):
        asyncio.run(oci.reopen_log(CID))

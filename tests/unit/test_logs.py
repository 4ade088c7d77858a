from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cripy.logs import JsonFormatter, KeyValueFormatter, setup_logging, stderr_is_journal


@pytest.fixture(autouse=True)
def _keep_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("cripy.test", logging.WARNING, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_key_value_lines_quote_what_needs_it() -> None:
    line = KeyValueFormatter().format(record("pod ready", pod="abc", ips="10.0.0.1 10.0.0.2"))
    assert line.startswith("time=")
    assert ' level=warning logger=cripy.test msg="pod ready" pod=abc ips="10.0.0.1 10.0.0.2"' \
        in line
    assert "\n" not in KeyValueFormatter().format(record("two\nlines"))


def test_json_lines_carry_the_extra_fields() -> None:
    data = json.loads(JsonFormatter().format(record("pulled", image="busybox", seconds=1.5)))
    assert data["level"] == "warning" and data["msg"] == "pulled"
    assert data["image"] == "busybox" and data["seconds"] == 1.5
    assert data["time"].endswith("Z")


def test_journal_lines_carry_the_priority_and_no_timestamp() -> None:
    line = KeyValueFormatter(journal=True).format(record("slow", pod="abc"))
    assert line == "<4>level=warning logger=cripy.test msg=slow pod=abc"
    debug = record("detail")
    debug.levelno, debug.levelname = logging.DEBUG, "DEBUG"
    assert KeyValueFormatter(journal=True).format(debug).startswith("<7>level=debug ")
    data = JsonFormatter(journal=True).format(record("pulled"))
    assert data.startswith("<4>{") and "time" not in json.loads(data[3:])


def test_the_journal_is_recognised_by_the_stream_systemd_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stderr_is_journal()
        setup_logging("info")
        logging.getLogger("cripy.test").info("hello")
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # inherited, stale
        assert not stderr_is_journal()
        setup_logging("info")
        logging.getLogger("cripy.test").info("again")
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not stderr_is_journal()
    first, second = (tmp_path / "stderr").read_text().splitlines()
    assert first == "<6>level=info logger=cripy.test msg=hello"
    assert second.startswith("time=") and second.endswith("msg=again")

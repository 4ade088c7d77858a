from __future__ import annotations

import json
import logging

from cripy.logs import JsonFormatter, KeyValueFormatter


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

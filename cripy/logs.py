"""The daemon's own log: one structured line per record, key=value text or JSON.

Under systemd, stderr goes to the journal (JOURNAL_STREAM names it): lines then carry
the record's syslog priority as a "<N>" prefix, which journald turns into the entry's
priority (`journalctl -u cripy -p warning` works), and no timestamp of their own, since
the journal keeps one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


# syslog priorities (RFC 5424) of the logging levels.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
               logging.CRITICAL: 2}


def _fields(record: logging.LogRecord, with_time: bool = True) -> dict[str, object]:
    fields: dict[str, object] = {}
    if with_time:
        fields["time"] = (datetime.fromtimestamp(record.created, UTC)
                          .isoformat(timespec="milliseconds").replace("+00:00", "Z"))
    fields.update({
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    })
    # Anything passed as extra={...} becomes a field of its own.
    fields.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
    if record.exc_info:
        fields["error"] = logging.Formatter().formatException(record.exc_info)
    return fields


class KeyValueFormatter(logging.Formatter):
    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = " ".join(f"{k}={_quote(v)}"
                        for k, v in _fields(record, not self.journal).items())
        return _priority(record) + line if self.journal else line


class JsonFormatter(KeyValueFormatter):
    def format(self, record: logging.LogRecord) -> str:
        line = json.dumps(_fields(record, not self.journal), default=str)
        return _priority(record) + line if self.journal else line


def _priority(record: logging.LogRecord) -> str:
    level = max((lv for lv in _PRIORITIES if lv <= record.levelno), default=logging.DEBUG)
    return f"<{_PRIORITIES[level]}>"


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd connected (JOURNAL_STREAM=dev:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in expected:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t'):
        return text
    return json.dumps(text)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    journal = stderr_is_journal()
    handler.setFormatter(JsonFormatter(journal) if fmt == "json" else KeyValueFormatter(journal))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())

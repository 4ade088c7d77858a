"""Durable JSON records of pods and containers, one file each, written atomically."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cripy.fsutil import atomic_write_json

log = logging.getLogger(__name__)


class RecordDir:
    """`<dir>/<id>/<name>.json` for every object of one kind."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)

    def object_dir(self, object_id: str) -> Path:
        return self.directory / object_id

    def save(self, object_id: str, record: dict[str, Any]) -> None:
        self.object_dir(object_id).mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.object_dir(object_id) / f"{self.name}.json", record)

    def load_all(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Every object directory with its record, or None when the record is unreadable
        or was never written (a create cut short)."""
        for path in sorted(self.directory.iterdir()):
            if not path.is_dir():
                continue
            try:
                yield path.name, json.loads((path / f"{self.name}.json").read_text())
            except (OSError, ValueError) as exc:
                log.warning("no usable %s record in %s: %s", self.name, path, exc)
                yield path.name, None

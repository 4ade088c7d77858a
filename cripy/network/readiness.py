"""Is pod networking usable? A CNI network config whose plugins are all installed."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

CONFIG_SUFFIXES = (".conflist", ".conf", ".json")


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str = ""
    message: str = ""


def check_network(config_dir: str, plugin_dirs: list[str]) -> Readiness:
    """Ready when the first config file (in name order, as CNI does) is usable."""
    directory = Path(config_dir)
    try:
        candidates = sorted(p for p in directory.iterdir() if p.suffix in CONFIG_SUFFIXES)
    except OSError:
        candidates = []
    if not candidates:
        return Readiness(False, "NetworkPluginNotReady",
                         f"no CNI configuration file in {config_dir}")
    path = candidates[0]
    try:
        data = json.loads(path.read_text())
        plugins = data.get("plugins", [data])
        types = [str(p["type"]) for p in plugins]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Readiness(False, "NetworkPluginNotReady", f"CNI config {path} is invalid: {exc}")
    for plugin in types:
        if not any(os.access(Path(d) / plugin, os.X_OK) for d in plugin_dirs):
            return Readiness(False, "NetworkPluginNotReady",
                             f"CNI plugin {plugin!r} (from {path}) not found in "
                             f"{', '.join(plugin_dirs)}")
    return Readiness(True)

"""Tests for runtime handler tables (config) and their probing (cripy.oci.handlers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cripy.config import ConfigError, from_dict, load, render
from cripy.oci.cgroups import HostCgroups
from cripy.oci.handlers import host_problem, runtime_version

HYBRID = HostCgroups("hybrid", ("hugetlb",), systemd=False, dbus=False)
UNIFIED = HostCgroups("unified", ("cpu", "memory"), systemd=True, dbus=True)
RUNC = shutil.which("runc") or "/usr/sbin/runc"
CRUN = "/usr/bin/crun"


# --- config --------------------------------------------------------------------------


def test_default_handlers() -> None:
    runtime = from_dict({}).runtime
    assert runtime.default_handler == "runc"
    assert sorted(runtime.handlers) == ["crun", "runc"]
    assert runtime.handler("").runtime_path == "runc"
    assert runtime.handler("crun").runtime_path == CRUN
    assert runtime.handler("crun").monitor_path == "conmon"


def test_handler_tables_are_added_to_the_defaults_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[runtime]\ndefault_handler = "fast"\n'
                    '[runtime.handlers.fast]\nruntime_path = "/opt/fast"\n'
                    'runtime_root = "/run/fast"\n'
                    '[runtime.handlers.crun]\nmonitor_path = "/opt/conmon"\n')
    runtime = load(path).runtime
    assert sorted(runtime.handlers) == ["crun", "fast", "runc"]
    assert runtime.handler("").runtime_path == "/opt/fast"
    assert runtime.handler("fast").runtime_root == "/run/fast"
    assert runtime.handler("crun").monitor_path == "/opt/conmon"
    assert runtime.handler("crun").runtime_path == "runc"  # a table replaces the default one
    text = render(load(path))
    assert '[runtime.handlers."fast"]' in text and 'runtime_root = "/run/fast"' in text
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert load(again) == load(path)


def test_the_old_keys_set_the_default_handler() -> None:
    runtime = from_dict({"runtime": {"runtime_path": "/x/runc", "conmon_path": "/x/conmon"}}
                        ).runtime
    assert runtime.handler("").runtime_path == "/x/runc"
    assert runtime.handler("runc").monitor_path == "/x/conmon"
    assert runtime.handler("crun").runtime_path == CRUN


@pytest.mark.parametrize(("runtime", "message"), [
    ({"default_handler": "kata"}, "runtime.default_handler: 'kata' is not a [runtime.handlers]"),
    ({"handlers": {"Bad_Name": {}}}, "runtime.handlers.Bad_Name: a handler name"),
    ({"handlers": {"x": {"runtime_path": ""}}}, "runtime.handlers.x.runtime_path: must not"),
    ({"handlers": {"x": {"runtime_root": "rel"}}}, "runtime.handlers.x.runtime_root: must be"),
    ({"handlers": {"x": {"binary": "a"}}}, "unknown config key runtime.handlers.x.binary"),
    ({"cgroup_manager": "cgroupv3"}, "runtime.cgroup_manager: must be cgroupfs or systemd"),
    ({"conmon_cgroup": "/x"}, "runtime.conmon_cgroup: must be \"pod\" or a slice"),
    ({"conmon_cgroup": "system.slice"}, "runtime.conmon_cgroup: 'system.slice' needs "
     "cgroup_manager = \"systemd\""),
])
def test_bad_handler_config(runtime: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"runtime": runtime})
    assert message in str(info.value)


# --- probing -------------------------------------------------------------------------


def test_runtime_version_of_what_is_no_runtime(tmp_path: Path) -> None:
    assert "cannot be run" in runtime_version(str(tmp_path / "missing"))[2]
    assert "does not look like an OCI runtime" in runtime_version("/bin/false")[2]


def test_crun_is_refused_on_hybrid_cgroups_only() -> None:
    problem = host_problem("crun", HYBRID, "cgroupfs")
    assert "crun refuses hybrid cgroup hierarchies" in problem and "hugetlb" in problem
    assert host_problem("crun", UNIFIED, "systemd") == ""
    assert host_problem("runc", HYBRID, "cgroupfs") == ""
    no_bus = HostCgroups("unified", ("memory",), systemd=True, dbus=False)
    assert "D-Bus" in host_problem("crun", no_bus, "systemd")
    assert host_problem("crun", no_bus, "cgroupfs") == ""

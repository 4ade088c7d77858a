"""Tests for cripy.oci.cgroups: slice expansion, parent validation per driver, host facts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.oci.cgroups import (
    CgroupfsDriver,
    HostCgroups,
    SystemdDriver,
    conmon_unit,
    expand_slice,
    make_driver,
    probe_host,
    scope_unit,
)
from cripy.oci.spec import cgroups_path

POD_SLICE = "kubepods-burstable-pod0f1e_22aa.slice"
POD_SLICE_PATH = ("/kubepods.slice/kubepods-burstable.slice/"
                  "kubepods-burstable-pod0f1e_22aa.slice")
HYBRID = HostCgroups("hybrid", ("hugetlb",), systemd=False, dbus=False)
SYSTEMD_V2 = HostCgroups("unified", ("cpu", "memory"), systemd=True, dbus=True)


@pytest.mark.parametrize(("name", "path"), [
    ("kubepods-burstable-pod123.slice",
     "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod123.slice"),
    ("kubepods.slice", "/kubepods.slice"),
    ("system.slice", "/system.slice"),
    ("-.slice", "/"),
    (POD_SLICE, POD_SLICE_PATH),
])
def test_expand_slice(name: str, path: str) -> None:
    assert expand_slice(name) == path


@pytest.mark.parametrize("name", [
    "kubepods", ".slice", "a--b.slice", "-a.slice", "a-.slice", "a/b.slice", "a b.slice",
])
def test_expand_slice_refuses_what_is_no_slice(name: str) -> None:
    with pytest.raises(InvalidArgumentError):
        expand_slice(name)


def test_cgroupfs_driver_paths() -> None:
    d = CgroupfsDriver()
    assert d.parent("") == "/cripy"
    path = d.cgroups_path("/kubepods/burstable/pod1/", "abc")
    assert path == "/kubepods/burstable/pod1/cripy-abc"
    assert d.container_dir("", "abc") == "/cripy/cripy-abc"
    assert d.pod_dir("/kubepods//burstable/./pod1") == "/kubepods/burstable/pod1"
    assert d.monitor_prefix("/kubepods", "abc") == []
    assert d.runtime_args == ()


@pytest.mark.parametrize("parent", [POD_SLICE, POD_SLICE_PATH, "system.slice"])
def test_cgroupfs_driver_refuses_slices_naming_both(parent: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        CgroupfsDriver().parent(parent)
    message = str(info.value)
    assert parent in message and "systemd slice" in message and "driver is cgroupfs" in message


@pytest.mark.parametrize("parent", ["kubepods/burstable", "/kubepods/../../etc"])
def test_cgroupfs_driver_refuses_bad_paths(parent: str) -> None:
    with pytest.raises(InvalidArgumentError, match="cgroup_parent"):
        CgroupfsDriver().parent(parent)


@pytest.mark.parametrize("parent", [POD_SLICE, POD_SLICE_PATH, POD_SLICE_PATH + "/"])
def test_systemd_driver_takes_both_slice_forms(parent: str) -> None:
    d = SystemdDriver()
    assert d.parent(parent) == POD_SLICE
    assert d.cgroups_path(parent, "abc") == f"{POD_SLICE}:cripy:abc"
    assert d.container_dir(parent, "abc") == f"{POD_SLICE_PATH}/cripy-abc.scope"
    assert d.pod_dir(parent) == POD_SLICE_PATH
    assert d.runtime_args == ("--systemd-cgroup",)


def test_crun_puts_its_systemd_containers_one_level_down_on_v2() -> None:
    scope = f"{POD_SLICE_PATH}/cripy-abc.scope"
    assert SystemdDriver().container_dir(POD_SLICE, "abc", "crun") == f"{scope}/container"
    assert SystemdDriver().container_dir(POD_SLICE, "abc", "runc") == scope
    assert SystemdDriver(cgroup_v2=False).container_dir(POD_SLICE, "abc", "crun") == scope
    assert CgroupfsDriver().container_dir("/p", "abc", "crun") == "/p/cripy-abc"


def test_systemd_driver_default_parent_is_system_slice() -> None:
    d = SystemdDriver()
    assert d.cgroups_path("", "abc") == "system.slice:cripy:abc"
    assert d.container_dir("", "abc") == "/system.slice/cripy-abc.scope"


@pytest.mark.parametrize("parent", ["/kubepods/burstable/pod1", "/a/b", "cripy"])
def test_systemd_driver_refuses_paths_naming_both(parent: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SystemdDriver().parent(parent)
    message = str(info.value)
    assert parent in message and "cgroupfs path" in message and "driver is systemd" in message


def test_systemd_driver_refuses_a_slice_path_systemd_would_not_use() -> None:
    with pytest.raises(InvalidArgumentError, match="not where systemd puts slice"):
        SystemdDriver().parent("/elsewhere/" + POD_SLICE)
    with pytest.raises(InvalidArgumentError, match="empty level"):
        SystemdDriver().parent("kubepods--x.slice")


def test_conmon_placement() -> None:
    prefix = SystemdDriver().monitor_prefix(POD_SLICE_PATH, "abc")
    assert prefix[:2] == ["systemd-run", "--scope"]
    assert "--unit=cripy-conmon-abc.scope" in prefix
    assert f"--slice={POD_SLICE}" in prefix and prefix[-1] == "--"
    elsewhere = SystemdDriver("system.slice").monitor_prefix(POD_SLICE, "abc")
    assert "--slice=system.slice" in elsewhere
    assert scope_unit("abc") == "cripy-abc.scope"
    assert conmon_unit("abc") == "cripy-conmon-abc.scope"
    with pytest.raises(InvalidArgumentError):
        scope_unit("../x")


def test_spec_cgroups_path_follows_the_driver() -> None:
    sandbox = pb.PodSandboxConfig(linux=pb.LinuxPodSandboxConfig(cgroup_parent=POD_SLICE_PATH))
    assert cgroups_path(sandbox, "abc", SystemdDriver()) == f"{POD_SLICE}:cripy:abc"
    with pytest.raises(InvalidArgumentError, match="driver is cgroupfs"):
        cgroups_path(sandbox, "abc")


def test_make_driver_refuses_systemd_without_systemd() -> None:
    assert make_driver("cgroupfs", HYBRID).name == "cgroupfs"
    with pytest.raises(FailedPreconditionError) as info:
        make_driver("systemd", HYBRID)
    assert "needs systemd as PID 1" in str(info.value)
    assert "/run/systemd/system" in str(info.value)


def test_make_driver_systemd() -> None:
    driver = make_driver("systemd", SYSTEMD_V2, conmon_cgroup="system.slice")
    assert isinstance(driver, SystemdDriver)
    assert driver.conmon_cgroup == "system.slice"


def _fake_cgroup_root(tmp_path: Path, layout: str) -> tuple[Path, Path]:
    root, run = tmp_path / "cgroup", tmp_path / "run"
    root.mkdir()
    run.mkdir()
    if layout == "unified":
        (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (run / "systemd" / "system").mkdir(parents=True)
        (run / "dbus").mkdir()
        (run / "dbus" / "system_bus_socket").write_text("")
    elif layout == "hybrid":
        (root / "memory").mkdir()
        (root / "unified").mkdir()
        (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    else:
        (root / "memory").mkdir()
    return root, run


@pytest.mark.parametrize(("layout", "expected"), [
    ("unified", HostCgroups("unified", ("cpuset", "cpu", "io", "memory", "pids"), True, True)),
    ("hybrid", HostCgroups("hybrid", ("hugetlb",), False, False)),
    ("legacy", HostCgroups("legacy", (), False, False)),
])
def test_probe_host(tmp_path: Path, layout: str, expected: HostCgroups) -> None:
    root, run = _fake_cgroup_root(tmp_path, layout)
    host = probe_host(root, run)
    assert host == expected
    assert host.cgroup_v2 == (layout == "unified")


def test_probe_host_sees_this_host() -> None:
    host = probe_host()
    assert host.cgroup_v2 == Path("/sys/fs/cgroup/cgroup.controllers").exists()
    assert host.systemd == Path("/run/systemd/system").is_dir()
    assert host.mode in host.describe()


def test_systemd_cleanup_stops_only_loaded_units(tmp_path: Path) -> None:
    """The cleanup asks `systemctl show` first and stops only units that are loaded."""
    calls = tmp_path / "calls"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'if [ "$1" = show ]; then\n'
        "  printf 'Id=cripy-abc.scope\\nLoadState=loaded\\nActiveState=failed\\n\\n'\n"
        "  printf 'Id=cripy-conmon-abc.scope\\nLoadState=not-found\\nActiveState=inactive\\n'\n"
        "fi\n")
    systemctl.chmod(0o755)
    driver = SystemdDriver(systemctl=str(systemctl))
    asyncio.run(driver.cleanup("abc"))
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("show ")
    assert lines[1:] == ["stop -- cripy-abc.scope", "reset-failed -- cripy-abc.scope"]


def _events(directory: Path, oom_kills: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.events").write_text(
        f"low 0\nhigh 0\nmax 3\noom {oom_kills}\noom_kill {oom_kills}\n")


def test_an_oom_kill_is_found_after_systemd_removed_the_scope(tmp_path: Path) -> None:
    """The scope's cgroup is gone; the pod's cgroup counted the kill."""
    from cripy.oci.runtime import OciRuntime, _pod_memory_dir

    pod = tmp_path / "cg" / POD_SLICE_PATH.lstrip("/")
    scope = pod / "cripy-abc.scope"
    _events(pod, 2)
    scope.mkdir()
    assert _pod_memory_dir(scope / "container", POD_SLICE_PATH) == pod
    assert _pod_memory_dir(scope, "/elsewhere.slice") is None
    scope.rmdir()
    oci = OciRuntime(state_dir=tmp_path / "oci", cgroups=SystemdDriver())
    persist = tmp_path / "oci" / "persist" / "abc"
    persist.mkdir()
    (persist / "cripy.json").write_text(json.dumps({
        "bundle": str(tmp_path), "log_path": str(tmp_path / "log"), "handler": "runc",
        "memory_cgroup": str(scope), "pod_cgroup": str(pod), "pod_oom_kills": 2}))
    exit_file = tmp_path / "oci" / "exits" / "abc"
    exit_file.write_text("137")
    status = oci.exit_status("abc")
    assert status is not None and status.exit_code == 137 and not status.oom_killed
    _events(pod, 3)  # a new kill below the pod while the container ran
    status = oci.exit_status("abc")
    assert status is not None and status.oom_killed
    exit_file.write_text("0")  # a clean exit was no OOM kill, whatever the pod counted
    status = oci.exit_status("abc")
    assert status is not None and not status.oom_killed
    exit_file.write_text("137")
    (persist / "killed").touch()  # StopContainer's own SIGKILL, after a sibling's OOM kill
    status = oci.exit_status("abc")
    assert status is not None and status.exit_code == 137 and not status.oom_killed

"""Merging NRI plugins' adjustments and updates, and applying them to an OCI spec."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cripy.nri import api_pb2 as nri
from cripy.nri.adjust import (
    ConflictError,
    CreateResult,
    Owners,
    apply_adjustment,
    cri_to_nri_resources,
    inject_cdi_devices,
    merge_update,
    update_to_cri,
)

CID = "c" * 64


def container() -> nri.Container:
    return nri.Container(id=CID, name="app", env=["PATH=/bin", "KEEP=1", "DROP=1"],
                         annotations={"a": "1"},
                         mounts=[nri.Mount(destination="/data", source="/old", type="bind")])


def reply(**adjust: Any) -> nri.CreateContainerResponse:
    return nri.CreateContainerResponse(adjust=nri.ContainerAdjustment(**adjust))


def spec() -> dict[str, Any]:
    return {"process": {"env": ["PATH=/bin", "KEEP=1", "DROP=1"], "args": ["sh"]},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/data", "type": "bind", "source": "/old"}],
            "annotations": {"a": "1"},
            "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}],
                                    "memory": {"limit": 1 << 30}},
                      "devices": [], "cgroupsPath": "/pod/c"}}


def test_adjustments_of_two_plugins_merge_and_later_plugins_see_earlier_ones() -> None:
    result = CreateResult(container())
    result.apply(reply(env=[nri.KeyValue(key="A", value="from-10")],
                       annotations={"x": "10"},
                       mounts=[nri.Mount(destination="/data", source="/new", type="bind",
                                         options=["rbind", "ro"])]), "10-one")
    assert "A=from-10" in result.container.env  # what plugin 20 is shown
    assert [m.source for m in result.container.mounts] == ["/new"]
    memory = nri.LinuxResources(memory=nri.LinuxMemory(limit=nri.OptionalInt64(value=64 << 20)))
    result.apply(reply(env=[nri.KeyValue(key="-DROP")],
                       linux=nri.LinuxContainerAdjustment(resources=memory)), "20-two")
    assert "DROP=1" not in result.container.env
    out = spec()
    apply_adjustment(out, result.adjust, cgroup_v2=False)
    assert out["process"]["env"] == ["PATH=/bin", "KEEP=1", "A=from-10"]
    assert out["annotations"] == {"a": "1", "x": "10"}
    data = [m for m in out["mounts"] if m["destination"] == "/data"]
    assert data == [{"destination": "/data", "type": "bind", "source": "/new",
                     "options": ["rbind", "ro"]}]
    assert out["linux"]["resources"]["memory"] == {"limit": 64 << 20}


@pytest.mark.parametrize("adjust", [
    {"env": [nri.KeyValue(key="A", value="x")]},
    {"annotations": {"x": "y"}},
    {"mounts": [nri.Mount(destination="/m", source="/s")]},
    {"linux": nri.LinuxContainerAdjustment(
        resources=nri.LinuxResources(cpu=nri.LinuxCPU(cpus="0")))},
    {"linux": nri.LinuxContainerAdjustment(oom_score_adj=nri.OptionalInt(value=5))},
    {"rlimits": [nri.POSIXRlimit(type="RLIMIT_NOFILE", hard=10, soft=10)]},
])
def test_two_plugins_setting_the_same_thing_conflict_naming_both(adjust: dict[str, Any]
                                                                 ) -> None:
    result = CreateResult(container())
    result.apply(reply(**adjust), "10-one")
    with pytest.raises(ConflictError, match="'10-one' and '20-two' both tried to set"):
        result.apply(reply(**adjust), "20-two")


def test_a_removal_gives_up_ownership_so_a_later_plugin_may_set_it_again() -> None:
    result = CreateResult(container())
    result.apply(reply(env=[nri.KeyValue(key="A", value="1")]), "10-one")
    result.apply(reply(env=[nri.KeyValue(key="-A")]), "20-two")
    result.apply(reply(env=[nri.KeyValue(key="A", value="3")]), "30-three")
    out = spec()
    apply_adjustment(out, result.adjust, cgroup_v2=False)
    assert out["process"]["env"].count("A=3") == 1
    assert not any(e.startswith("A=1") for e in out["process"]["env"])


def test_hooks_devices_rlimits_oom_and_seccomp_reach_the_spec() -> None:
    result = CreateResult(container())
    hooks = nri.Hooks(prestart=[nri.Hook(path="/bin/true", args=["true"],
                                         timeout=nri.OptionalInt(value=3))])
    linux = nri.LinuxContainerAdjustment(
        devices=[nri.LinuxDevice(path="/dev/fuse", type="c", major=10, minor=229,
                                 file_mode=nri.OptionalFileMode(value=0o666))],
        oom_score_adj=nri.OptionalInt(value=500), cgroups_path="/custom/path",
        seccomp_policy=nri.LinuxSeccomp(default_action="SCMP_ACT_ALLOW", syscalls=[
            nri.LinuxSyscall(names=["mkdir"], action="SCMP_ACT_ERRNO",
                             errno_ret=nri.OptionalUInt32(value=1))]))
    result.apply(reply(hooks=hooks, linux=linux,
                       rlimits=[nri.POSIXRlimit(type="RLIMIT_NOFILE", hard=99, soft=98)]),
                 "10-one")
    result.apply(reply(hooks=nri.Hooks(prestart=[nri.Hook(path="/bin/false")])), "20-two")
    out = spec()
    apply_adjustment(out, result.adjust, cgroup_v2=False)
    assert [h["path"] for h in out["hooks"]["prestart"]] == ["/bin/true", "/bin/false"]
    assert out["hooks"]["prestart"][0] == {"path": "/bin/true", "args": ["true"], "timeout": 3}
    assert out["linux"]["devices"] == [{"path": "/dev/fuse", "type": "c", "major": 10,
                                        "minor": 229, "fileMode": 0o666}]
    assert {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rwm"} in \
        out["linux"]["resources"]["devices"]
    assert out["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 99, "soft": 98}]
    assert out["process"]["oomScoreAdj"] == 500
    assert out["linux"]["cgroupsPath"] == "/custom/path"
    assert out["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}


def test_what_the_node_cannot_do_is_refused_with_the_reason() -> None:
    unified = nri.LinuxContainerAdjustment(
        resources=nri.LinuxResources(unified={"memory.high": "1000000"}))
    with pytest.raises(FailedPreconditionError, match="cgroup v2"):
        apply_adjustment(spec(), nri.ContainerAdjustment(linux=unified), cgroup_v2=False)
    blockio = nri.LinuxContainerAdjustment(
        resources=nri.LinuxResources(blockio_class=nri.OptionalString(value="slow")))
    with pytest.raises(FailedPreconditionError, match="block I/O class"):
        apply_adjustment(spec(), nri.ContainerAdjustment(linux=blockio), cgroup_v2=True)
    with pytest.raises(InvalidArgumentError, match="absolute"):
        apply_adjustment(spec(), nri.ContainerAdjustment(
            mounts=[nri.Mount(destination="rel", source="/x")]), cgroup_v2=True)


def test_a_plugin_may_not_update_the_container_being_created() -> None:
    result = CreateResult(container())
    with pytest.raises(InvalidArgumentError, match="while it is being created"):
        result.apply(nri.CreateContainerResponse(update=[nri.ContainerUpdate(
            container_id=CID)]), "10-one")


def _update(cid: str, shares: int, ignore: bool = False) -> nri.ContainerUpdate:
    return nri.ContainerUpdate(container_id=cid, ignore_failure=ignore,
                               linux=nri.LinuxContainerUpdate(resources=nri.LinuxResources(
                                   cpu=nri.LinuxCPU(shares=nri.OptionalUInt64(value=shares)))))


def test_updates_merge_per_container_and_conflicts_fail_unless_ignored() -> None:
    updates: dict[str, nri.ContainerUpdate] = {}
    owners = Owners()
    merge_update(updates, _update("a", 100), owners, "10-one")
    merge_update(updates, _update("b", 200), owners, "20-two")
    merge_update(updates, _update("a", 300, ignore=True), owners, "20-two")  # dropped
    assert updates["a"].linux.resources.cpu.shares.value == 100
    with pytest.raises(ConflictError, match="'10-one' and '30-three'"):
        merge_update(updates, _update("a", 400), owners, "30-three")


def test_updates_go_through_cri_resources_and_back() -> None:
    current = pb.LinuxContainerResources(cpu_shares=2, memory_limit_in_bytes=1 << 30)
    res = nri.LinuxResources(memory=nri.LinuxMemory(limit=nri.OptionalInt64(value=1 << 28)),
                             cpu=nri.LinuxCPU(cpus="0-1"))
    updated = update_to_cri(current, res)
    assert (updated.cpu_shares, updated.memory_limit_in_bytes, updated.cpuset_cpus) == \
        (2, 1 << 28, "0-1")
    shown = cri_to_nri_resources(updated)
    assert shown.memory.limit.value == 1 << 28 and shown.cpu.shares.value == 2
    with pytest.raises(FailedPreconditionError, match="pids limit"):
        update_to_cri(current, nri.LinuxResources(pids=nri.LinuxPids(limit=5)))


def test_args_sysctls_and_namespaces_are_applied() -> None:
    result = CreateResult(container())
    linux = nri.LinuxContainerAdjustment(
        sysctl={"net.ipv4.ip_forward": "1"},
        namespaces=[nri.LinuxNamespace(type="network", path="/var/run/netns/other")])
    result.apply(reply(args=["sleep", "5"], linux=linux), "10-one")
    assert list(result.container.args) == ["sleep", "5"]
    with pytest.raises(ConflictError, match="args"):
        result.apply(reply(args=["true"]), "20-two")
    out = spec()
    out["linux"]["namespaces"] = [{"type": "network", "path": "/pod/net"}, {"type": "pid"}]
    apply_adjustment(out, result.adjust, cgroup_v2=False)
    assert out["process"]["args"] == ["sleep", "5"]
    assert out["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"}
    assert out["linux"]["namespaces"] == [{"type": "pid"},
                                          {"type": "network", "path": "/var/run/netns/other"}]


@pytest.mark.parametrize(("linux", "message"), [
    (nri.LinuxContainerAdjustment(io_priority=nri.LinuxIOPriority(priority=1)), "I/O priority"),
    (nri.LinuxContainerAdjustment(scheduler=nri.LinuxScheduler(nice=5)), "scheduling policy"),
    (nri.LinuxContainerAdjustment(net_devices={"eth9": nri.LinuxNetDevice(name="x")}),
     "network devices"),
    (nri.LinuxContainerAdjustment(resources=nri.LinuxResources(
        rdt_class=nri.OptionalString(value="gold"))), "resctrl"),
])
def test_adjustments_runc_here_cannot_apply_are_refused_by_name(
        linux: nri.LinuxContainerAdjustment, message: str) -> None:
    result = CreateResult(container())
    result.apply(reply(linux=linux), "10-one")
    with pytest.raises(FailedPreconditionError, match=message):
        apply_adjustment(spec(), result.adjust, cgroup_v2=True)


# --- CDI devices ----------------------------------------------------------------------


def cdi_devices(*names: str) -> list[nri.CDIDevice]:
    return [nri.CDIDevice(name=n) for n in names]


def test_cdi_devices_of_two_plugins_merge_and_later_plugins_see_them() -> None:
    base = container()
    base.CDI_devices.extend(cdi_devices("vendor.com/gpu=from-cri"))
    result = CreateResult(base)
    result.apply(reply(CDI_devices=cdi_devices("vendor.com/gpu=0", "vendor.com/gpu=1")),
                 "10-one")
    assert [d.name for d in result.container.CDI_devices] == [  # what plugin 20 is shown
        "vendor.com/gpu=from-cri", "vendor.com/gpu=0", "vendor.com/gpu=1"]
    result.apply(reply(CDI_devices=cdi_devices("other.org/fpga=a")), "20-two")
    assert [d.name for d in result.adjust.CDI_devices] == [
        "vendor.com/gpu=0", "vendor.com/gpu=1", "other.org/fpga=a"]
    assert result.cdi_requests() == [("10-one", ["vendor.com/gpu=0", "vendor.com/gpu=1"]),
                                     ("20-two", ["other.org/fpga=a"])]
    with pytest.raises(ConflictError, match="'10-one' and '30-three' both tried to set "
                                            "CDI device vendor.com/gpu=1"):
        result.apply(reply(CDI_devices=cdi_devices("vendor.com/gpu=1")), "30-three")


@pytest.mark.parametrize(("name", "message"), [
    ("gpu0", "NRI plugin '10-one': CDI device name 'gpu0' is not fully qualified"),
    ("-vendor.com/gpu=0", "asked to remove CDI device 'vendor.com/gpu=0': CDI devices can "
                          "only be added"),
])
def test_bad_cdi_device_requests_are_invalid_naming_the_plugin(name: str, message: str
                                                               ) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        CreateResult(container()).apply(reply(CDI_devices=cdi_devices(name)), "10-one")


def write_cdi_spec(directory: Path, share: Path) -> None:
    """vendor.com/dev: `null` exposes the host's /dev/null as /dev/vendor-null with an
    env var and a mount; the spec's own edits add a hook and another env var."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vendor.json").write_text(json.dumps({
        "cdiVersion": "0.6.0", "kind": "vendor.com/dev",
        "containerEdits": {"env": ["VENDOR_COMMON=1"], "hooks": [
            {"hookName": "createContainer", "path": "/bin/true", "args": ["true"]}]},
        "devices": [
            {"name": "null", "containerEdits": {
                "deviceNodes": [{"path": "/dev/vendor-null", "hostPath": "/dev/null"}],
                "env": ["VENDOR_DEVICE=null"],
                "mounts": [{"hostPath": str(share), "containerPath": "/vendor",
                            "options": ["ro", "rbind"]}]}},
            {"name": "env-only", "containerEdits": {"env": ["ENV_ONLY=1"]}}]}))


def test_plugin_cdi_devices_are_injected_after_the_other_adjustments(tmp_path: Path
                                                                     ) -> None:
    write_cdi_spec(tmp_path / "cdi", tmp_path)
    result = CreateResult(container())
    result.apply(reply(env=[nri.KeyValue(key="VENDOR_DEVICE", value="from-env")],
                       CDI_devices=cdi_devices("vendor.com/dev=null")), "10-one")
    out = spec()
    apply_adjustment(out, result.adjust, cgroup_v2=False)
    inject_cdi_devices(out, result.cdi_requests(), [str(tmp_path / "none"),
                                                    str(tmp_path / "cdi")])
    null = os.stat("/dev/null")
    major, minor = os.major(null.st_rdev), os.minor(null.st_rdev)
    assert out["linux"]["devices"] == [{"path": "/dev/vendor-null", "type": "c",
                                        "major": major, "minor": minor}]
    assert {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"} in \
        out["linux"]["resources"]["devices"]
    # The device's env wins over the plugin's env adjustment: CDI comes last.
    assert out["process"]["env"] == ["PATH=/bin", "KEEP=1", "DROP=1", "VENDOR_COMMON=1",
                                     "VENDOR_DEVICE=null"]
    assert {"destination": "/vendor", "source": str(tmp_path), "options": ["ro", "rbind"],
            "type": "bind"} in out["mounts"]
    assert out["hooks"]["createContainer"] == [{"path": "/bin/true", "args": ["true"]}]


def test_devices_the_cri_request_injected_are_not_applied_twice(tmp_path: Path) -> None:
    write_cdi_spec(tmp_path / "cdi", tmp_path)
    out = spec()
    requests = [("10-one", ["vendor.com/dev=null", "vendor.com/dev=env-only"])]
    inject_cdi_devices(out, requests, [str(tmp_path / "cdi")],
                       applied=["vendor.com/dev=null"])
    assert "ENV_ONLY=1" in out["process"]["env"]
    # Neither the CRI's device nor its spec's own edits (the hook) again.
    assert "VENDOR_DEVICE=null" not in out["process"]["env"]
    assert "hooks" not in out and out["linux"]["devices"] == []


def test_an_unknown_plugin_cdi_device_is_not_found_naming_device_and_plugin(
        tmp_path: Path) -> None:
    write_cdi_spec(tmp_path / "cdi", tmp_path)
    requests = [("10-one", ["vendor.com/dev=null"]), ("20-two", ["vendor.com/dev=gone"])]
    with pytest.raises(NotFoundError) as info:
        inject_cdi_devices(spec(), requests, [str(tmp_path / "cdi")])
    message = str(info.value)
    assert message.startswith("NRI plugin '20-two': CDI device not found: vendor.com/dev=gone")
    assert f"spec dirs searched: {tmp_path / 'cdi'}" in message


def test_device_cgroup_rules_are_added_at_create_and_refused_in_updates() -> None:
    rule = nri.LinuxDeviceCgroup(allow=True, type="c", major=nri.OptionalInt64(value=10),
                                 access="rw")
    result = CreateResult(container())
    for plugin in ("10-one", "20-two"):  # rules accumulate: no owner
        result.apply(reply(linux=nri.LinuxContainerAdjustment(
            resources=nri.LinuxResources(devices=[rule]))), plugin)
    out = spec()
    apply_adjustment(out, result.adjust, cgroup_v2=False)
    assert out["linux"]["resources"]["devices"] == [  # after the spec's deny-all
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "access": "rw"},
        {"allow": True, "type": "c", "major": 10, "access": "rw"}]
    with pytest.raises(InvalidArgumentError, match="rule type 'x'"):
        apply_adjustment(spec(), nri.ContainerAdjustment(linux=nri.LinuxContainerAdjustment(
            resources=nri.LinuxResources(devices=[nri.LinuxDeviceCgroup(type="x")]))),
            cgroup_v2=False)
    with pytest.raises(FailedPreconditionError, match="cannot update device cgroup rules"):
        update_to_cri(pb.LinuxContainerResources(), nri.LinuxResources(devices=[rule]))

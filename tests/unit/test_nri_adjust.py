"""Merging NRI plugins' adjustments and updates, and applying them to an OCI spec."""

from __future__ import annotations

from typing import Any

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.nri import api_pb2 as nri
from cripy.nri.adjust import (
    ConflictError,
    CreateResult,
    Owners,
    apply_adjustment,
    cri_to_nri_resources,
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
    with pytest.raises(FailedPreconditionError, match="CDI"):
        apply_adjustment(spec(), nri.ContainerAdjustment(
            CDI_devices=[nri.CDIDevice(name="vendor.com/gpu=0")]), cgroup_v2=True)


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

"""CDI: qualified names, annotations, spec parsing (JSON, YAML, versions), the spec
directories' precedence, resolution errors, and the edits applied to an OCI spec."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cripy.api import api_pb2 as pb
from cripy.config import Config, ConfigError, from_dict
from cripy.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cripy.oci import cdi

NULL = os.stat("/dev/null")


def spec_json(kind: str = "vendor.com/gpu", version: str = "0.6.0",
              devices: list[dict[str, Any]] | None = None, **top: Any) -> bytes:
    return json.dumps({
        "cdiVersion": version, "kind": kind,
        "devices": devices if devices is not None else [
            {"name": "g0", "containerEdits": {"env": ["GPU=0"]}}],
        **top,
    }).encode()


def write(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


# --- names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vendor.com/gpu=0", "a/b=c", "nvidia.com/gpu=all",
                                  "x.y_z-1/cl.ass=dev:1.2_3-4", "v/c=0"])
def test_qualified_names(name: str) -> None:
    vendor, klass, device = cdi.parse_qualified_name(name)
    assert f"{vendor}/{klass}={device}" == name


@pytest.mark.parametrize("name", ["gpu0", "vendor.com/gpu", "vendor.com=gpu", "/gpu=0",
                                  "vendor.com/=0", "vendor.com/gpu=", "1vendor/gpu=0",
                                  "vendor/gpu-=0", "vendor/gpu=0-", "vendor/gpu=a b",
                                  "vendor/g/pu=0"])
def test_malformed_names_are_invalid(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="CDI device name"):
        cdi.parse_qualified_name(name)


def test_requested_devices_from_the_field_then_annotations_each_once() -> None:
    config = pb.ContainerConfig(
        CDI_devices=[pb.CDIDevice(name="v.com/c=a"), pb.CDIDevice(name="v.com/c=b")],
        annotations={"cdi.k8s.io/z": "v.com/c=d", "cdi.k8s.io/plugin_x": "v.com/c=b,v.com/c=c",
                     "other.io/x": "not a device"})
    assert cdi.requested_devices(config) == ["v.com/c=a", "v.com/c=b", "v.com/c=c",
                                             "v.com/c=d"]
    assert cdi.requested_devices(pb.ContainerConfig()) == []
    bad = pb.ContainerConfig(annotations={"cdi.k8s.io/x": "v.com/c=a,oops"})
    with pytest.raises(InvalidArgumentError, match="annotation cdi.k8s.io/x: .*'oops'"):
        cdi.requested_devices(bad)
    with pytest.raises(InvalidArgumentError, match="'nope'"):
        cdi.requested_devices(pb.ContainerConfig(CDI_devices=[pb.CDIDevice(name="nope")]))


# --- parsing --------------------------------------------------------------------------


def test_a_full_json_spec() -> None:
    data = spec_json(version="0.7.0", containerEdits={"env": ["COMMON=1"]}, devices=[{
        "name": "g0",
        "annotations": {"a": "b"},
        "containerEdits": {
            "env": ["GPU=0"],
            "deviceNodes": [{"path": "/dev/gpu0", "hostPath": "/dev/null", "type": "c",
                             "major": 1, "minor": 3, "fileMode": 0o666,
                             "permissions": "rw", "uid": 1, "gid": 2}],
            "mounts": [{"hostPath": "/usr/lib/x", "containerPath": "/lib/x",
                        "type": "bind", "options": ["ro", "rbind"]}],
            "hooks": [{"hookName": "createContainer", "path": "/bin/true",
                       "args": ["true", "x"], "env": ["A=1"], "timeout": 5}],
            "additionalGids": [0, 44],
        }}])
    spec = cdi.parse_spec(data, "/etc/cdi/gpu.json", 1)
    assert (spec.kind, spec.priority, spec.version) == ("vendor.com/gpu", 1, "0.7.0")
    assert spec.edits.env == ("COMMON=1",)
    edits = spec.devices["g0"]
    assert edits.device_nodes == (cdi.DeviceNode("/dev/gpu0", "/dev/null", "c", 1, 3, 0o666,
                                                 "rw", 1, 2),)
    assert edits.mounts == (cdi.MountEdit("/usr/lib/x", "/lib/x", "bind", ("ro", "rbind")),)
    assert edits.hooks == (cdi.HookEdit("createContainer", "/bin/true", ("true", "x"),
                                        ("A=1",), 5),)
    assert edits.additional_gids == (0, 44)


def test_yaml_specs_read_the_same() -> None:
    data = b"""
cdiVersion: 0.5.0
kind: example.com/dev
devices:
  - name: "0"
    containerEdits:
      deviceNodes:
        - path: /dev/ex0
          hostPath: /dev/null
containerEdits:
  env: [X=1]
"""
    spec = cdi.parse_spec(data, "/var/run/cdi/ex.yaml")
    assert spec.devices["0"].device_nodes[0].host_path == "/dev/null"
    assert spec.edits.env == ("X=1",)
    assert cdi.parse_spec(spec_json(), "x.yaml").kind == "vendor.com/gpu"  # JSON is YAML


@pytest.mark.parametrize(("data", "error"), [
    (b"{", "not valid JSON"),
    (spec_json(version="1.0.0"), "cdiVersion 1.0.0 is not supported"),
    (spec_json(version="0.2.0"), "cdiVersion 0.2.0 is not supported"),
    (spec_json(version="seven"), "not a version"),
    (spec_json(kind="gpu"), "kind 'gpu'"),
    (spec_json(devices=[]), "no devices"),
    (spec_json(devices=[{"name": "a", "containerEdits": {}}]), "containerEdits are empty"),
    (spec_json(devices=[{"name": "a", "containerEdits": {"env": ["A=1"]}}] * 2),
     "defined twice"),
    (spec_json(devices=[{"name": "a-", "containerEdits": {"env": ["A=1"]}}]),
     "not a valid device name"),
    (spec_json(devices=[{"name": "a", "containerEdits": {"env": ["NOEQUALS"]}}]),
     "not NAME=VALUE"),
    (spec_json(devices=[{"name": "a", "containerEdits": {"deviceNodes": [
        {"path": "/dev/x", "type": "z"}]}}]), "not one of b, c, u, p"),
    (spec_json(devices=[{"name": "a", "containerEdits": {"deviceNodes": [
        {"path": "/dev/x", "permissions": "rwx"}]}}]), "not a subset of rwm"),
    (spec_json(devices=[{"name": "a", "containerEdits": {"deviceNodes": [
        {"path": "dev/x"}]}}]), "not an absolute path"),
    (spec_json(devices=[{"name": "a", "containerEdits": {"deviceNodes": [
        {"path": "/dev/x", "major": -1}]}}]), "non-negative integer"),
    (spec_json(devices=[{"name": "a", "containerEdits": {"hooks": [
        {"hookName": "atBoot", "path": "/bin/true"}]}}]), "'atBoot' is not one of"),
    (spec_json(devices=[{"name": "a", "containerEdits": {"mounts": [
        {"containerPath": "/x"}]}}]), "hostPath: required"),
    (spec_json(devices=[{"name": "a", "containerEdits": {"env": ["A=1"], "bogus": 1}}]),
     "unknown field 'bogus'"),
    (spec_json(devices=[{"name": "a", "containerEdits": {"netDevices": [
        {"hostInterfaceName": "eth1", "name": "net1"}]}}]), "need CDI 1.0"),
    (spec_json(version="0.6.0", devices=[{"name": "a", "containerEdits": {
        "additionalGids": [5]}}]), "0.6.0 is too old for additionalGids"),
    (spec_json(version="0.5.0", annotations={"a": "b"}), "too old for annotations"),
    (spec_json(version="0.4.0", devices=[{"name": "a", "containerEdits": {"deviceNodes": [
        {"path": "/dev/x", "hostPath": "/dev/null"}]}}]), "too old for deviceNodes hostPath"),
])
def test_invalid_specs(data: bytes, error: str) -> None:
    with pytest.raises(cdi.SpecError, match=error):
        cdi.parse_spec(data, "/etc/cdi/bad.json")


# --- the directories ------------------------------------------------------------------


def test_later_directories_override_earlier_ones(tmp_path: Path) -> None:
    static, dynamic = tmp_path / "etc", tmp_path / "run"
    write(static, "a.json", spec_json(devices=[
        {"name": "g0", "containerEdits": {"env": ["FROM=static"]}},
        {"name": "g1", "containerEdits": {"env": ["FROM=static"]}}]))
    write(dynamic, "b.yaml", spec_json(devices=[
        {"name": "g0", "containerEdits": {"env": ["FROM=dynamic"]}}]))
    write(static, "notes.txt", b"not a spec")
    (static / "sub.json").mkdir()
    registry = cdi.load([str(static), str(dynamic), str(tmp_path / "missing")])
    assert registry.errors == {}
    resolved = registry.resolve(["vendor.com/gpu=g0", "vendor.com/gpu=g1"])
    assert [(label.split(" ")[1], e.env) for label, e in resolved] == [
        ("spec", ()), ("device", ("FROM=dynamic",)), ("spec", ()), ("device", ("FROM=static",))]


def test_a_device_two_files_of_one_directory_define_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.json", spec_json())
    write(tmp_path, "b.json", spec_json())
    registry = cdi.load([str(tmp_path)])
    with pytest.raises(NotFoundError, match="ambiguous: defined in both .*a.json and .*b.json"):
        registry.resolve(["vendor.com/gpu=g0"])


def test_unknown_devices_and_kinds_name_what_was_searched(tmp_path: Path) -> None:
    good = write(tmp_path, "gpu.json", spec_json())
    write(tmp_path, "broken.json", b'{"cdiVersion": "0.6.0"')
    registry = cdi.load([str(tmp_path), "/nonexistent/cdi"])
    assert list(registry.errors) == [str(tmp_path / "broken.json")]
    with pytest.raises(NotFoundError) as info:
        registry.resolve(["vendor.com/gpu=g9", "other.com/fpga=0"])
    message = str(info.value)
    assert f"vendor.com/gpu=g9 (not in {good})" in message
    assert "other.com/fpga=0 (no spec of kind other.com/fpga)" in message
    assert f"spec dirs searched: {tmp_path}, /nonexistent/cdi" in message
    assert "invalid specs skipped: " in message and "broken.json: not valid JSON" in message


# --- applying -------------------------------------------------------------------------


def oci_spec() -> dict[str, Any]:
    return {
        "process": {"user": {"uid": 1000, "gid": 1000, "additionalGids": [1000]},
                    "env": ["PATH=/bin", "GPU=old"]},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc", "options": []},
                   {"destination": "/dev/shm", "type": "bind", "source": "/x", "options": []}],
        "linux": {"devices": [{"path": "/dev/gpu0", "type": "c", "major": 9, "minor": 9}],
                  "resources": {"devices": [{"allow": False, "access": "rwm"}]}},
    }


def test_edits_are_applied_to_the_oci_spec(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    spec = oci_spec()
    edits = cdi.Edits(
        env=("GPU=0", "NEW=1"),
        device_nodes=(cdi.DeviceNode("/dev/gpu0", "/dev/null"),
                      cdi.DeviceNode("/dev/gpu1", "/dev/null", "c", 1, 3, 0o600, "r", 0, 0),
                      cdi.DeviceNode("/dev/quiet", "/dev/null", permissions="none")),
        mounts=(cdi.MountEdit(str(tmp_path / "lib"), "/usr/lib/gpu", "", ("ro", "rbind")),
                cdi.MountEdit(str(tmp_path / "lib"), "/a", "bind", ())),
        hooks=(cdi.HookEdit("createContainer", "/bin/sh", ("sh", "-c", "true"), ("A=1",), 3),),
        additional_gids=(0, 44, 1000))
    cdi.apply(spec, [("CDI device vendor.com/gpu=g0", edits)])
    assert spec["process"]["env"] == ["PATH=/bin", "GPU=0", "NEW=1"]
    assert spec["process"]["user"]["additionalGids"] == [1000, 44]
    devices = spec["linux"]["devices"]
    assert devices == [
        {"path": "/dev/gpu0", "type": "c", "major": os.major(NULL.st_rdev),
         "minor": os.minor(NULL.st_rdev), "uid": 1000, "gid": 1000},
        {"path": "/dev/gpu1", "type": "c", "major": 1, "minor": 3, "fileMode": 0o600,
         "uid": 0, "gid": 0},
        {"path": "/dev/quiet", "type": "c", "major": 1, "minor": 3, "uid": 1000, "gid": 1000},
    ]
    assert spec["linux"]["resources"]["devices"][1:] == [
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "r"},
    ]
    assert [m["destination"] for m in spec["mounts"]] == ["/proc", "/a", "/dev/shm",
                                                          "/usr/lib/gpu"]
    assert spec["mounts"][3] == {"destination": "/usr/lib/gpu", "source": str(tmp_path / "lib"),
                                 "type": "bind", "options": ["ro", "rbind"]}
    assert spec["hooks"] == {"createContainer": [
        {"path": "/bin/sh", "args": ["sh", "-c", "true"], "env": ["A=1"], "timeout": 3}]}


def test_a_cdi_mount_replaces_one_at_the_same_place(tmp_path: Path) -> None:
    spec = oci_spec()
    cdi.apply(spec, [("d", cdi.Edits(mounts=(cdi.MountEdit(str(tmp_path), "/dev/shm/",
                                                           "bind", ("rbind",)),)))])
    assert [m["source"] for m in spec["mounts"] if m["destination"] == "/dev/shm"] == \
        [str(tmp_path)]


@pytest.mark.parametrize(("edits", "error", "code"), [
    (cdi.Edits(device_nodes=(cdi.DeviceNode("/dev/x", "/dev/cripy-missing"),)),
     "host device node /dev/cripy-missing does not exist", NotFoundError),
    (cdi.Edits(device_nodes=(cdi.DeviceNode("/dev/x", "/etc/hostname"),)),
     "is not a device node", FailedPreconditionError),
    (cdi.Edits(device_nodes=(cdi.DeviceNode("/dev/x", "/dev/null", "b"),)),
     "type 'b' but host node /dev/null is 'c'", FailedPreconditionError),
    (cdi.Edits(mounts=(cdi.MountEdit("/cripy/missing", "/x", "", ("bind",)),)),
     "mount hostPath /cripy/missing does not exist", NotFoundError),
    (cdi.Edits(hooks=(cdi.HookEdit("poststart", "/cripy/missing-hook"),)),
     "poststart hook /cripy/missing-hook does not exist", NotFoundError),
    (cdi.Edits(device_nodes=(cdi.DeviceNode("/dev/../etc", "/dev/null"),)),
     "without '..'", InvalidArgumentError),
])
def test_what_cannot_be_applied_is_an_error(edits: cdi.Edits, error: str,
                                            code: type[Exception]) -> None:
    with pytest.raises(code, match=error) as info:
        cdi.apply(oci_spec(), [("CDI device v.com/c=d", edits)])
    assert "CDI device v.com/c=d" in str(info.value)


def test_intel_rdt_needs_resctrl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edits = cdi.Edits(intel_rdt={"closID": "gpu", "l3CacheSchema": "L3:0=f"})
    monkeypatch.setattr(cdi, "RESCTRL", str(tmp_path / "resctrl"))
    with pytest.raises(FailedPreconditionError, match="resctrl, which is not mounted"):
        cdi.apply(oci_spec(), [("d", edits)])
    (tmp_path / "resctrl" / "info").mkdir(parents=True)
    spec = oci_spec()
    cdi.apply(spec, [("d", edits)])
    assert spec["linux"]["intelRdt"] == {"closID": "gpu", "l3CacheSchema": "L3:0=f"}


def test_inject_resolves_and_applies(tmp_path: Path) -> None:
    write(tmp_path, "gpu.yaml", spec_json(containerEdits={"env": ["COMMON=1"]}))
    spec = oci_spec()
    config = pb.ContainerConfig(annotations={"cdi.k8s.io/x": "vendor.com/gpu=g0"})
    cdi.inject(spec, config, [str(tmp_path)])
    assert spec["process"]["env"][-2:] == ["COMMON=1", "GPU=0"]
    untouched = oci_spec()
    cdi.inject(untouched, pb.ContainerConfig(), ["/nonexistent"])  # nothing asked: no reads
    assert untouched == oci_spec()


def test_spec_dirs_are_configured_absolute() -> None:
    assert Config().cdi.spec_dirs == ["/etc/cdi", "/var/run/cdi"]
    assert from_dict({"cdi": {"spec_dirs": ["/opt/cdi"]}}).cdi.spec_dirs == ["/opt/cdi"]
    with pytest.raises(ConfigError, match="cdi.spec_dirs: 'cdi' is not an absolute path"):
        from_dict({"cdi": {"spec_dirs": ["cdi"]}})

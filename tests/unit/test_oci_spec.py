"""Tests for cripy.oci.spec: OCI runtime specs from CRI configs (tests/host runs one in
runc)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cripy.oci import spec as spec_mod
from cripy.oci.apparmor import AppArmorHost
from cripy.oci.features import Feature, HandlerFeatures
from cripy.oci.idmap import IDMap
from cripy.oci.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_MASKED_PATHS,
    DEFAULT_READONLY_PATHS,
    SpecContext,
    available_capabilities,
    build_container_spec,
    build_infra_spec,
    cgroups_path,
    resources_to_oci,
    validate_log_path,
)
from cripy.oci.userns import PodUserns

SC = pb.LinuxContainerSecurityContext
RUNTIME_DEFAULT = pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
REAL_SOURCE_MOUNT = spec_mod._source_mount  # before the autouse fixture replaces it


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nstaff:x:50:app\n")
    return root


@pytest.fixture
def ctx(rootfs: Path, tmp_path: Path) -> SpecContext:
    pod = tmp_path / "pod"
    pod.mkdir()
    for name, text in (("hostname", "mypod\n"), ("hosts", ""), ("resolv.conf", "")):
        (pod / name).write_text(text)
    return SpecContext(
        container_id="c1",
        sandbox_id="s1",
        rootfs=rootfs,
        network_ns="/run/cripy/ns/net-s1",
        ipc_ns="/run/cripy/ns/ipc-s1",
        uts_ns="/run/cripy/ns/uts-s1",
        pod_pid_ns="/proc/4242/ns/pid",
        pod_files={
            "/etc/hostname": str(pod / "hostname"),
            "/etc/hosts": str(pod / "hosts"),
            "/etc/resolv.conf": str(pod / "resolv.conf"),
        },
        shm_path=str(pod / "shm"),
    )


@pytest.fixture(autouse=True)
def _stable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host facts the spec depends on, fixed so the tests do not depend on this machine."""
    monkeypatch.setattr(spec_mod, "_swap_accounting", lambda v2: True)
    monkeypatch.setattr(spec_mod, "_source_mount", lambda path: ("/", {"shared"}))


def container(
    sc: pb.LinuxContainerSecurityContext | None = None,
    resources: pb.LinuxContainerResources | None = None,
    **kw: Any,
) -> pb.ContainerConfig:
    kw.setdefault("metadata", pb.ContainerMetadata(name="web"))
    kw.setdefault("command", ["/bin/true"])
    linux = pb.LinuxContainerConfig(security_context=sc or SC())
    if resources is not None:
        linux.resources.CopyFrom(resources)
    return pb.ContainerConfig(linux=linux, **kw)


def sandbox(privileged: bool = False, **kw: Any) -> pb.PodSandboxConfig:
    kw.setdefault("metadata", pb.PodSandboxMetadata(name="pod", namespace="ns", uid="u1"))
    linux = kw.pop("linux", pb.LinuxPodSandboxConfig())
    linux.security_context.privileged = privileged
    return pb.PodSandboxConfig(linux=linux, **kw)


def build(
    ctx: SpecContext,
    config: pb.ContainerConfig | None = None,
    image: dict[str, Any] | None = None,
    sb: pb.PodSandboxConfig | None = None,
) -> dict[str, Any]:
    spec = build_container_spec(
        config or container(), sb or sandbox(), {"config": image or {}}, ctx
    )
    json.dumps(spec)  # always serialisable
    return spec


def mount_at(spec: dict[str, Any], dest: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [m for m in spec["mounts"] if m["destination"] == dest]
    assert len(found) == 1, (dest, found)
    return found[0]


# --- process ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "entrypoint", "cmd", "expected"),
    [
        ([], [], ["/ep"], ["c1", "c2"], ["/ep", "c1", "c2"]),
        (["/x"], [], ["/ep"], ["c1"], ["/x"]),
        ([], ["a"], ["/ep"], ["c1"], ["/ep", "a"]),
        (["/x"], ["a"], ["/ep"], ["c1"], ["/x", "a"]),
        ([], [], None, ["c1"], ["c1"]),
        ([], ["a", "b"], None, ["c1"], ["a", "b"]),
        (["/x", "-y"], [], None, None, ["/x", "-y"]),
    ],
)
def test_args_merging(
    ctx: SpecContext,
    command: list[str],
    args: list[str],
    entrypoint: list[str] | None,
    cmd: list[str] | None,
    expected: list[str],
) -> None:
    cfg = container(command=command, args=args)
    spec = build(ctx, cfg, {"Entrypoint": entrypoint, "Cmd": cmd})
    assert spec["process"]["args"] == expected


def test_no_command(ctx: SpecContext) -> None:
    with pytest.raises(InvalidArgumentError, match="no command specified"):
        build(ctx, container(command=[]), {"Entrypoint": None, "Cmd": []})


@pytest.mark.parametrize(
    "image",
    [
        {"Entrypoint": "/bin/sh"},
        {"Cmd": [1, 2]},
        {"Env": "A=1"},
        {"WorkingDir": 5},
        {"User": ["root"]},
    ],
)
def test_hostile_image_config(ctx: SpecContext, image: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError, match="image config"):
        build(ctx, container(), image)


def test_image_config_not_object(ctx: SpecContext) -> None:
    with pytest.raises(InvalidArgumentError):
        build_container_spec(container(), sandbox(), {"config": ["x"]}, ctx)


def test_nul_in_args(ctx: SpecContext) -> None:
    with pytest.raises(InvalidArgumentError, match="NUL"):
        build(ctx, container(args=["a\x00b"]))


def test_env_merge(ctx: SpecContext) -> None:
    cfg = container(envs=[pb.KeyValue(key="A", value="x"), pb.KeyValue(key="C", value="3=3")])
    spec = build(ctx, cfg, {"Env": ["PATH=/img/bin", "A=1", "B=2", "garbage", "=x"]})
    assert spec["process"]["env"] == [
        "HOSTNAME=mypod",
        "PATH=/img/bin",
        "A=x",
        "B=2",
        "C=3=3",
    ]


def test_env_default_path_and_hostname_override(ctx: SpecContext) -> None:
    cfg = container(envs=[pb.KeyValue(key="HOSTNAME", value="mine")])
    env = build(ctx, cfg)["process"]["env"]
    assert env == ["HOSTNAME=mine", f"PATH={spec_mod.DEFAULT_PATH}"]


@pytest.mark.parametrize("key", ["", "A=B", "A\x00"])
def test_bad_env_key(ctx: SpecContext, key: str) -> None:
    with pytest.raises(InvalidArgumentError, match="env key"):
        build(ctx, container(envs=[pb.KeyValue(key=key, value="v")]))


def test_cwd(ctx: SpecContext) -> None:
    assert build(ctx)["process"]["cwd"] == "/"
    assert build(ctx, image={"WorkingDir": "/srv"})["process"]["cwd"] == "/srv"
    assert build(ctx, image={"WorkingDir": "srv"})["process"]["cwd"] == "/srv"
    cfg = container(working_dir="/work")
    assert build(ctx, cfg, {"WorkingDir": "/srv"})["process"]["cwd"] == "/work"
    with pytest.raises(InvalidArgumentError, match="working_dir"):
        build(ctx, container(working_dir="rel"))


def test_terminal_and_no_new_privs(ctx: SpecContext) -> None:
    spec = build(ctx, container(tty=True, sc=SC(no_new_privs=True)))
    assert spec["process"]["terminal"] is True
    assert spec["process"]["noNewPrivileges"] is True
    spec = build(ctx)
    assert spec["process"]["terminal"] is False
    assert spec["process"]["noNewPrivileges"] is False


def test_root_and_annotations(ctx: SpecContext) -> None:
    cfg = container(annotations={"a": "b", "io.kubernetes.cri.container-type": "spoof"})
    spec = build(ctx, cfg)
    assert spec["ociVersion"] == "1.0.2"
    assert spec["root"] == {"path": str(ctx.rootfs), "readonly": False}
    assert spec["annotations"]["a"] == "b"
    assert spec["annotations"]["io.kubernetes.cri.container-type"] == "container"
    assert spec["annotations"]["io.kubernetes.cri.sandbox-id"] == "s1"
    assert spec["annotations"]["io.kubernetes.cri.container-name"] == "web"
    assert "hostname" not in spec
    ro = build(ctx, container(sc=SC(readonly_rootfs=True)))
    assert ro["root"]["readonly"] is True


# --- user ------------------------------------------------------------------------------


def test_user_from_image(ctx: SpecContext) -> None:
    user = build(ctx, image={"User": "app"})["process"]["user"]
    assert user == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 50]}


def test_user_from_security_context(ctx: SpecContext) -> None:
    sc = SC(
        run_as_user=pb.Int64Value(value=1000),
        run_as_group=pb.Int64Value(value=7),
        supplemental_groups=[9],
    )
    user = build(ctx, container(sc=sc), {"User": "root"})["process"]["user"]
    assert user == {"uid": 1000, "gid": 7, "additionalGids": [7, 50, 9]}
    strict = SC(run_as_username="app", supplemental_groups_policy=pb.Strict)
    assert build(ctx, container(sc=strict))["process"]["user"]["additionalGids"] == [1000]


def test_unknown_username(ctx: SpecContext) -> None:
    with pytest.raises(NotFoundError, match="'nobody'"):
        build(ctx, container(sc=SC(run_as_username="nobody")))


def test_hostile_passwd_symlink(ctx: SpecContext, tmp_path: Path) -> None:
    host = tmp_path / "host_passwd"
    host.write_text("evil:x:0:0::/:/bin/sh\n")
    passwd = ctx.rootfs / "etc" / "passwd"
    passwd.unlink()
    passwd.symlink_to("../../../../../../../../" + str(host))
    with pytest.raises(NotFoundError):
        build(ctx, image={"User": "evil"})
    assert build(ctx, image={"User": "1000"})["process"]["user"]["uid"] == 1000


# --- capabilities ----------------------------------------------------------------------


def caps_of(ctx: SpecContext, sc: pb.LinuxContainerSecurityContext, **kw: Any) -> Any:
    return build(ctx, container(sc=sc), **kw)["process"]["capabilities"]


def test_default_capabilities(ctx: SpecContext) -> None:
    caps = caps_of(ctx, SC())
    for key in ("bounding", "effective", "permitted"):
        assert sorted(caps[key]) == sorted(DEFAULT_CAPABILITIES)
    assert caps["inheritable"] == [] and caps["ambient"] == []


def test_add_drop(ctx: SpecContext) -> None:
    sc = SC(
        capabilities=pb.Capability(
            add_capabilities=["NET_ADMIN", "CAP_SYS_TIME", "sys_ptrace"],
            drop_capabilities=["chown", "CAP_KILL"],
        )
    )
    caps = caps_of(ctx, sc)
    expected = (set(DEFAULT_CAPABILITIES) | {"CAP_NET_ADMIN", "CAP_SYS_TIME", "CAP_SYS_PTRACE"}) - {
        "CAP_CHOWN",
        "CAP_KILL",
    }
    assert set(caps["bounding"]) == expected == set(caps["effective"])


def test_add_all_drop_one(ctx: SpecContext) -> None:
    sc = SC(capabilities=pb.Capability(add_capabilities=["ALL"], drop_capabilities=["CHOWN"]))
    caps = caps_of(ctx, sc)
    assert set(caps["bounding"]) == set(available_capabilities()) - {"CAP_CHOWN"}


def test_drop_all_add_some(ctx: SpecContext) -> None:
    sc = SC(
        capabilities=pb.Capability(drop_capabilities=["all"], add_capabilities=["NET_BIND_SERVICE"])
    )
    caps = caps_of(ctx, sc)
    assert caps["bounding"] == caps["effective"] == ["CAP_NET_BIND_SERVICE"]


def test_drop_wins_over_add(ctx: SpecContext) -> None:
    sc = SC(
        capabilities=pb.Capability(add_capabilities=["NET_ADMIN"], drop_capabilities=["NET_ADMIN"])
    )
    assert "CAP_NET_ADMIN" not in caps_of(ctx, sc)["bounding"]


@pytest.mark.parametrize(
    "field", ["add_capabilities", "drop_capabilities", "add_ambient_capabilities"]
)
def test_unknown_capability(ctx: SpecContext, field: str) -> None:
    sc = SC(capabilities=pb.Capability(**{field: ["CAP_TIME_TRAVEL"]}))
    with pytest.raises(InvalidArgumentError, match="CAP_TIME_TRAVEL"):
        caps_of(ctx, sc)


def test_non_root_loses_effective(ctx: SpecContext) -> None:
    caps = caps_of(ctx, SC(run_as_user=pb.Int64Value(value=1000)))
    assert caps["effective"] == caps["permitted"] == []
    assert sorted(caps["bounding"]) == sorted(DEFAULT_CAPABILITIES)


def test_ambient(ctx: SpecContext) -> None:
    sc = SC(
        run_as_user=pb.Int64Value(value=1000),
        capabilities=pb.Capability(
            drop_capabilities=["ALL"], add_ambient_capabilities=["NET_BIND_SERVICE"]
        ),
    )
    caps = caps_of(ctx, sc)
    for key in ("bounding", "effective", "permitted", "inheritable", "ambient"):
        assert caps[key] == ["CAP_NET_BIND_SERVICE"], key
    with pytest.raises(InvalidArgumentError, match="ALL"):
        caps_of(ctx, SC(capabilities=pb.Capability(add_ambient_capabilities=["ALL"])))


def test_image_non_root_user_loses_effective(ctx: SpecContext) -> None:
    caps = caps_of(ctx, SC(), image={"User": "app"})
    assert caps["effective"] == []


# --- privileged ------------------------------------------------------------------------


def test_privileged(ctx: SpecContext) -> None:
    sc = SC(privileged=True, seccomp=RUNTIME_DEFAULT, masked_paths=["/proc/x"])
    spec = build(ctx, container(sc=sc), sb=sandbox(privileged=True))
    assert set(spec["process"]["capabilities"]["bounding"]) == set(available_capabilities())
    linux = spec["linux"]
    assert "seccomp" not in linux
    assert "maskedPaths" not in linux and "readonlyPaths" not in linux
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    null = [d for d in linux["devices"] if d["path"] == "/dev/null"]
    assert null and null[0]["type"] == "c" and (null[0]["major"], null[0]["minor"]) == (1, 3)
    assert not any(d["path"].startswith("/dev/pts/") for d in linux["devices"])
    assert "rw" in mount_at(spec, "/sys")["options"]
    assert "rw" in mount_at(spec, "/sys/fs/cgroup")["options"]


def test_privileged_needs_privileged_sandbox(ctx: SpecContext) -> None:
    with pytest.raises(InvalidArgumentError, match="privileged"):
        build(ctx, container(sc=SC(privileged=True)))


def test_host_devices_skips_unusual(tmp_path: Path) -> None:
    (tmp_path / "pts").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to("/dev/null")
    assert spec_mod.host_devices(str(tmp_path)) == []


# --- devices ---------------------------------------------------------------------------


def test_default_device_rules(ctx: SpecContext) -> None:
    spec = build(ctx)
    rules = spec["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    allowed = {(r.get("major"), r.get("minor")) for r in rules[1:] if r["access"] == "rwm"}
    assert {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2), (136, None)} <= allowed
    assert spec["linux"]["devices"] == []


def test_config_devices(ctx: SpecContext) -> None:
    cfg = container(
        devices=[
            pb.Device(container_path="/dev/mynull", host_path="/dev/null", permissions="rw"),
            pb.Device(container_path="/dev/zero2", host_path="/dev/zero", permissions=""),
        ]
    )
    spec = build(ctx, cfg)
    devs = {d["path"]: d for d in spec["linux"]["devices"]}
    assert devs["/dev/mynull"]["type"] == "c"
    assert (devs["/dev/mynull"]["major"], devs["/dev/mynull"]["minor"]) == (1, 3)
    assert (devs["/dev/zero2"]["major"], devs["/dev/zero2"]["minor"]) == (1, 5)
    rules = spec["linux"]["resources"]["devices"]
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"} in rules
    assert {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"} in rules


@pytest.mark.parametrize(
    ("device", "error"),
    [
        (
            pb.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwx"),
            "permissions",
        ),
        (
            pb.Device(container_path="/dev/x", host_path="/dev/null", permissions="rr"),
            "permissions",
        ),
        (
            pb.Device(container_path="dev/x", host_path="/dev/null", permissions="r"),
            "container_path",
        ),
        (pb.Device(container_path="/dev/../x", host_path="/dev/null"), "container_path"),
        (pb.Device(container_path="/dev/x", host_path="null"), "host_path"),
        (pb.Device(container_path="/dev/x", host_path="/etc/hostname"), "not a device"),
    ],
)
def test_bad_devices(ctx: SpecContext, device: pb.Device, error: str) -> None:
    with pytest.raises(InvalidArgumentError, match=error):
        build(ctx, container(devices=[device]))


def test_missing_device(ctx: SpecContext) -> None:
    cfg = container(devices=[pb.Device(container_path="/dev/x", host_path="/dev/cripy-nope")])
    with pytest.raises(NotFoundError, match="cripy-nope"):
        build(ctx, cfg)


# --- mounts ----------------------------------------------------------------------------


def test_default_mounts(ctx: SpecContext) -> None:
    spec = build(ctx)
    dests = [m["destination"] for m in spec["mounts"]]
    for d in ("/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/dev/shm"):
        assert d in dests
    assert mount_at(spec, "/sys")["options"][-1] == "ro"
    assert mount_at(spec, "/sys/fs/cgroup")["type"] == "cgroup"
    shm = mount_at(spec, "/dev/shm")
    assert shm["source"] == ctx.shm_path and "rprivate" in shm["options"]
    hosts = mount_at(spec, "/etc/hosts")
    assert hosts["source"] == ctx.pod_files["/etc/hosts"] and "rw" in hosts["options"]
    assert "rootfsPropagation" not in spec["linux"]


def test_host_shm_and_readonly_pod_files(ctx: SpecContext) -> None:
    ctx.shm_path = None
    spec = build(ctx, container(sc=SC(readonly_rootfs=True)))
    assert mount_at(spec, "/dev/shm")["source"] == "/dev/shm"
    assert "ro" in mount_at(spec, "/etc/resolv.conf")["options"]


def test_cri_mounts_and_propagation(ctx: SpecContext, tmp_path: Path) -> None:
    cfg = container(
        mounts=[
            pb.Mount(container_path="/data/sub", host_path=str(tmp_path), readonly=True),
            pb.Mount(
                container_path="/data",
                host_path=str(tmp_path),
                propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
            ),
        ]
    )
    spec = build(ctx, cfg)
    assert mount_at(spec, "/data/sub") == {
        "destination": "/data/sub",
        "type": "bind",
        "source": str(tmp_path),
        "options": ["rbind", "rprivate", "ro"],
    }
    assert mount_at(spec, "/data")["options"] == ["rbind", "rslave", "rw"]
    dests = [m["destination"] for m in spec["mounts"]]
    assert dests.index("/data") < dests.index("/data/sub")
    assert spec["linux"]["rootfsPropagation"] == "rslave"

    bidi = container(
        mounts=[
            pb.Mount(
                container_path="/a",
                host_path=str(tmp_path),
                propagation=pb.PROPAGATION_BIDIRECTIONAL,
            ),
            pb.Mount(
                container_path="/b",
                host_path=str(tmp_path),
                propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
            ),
        ]
    )
    spec = build(ctx, bidi)
    assert "rshared" in mount_at(spec, "/a")["options"]
    assert spec["linux"]["rootfsPropagation"] == "rshared"


def test_parents_before_children(ctx: SpecContext, tmp_path: Path) -> None:
    paths = ["/x/y/z", "/dev/shm/inner", "/x", "/x/y"]
    cfg = container(mounts=[pb.Mount(container_path=p, host_path=str(tmp_path)) for p in paths])
    dests = [m["destination"] for m in build(ctx, cfg)["mounts"]]
    for i, d in enumerate(dests):
        for later in dests[i + 1 :]:
            assert not d.startswith(later + "/"), (d, later)


def test_propagation_needs_shared_source(
    ctx: SpecContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spec_mod, "_source_mount", lambda path: ("/srv", set()))
    for prop in (pb.PROPAGATION_BIDIRECTIONAL, pb.PROPAGATION_HOST_TO_CONTAINER):
        cfg = container(
            mounts=[pb.Mount(container_path="/a", host_path=str(tmp_path), propagation=prop)]
        )
        with pytest.raises(FailedPreconditionError, match="/srv"):
            build(ctx, cfg)
    monkeypatch.setattr(spec_mod, "_source_mount", lambda path: ("/srv", {"master"}))
    cfg = container(
        mounts=[
            pb.Mount(
                container_path="/a",
                host_path=str(tmp_path),
                propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
            )
        ]
    )
    assert build(ctx, cfg)["linux"]["rootfsPropagation"] == "rslave"


def test_source_mount_reads_mountinfo() -> None:
    found = REAL_SOURCE_MOUNT("/proc/self")
    assert found is not None and found[0] == "/proc"


def test_cri_mount_replaces_default(ctx: SpecContext, tmp_path: Path) -> None:
    hosts = tmp_path / "myhosts"
    hosts.write_text("")
    cfg = container(
        mounts=[
            pb.Mount(container_path="/etc/hosts", host_path=str(hosts)),
            pb.Mount(container_path="/dev/shm", host_path=str(tmp_path)),
        ]
    )
    spec = build(ctx, cfg)
    assert mount_at(spec, "/etc/hosts")["source"] == str(hosts)
    assert mount_at(spec, "/dev/shm")["source"] == str(tmp_path)


def test_cri_dev_mount_replaces_dev_tree(ctx: SpecContext, tmp_path: Path) -> None:
    cfg = container(mounts=[pb.Mount(container_path="/dev", host_path=str(tmp_path))])
    dests = [m["destination"] for m in build(ctx, cfg)["mounts"]]
    assert "/dev" in dests and not any(d.startswith("/dev/") for d in dests)


def test_rro(ctx: SpecContext, tmp_path: Path) -> None:
    m = pb.Mount(
        container_path="/a", host_path=str(tmp_path), readonly=True, recursive_read_only=True
    )
    able = dataclasses.replace(ctx, handler="crun", features=HandlerFeatures(
        recursive_read_only=Feature(True)))
    assert mount_at(build(able, container(mounts=[m])), "/a")["options"] == [
        "rbind",
        "rprivate",
        "ro",
        "rro",
    ]
    unable = dataclasses.replace(ctx, handler="old", features=HandlerFeatures(
        recursive_read_only=Feature(False, "old 0.1 does not list the 'rro' mount option")))
    with pytest.raises(FailedPreconditionError,
                       match="runtime handler 'old' cannot make recursive read-only mounts "
                             "here: old 0.1 does not list the 'rro'"):
        build(unable, container(mounts=[m]))


def test_mount_path_normalised(ctx: SpecContext, tmp_path: Path) -> None:
    cfg = container(mounts=[pb.Mount(container_path="//a/./b/", host_path=str(tmp_path))])
    assert mount_at(build(ctx, cfg), "/a/b")["source"] == str(tmp_path)


@pytest.mark.parametrize(
    ("container_path", "host_path", "error", "match"),
    [
        (
            "a/../b",
            "HOST",
            InvalidArgumentError,
            "mount container_path 'a/../b' must be an absolute path",
        ),
        ("/a/../b", "HOST", InvalidArgumentError, "without '..'"),
        ("/..", "HOST", InvalidArgumentError, "without '..'"),
        ("", "HOST", InvalidArgumentError, "container_path"),
        ("/a\x00b", "HOST", InvalidArgumentError, "container_path"),
        ("/", "HOST", InvalidArgumentError, "rootfs"),
        ("/proc", "HOST", InvalidArgumentError, "/proc"),
        ("/proc/sys/kernel", "HOST", InvalidArgumentError, "/proc"),
        ("/a", "relative/dir", InvalidArgumentError, "host_path"),
        ("/a", "", InvalidArgumentError, "host_path"),
        ("/a", "/cripy/does/not/exist", NotFoundError, "does not exist"),
    ],
)
def test_hostile_mounts(
    ctx: SpecContext,
    tmp_path: Path,
    container_path: str,
    host_path: str,
    error: type[Exception],
    match: str,
) -> None:
    host = str(tmp_path) if host_path == "HOST" else host_path
    cfg = container(mounts=[pb.Mount(container_path=container_path, host_path=host)])
    with pytest.raises(error, match=match):
        build(ctx, cfg)


def test_proc_file_mount_allowed(ctx: SpecContext, tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("")
    cfg = container(mounts=[pb.Mount(container_path="/proc/meminfo", host_path=str(f))])
    assert mount_at(build(ctx, cfg), "/proc/meminfo")["source"] == str(f)


@pytest.mark.parametrize(
    ("mount", "match"),
    [
        (pb.Mount(container_path="/img", image=pb.ImageSpec(image="busybox")), "image volumes"),
        (
            pb.Mount(container_path="/a", host_path="/tmp", uidMappings=[pb.IDMapping(length=1)]),
            "per-mount uidMappings",
        ),
        (
            pb.Mount(container_path="/a", host_path="/tmp", recursive_read_only=True),
            "recursive_read_only",
        ),
        (
            pb.Mount(
                container_path="/a",
                host_path="/tmp",
                readonly=True,
                recursive_read_only=True,
                propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
            ),
            "recursive_read_only",
        ),
    ],
)
def test_unsupported_mounts(ctx: SpecContext, mount: pb.Mount, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        build(ctx, container(mounts=[mount]))


def test_duplicate_mounts(ctx: SpecContext, tmp_path: Path) -> None:
    m = pb.Mount(container_path="/a", host_path=str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="twice"):
        build(ctx, container(mounts=[m, m]))


# --- namespaces ------------------------------------------------------------------------


def ns_of(spec: dict[str, Any]) -> dict[str, str | None]:
    return {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}


def pid_mode(mode: pb.NamespaceMode, target: str = "") -> pb.LinuxContainerSecurityContext:
    return SC(namespace_options=pb.NamespaceOption(pid=mode, target_id=target))


def test_namespaces_pod(ctx: SpecContext) -> None:
    assert ns_of(build(ctx, container(sc=pid_mode(pb.POD)))) == {
        "mount": None,
        "network": "/run/cripy/ns/net-s1",
        "ipc": "/run/cripy/ns/ipc-s1",
        "uts": "/run/cripy/ns/uts-s1",
        "pid": "/proc/4242/ns/pid",
    }


def test_namespaces_modes(ctx: SpecContext) -> None:
    assert ns_of(build(ctx, container(sc=pid_mode(pb.CONTAINER))))["pid"] is None
    assert "pid" in ns_of(build(ctx, container(sc=pid_mode(pb.CONTAINER))))
    assert "pid" not in ns_of(build(ctx, container(sc=pid_mode(pb.NODE))))
    ctx.target_pid_ns = "/proc/77/ns/pid"
    assert ns_of(build(ctx, container(sc=pid_mode(pb.TARGET, "t"))))["pid"] == "/proc/77/ns/pid"


def test_namespace_errors(ctx: SpecContext) -> None:
    with pytest.raises(FailedPreconditionError, match="'t'"):
        build(ctx, container(sc=pid_mode(pb.TARGET, "t")))
    ctx.pod_pid_ns = None
    with pytest.raises(FailedPreconditionError, match="POD"):
        build(ctx, container(sc=pid_mode(pb.POD)))
    userns = SC(
        namespace_options=pb.NamespaceOption(
            pid=pb.CONTAINER, userns_options=pb.UserNamespace(mode=pb.POD)
        )
    )
    with pytest.raises(InvalidArgumentError, match="its pod has no user namespace"):
        build(ctx, container(sc=userns))


def test_host_namespaces(ctx: SpecContext) -> None:
    ctx.network_ns = ctx.ipc_ns = ctx.uts_ns = None
    spec = build(ctx, container(sc=pid_mode(pb.NODE)))
    assert ns_of(spec) == {"mount": None}
    assert "hostname" not in spec


def test_cgroup_namespace_on_v2(ctx: SpecContext) -> None:
    ctx.cgroup_v2 = True
    assert "cgroup" in ns_of(build(ctx))
    assert "cgroup" not in ns_of(
        build(ctx, container(sc=SC(privileged=True)), sb=sandbox(privileged=True))
    )


# --- resources -------------------------------------------------------------------------


def test_resources(ctx: SpecContext) -> None:
    res = pb.LinuxContainerResources(
        cpu_shares=512,
        cpu_quota=50000,
        cpu_period=100000,
        cpuset_cpus="0-2,4",
        cpuset_mems="0",
        memory_limit_in_bytes=1 << 30,
        hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=1 << 21)],
        oom_score_adj=100,
    )
    spec = build(ctx, container(resources=res))
    r = spec["linux"]["resources"]
    assert r["cpu"] == {
        "shares": 512,
        "quota": 50000,
        "period": 100000,
        "cpus": "0-2,4",
        "mems": "0",
    }
    assert r["memory"] == {"limit": 1 << 30, "swap": 1 << 30}
    assert r["hugepageLimits"] == [{"pageSize": "2MB", "limit": 1 << 21}]
    assert spec["process"]["oomScoreAdj"] == 100
    assert spec["linux"]["cgroupsPath"] == "/cripy/cripy-c1"


def test_swap(ctx: SpecContext, monkeypatch: pytest.MonkeyPatch) -> None:
    res = pb.LinuxContainerResources(memory_limit_in_bytes=100, memory_swap_limit_in_bytes=300)
    assert resources_to_oci(res, False)["memory"] == {"limit": 100, "swap": 300}
    with pytest.raises(InvalidArgumentError, match="memory_swap_limit_in_bytes 50"):
        resources_to_oci(
            pb.LinuxContainerResources(memory_limit_in_bytes=100, memory_swap_limit_in_bytes=50),
            False,
        )
    monkeypatch.setattr(spec_mod, "_swap_accounting", lambda v2: False)
    assert resources_to_oci(res, False)["memory"] == {"limit": 100}


def test_no_resources_means_unset(ctx: SpecContext) -> None:
    spec = build(ctx)
    assert set(spec["linux"]["resources"]) == {"devices"}
    assert "oomScoreAdj" not in spec["process"]


@pytest.mark.parametrize(
    "field",
    [
        "cpu_shares",
        "cpu_quota",
        "cpu_period",
        "memory_limit_in_bytes",
        "memory_swap_limit_in_bytes",
    ],
)
def test_negative_resources(ctx: SpecContext, field: str) -> None:
    res = pb.LinuxContainerResources()
    setattr(res, field, -5)
    with pytest.raises(InvalidArgumentError, match=f"{field} -5"):
        build(ctx, container(resources=res))


@pytest.mark.parametrize(
    "res",
    [
        pb.LinuxContainerResources(cpuset_cpus="0-2;rm -rf"),
        pb.LinuxContainerResources(cpuset_mems="a"),
        pb.LinuxContainerResources(hugepage_limits=[pb.HugepageLimit(page_size="../x", limit=1)]),
        pb.LinuxContainerResources(oom_score_adj=1001),
        pb.LinuxContainerResources(oom_score_adj=-1001),
    ],
)
def test_bad_resources(ctx: SpecContext, res: pb.LinuxContainerResources) -> None:
    with pytest.raises(InvalidArgumentError):
        build(ctx, container(resources=res))


def test_unified(ctx: SpecContext) -> None:
    res = pb.LinuxContainerResources(unified={"memory.high": "1000"})
    with pytest.raises(InvalidArgumentError, match="cgroup v2"):
        build(ctx, container(resources=res))
    ctx.cgroup_v2 = True
    assert build(ctx, container(resources=res))["linux"]["resources"]["unified"] == {
        "memory.high": "1000"
    }
    for key in ("../../etc/passwd", "memory.high/x", ""):
        bad = pb.LinuxContainerResources(unified={key: "1"})
        with pytest.raises(InvalidArgumentError, match="unified"):
            build(ctx, container(resources=bad))


def test_oom_clamp(ctx: SpecContext, caplog: pytest.LogCaptureFixture) -> None:
    ctx.oom_score_adj_min = -500
    with caplog.at_level(logging.WARNING, logger="cripy.oci.spec"):
        spec = build(ctx, container(resources=pb.LinuxContainerResources(oom_score_adj=-999)))
    assert spec["process"]["oomScoreAdj"] == -500
    assert "-999" in caplog.text and "-500" in caplog.text


# --- sysctls ---------------------------------------------------------------------------


def with_sysctls(sysctls: dict[str, str]) -> pb.PodSandboxConfig:
    return sandbox(linux=pb.LinuxPodSandboxConfig(sysctls=sysctls))


def test_sysctls(ctx: SpecContext) -> None:
    sysctls = {
        "net.ipv4.ip_forward": "1",
        "net/ipv4/ip_unprivileged_port_start": "0",
        "kernel.shmmax": "1000",
        "kernel.msgmax": "10",
        "kernel.sem": "1 2 3 4",
        "fs.mqueue.msg_max": "5",
    }
    assert build(ctx, sb=with_sysctls(sysctls))["linux"]["sysctl"] == sysctls
    assert "sysctl" not in build(ctx)["linux"]


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("kernel.panic", "not namespaced"),
        ("vm.swappiness", "not namespaced"),
        ("kernel.semx", "not namespaced"),
        ("net.../../../x", "not a valid name"),
        ("net.ipv4\n", "not a valid name"),
    ],
)
def test_bad_sysctls(ctx: SpecContext, key: str, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        build(ctx, sb=with_sysctls({key: "1"}))


def test_sysctls_and_host_namespaces(ctx: SpecContext) -> None:
    ctx.network_ns = None
    with pytest.raises(InvalidArgumentError, match="host network"):
        build(ctx, sb=with_sysctls({"net.core.somaxconn": "1024"}))
    assert build(ctx, sb=with_sysctls({"kernel.shmmni": "1"}))["linux"]["sysctl"]
    ctx.ipc_ns = None
    for key in ("kernel.shmmni", "kernel.sem", "fs.mqueue.queues_max", "kernel.msgmnb"):
        with pytest.raises(InvalidArgumentError, match="host IPC"):
            build(ctx, sb=with_sysctls({key: "1"}))


# --- masked / readonly paths -----------------------------------------------------------


def test_masked_paths(ctx: SpecContext) -> None:
    linux = build(ctx)["linux"]
    assert linux["maskedPaths"] == list(DEFAULT_MASKED_PATHS)
    assert linux["readonlyPaths"] == list(DEFAULT_READONLY_PATHS)
    sc = SC(masked_paths=["/proc/foo"], readonly_paths=["/proc/bar"])
    linux = build(ctx, container(sc=sc))["linux"]
    assert linux["maskedPaths"] == ["/proc/foo"] and linux["readonlyPaths"] == ["/proc/bar"]
    with pytest.raises(InvalidArgumentError, match="masked path"):
        build(ctx, container(sc=SC(masked_paths=["/proc/../etc"])))


# --- apparmor --------------------------------------------------------------------------


def test_apparmor_profile_reaches_the_oci_process(ctx: SpecContext, tmp_path: Path) -> None:
    sys_root = tmp_path / "sys"
    (sys_root / "kernel/security/apparmor").mkdir(parents=True)
    (sys_root / "kernel/security/apparmor/profiles").write_text("mine (enforce)\n")
    assert "apparmorProfile" not in build(ctx)["process"]  # the node has no AppArmor
    ctx.apparmor = AppArmorHost(enabled=True, parser="apparmor_parser", sys_root=sys_root)
    assert build(ctx)["process"]["apparmorProfile"] == "cripy-default"
    mine = SC(apparmor=pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost,
                                          localhost_ref="mine"))
    assert build(ctx, container(sc=mine))["process"]["apparmorProfile"] == "mine"
    privileged = build(ctx, container(sc=SC(privileged=True)), sb=sandbox(privileged=True))
    assert "apparmorProfile" not in privileged["process"]
    with pytest.raises(FailedPreconditionError, match="'other' is not loaded"):
        build(ctx, container(sc=SC(apparmor_profile="localhost/other")))


# --- seccomp ---------------------------------------------------------------------------


def test_seccomp_runtime_default(ctx: SpecContext) -> None:
    sec = build(ctx, container(sc=SC(seccomp=RUNTIME_DEFAULT)))["linux"]["seccomp"]
    assert sec["defaultAction"] == "SCMP_ACT_ERRNO"
    assert any("read" in r["names"] for r in sec["syscalls"])


def test_seccomp_unconfined_and_unset(ctx: SpecContext) -> None:
    assert "seccomp" not in build(ctx)["linux"]
    unconf = SC(seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined))
    assert "seccomp" not in build(ctx, container(sc=unconf))["linux"]
    assert "seccomp" not in build(ctx, container(sc=SC(seccomp_profile_path="unconfined")))["linux"]


def test_seccomp_legacy(ctx: SpecContext, tmp_path: Path) -> None:
    sec = build(ctx, container(sc=SC(seccomp_profile_path="runtime/default")))["linux"]["seccomp"]
    assert sec["defaultAction"] == "SCMP_ACT_ERRNO"
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"defaultAction": "SCMP_ACT_LOG"}))
    sc = SC(seccomp_profile_path=f"localhost/{p}")
    assert build(ctx, container(sc=sc))["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_LOG"
    with pytest.raises(InvalidArgumentError, match="seccomp_profile_path"):
        build(ctx, container(sc=SC(seccomp_profile_path="bogus")))


def localhost(path: str) -> pb.LinuxContainerSecurityContext:
    return SC(
        seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref=path)
    )


def test_seccomp_localhost(ctx: SpecContext, tmp_path: Path) -> None:
    p = tmp_path / "p.json"
    p.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [
                    {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                    {
                        "names": ["mount"],
                        "action": "SCMP_ACT_ALLOW",
                        "includes": {"caps": ["CAP_SYS_ADMIN"]},
                    },
                ],
            }
        )
    )
    sec = build(ctx, container(sc=localhost(str(p))))["linux"]["seccomp"]
    assert sec == {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}],
    }
    admin = localhost(str(p))
    admin.capabilities.add_capabilities.append("SYS_ADMIN")
    assert len(build(ctx, container(sc=admin))["linux"]["seccomp"]["syscalls"]) == 2


def test_seccomp_localhost_errors(ctx: SpecContext, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        build(ctx, container(sc=localhost(str(tmp_path / "missing.json"))))
    for bad in ("relative.json", f"{tmp_path}/../x.json", ""):
        with pytest.raises(InvalidArgumentError):
            build(ctx, container(sc=localhost(bad)))
    notjson = tmp_path / "n.json"
    notjson.write_text("{{{")
    with pytest.raises(InvalidArgumentError, match="JSON"):
        build(ctx, container(sc=localhost(str(notjson))))
    huge = tmp_path / "h.json"
    huge.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "x": "' + "a" * (1 << 20) + '"}')
    with pytest.raises(InvalidArgumentError, match="larger"):
        build(ctx, container(sc=localhost(str(huge))))


# --- cgroups path, log path ------------------------------------------------------------


def test_cgroups_path() -> None:
    assert cgroups_path(sandbox(), "abc") == "/cripy/cripy-abc"
    sb = sandbox(linux=pb.LinuxPodSandboxConfig(cgroup_parent="/kubepods/burstable/podx/"))
    assert cgroups_path(sb, "abc") == "/kubepods/burstable/podx/cripy-abc"
    for parent in ("kubepods.slice", "/kubepods/../../x"):
        with pytest.raises(InvalidArgumentError, match="cgroup_parent"):
            cgroups_path(sandbox(linux=pb.LinuxPodSandboxConfig(cgroup_parent=parent)), "abc")
    with pytest.raises(InvalidArgumentError):
        cgroups_path(sandbox(), "../x")


@pytest.mark.parametrize(
    ("directory", "path", "expected"),
    [
        ("/var/log/pods/ns_pod_uid", "web/0.log", "/var/log/pods/ns_pod_uid/web/0.log"),
        ("/var/log/pods/x", "0.log", "/var/log/pods/x/0.log"),
        ("/var/log/pods/x/", "./a//b.log", "/var/log/pods/x/a/b.log"),
    ],
)
def test_log_path_ok(directory: str, path: str, expected: str) -> None:
    assert validate_log_path(directory, path) == Path(expected)


@pytest.mark.parametrize(
    ("directory", "path", "match"),
    [
        ("var/log/pods", "a.log", "log_directory"),
        ("", "a.log", "log_directory"),
        ("/var/log/../etc", "a.log", "log_directory"),
        ("/var/log/pods", "/etc/passwd", "log_path"),
        ("/var/log/pods", "../../etc/cron.d/x", "log_path"),
        ("/var/log/pods", "a/../../x", "log_path"),
        ("/var/log/pods", "", "log_path"),
        ("/var/log/pods", "dir/", "log_path"),
        ("/var/log/pods", ".", "log_path"),
        ("/var/log/pods", "a\x00b", "log_path"),
    ],
)
def test_log_path_refused(directory: str, path: str, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        validate_log_path(directory, path)


# --- infra -----------------------------------------------------------------------------


def test_infra_spec(ctx: SpecContext, tmp_path: Path) -> None:
    infra = tmp_path / "infra"
    infra.mkdir()
    ctx.oom_score_adj_min = -500
    sb = sandbox(linux=pb.LinuxPodSandboxConfig(sysctls={"net.ipv4.ip_forward": "1"}))
    spec = build_infra_spec(sb, ctx, infra)
    json.dumps(spec)
    p = spec["process"]
    assert p["args"] == ["/catatonit", "-P"]
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}
    assert all(v == [] for v in p["capabilities"].values())
    assert p["noNewPrivileges"] is True and p["oomScoreAdj"] == -500
    assert spec["root"] == {"path": str(infra), "readonly": True}
    linux = spec["linux"]
    assert ns_of(spec) == {
        "mount": None,
        "network": ctx.network_ns,
        "ipc": ctx.ipc_ns,
        "uts": ctx.uts_ns,
        "pid": None,
    }
    assert linux["cgroupsPath"] == "/cripy/cripy-c1"
    assert linux["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert linux["sysctl"] == {"net.ipv4.ip_forward": "1"}
    assert spec["annotations"]["io.kubernetes.cri.container-type"] == "sandbox"
    assert not any(m["destination"].startswith("/etc/") for m in spec["mounts"])
    assert "hostname" not in spec


def test_infra_host_pid_and_user(ctx: SpecContext, tmp_path: Path) -> None:
    sb = sandbox()
    sb.linux.security_context.namespace_options.pid = pb.NODE
    sb.linux.security_context.run_as_user.value = 65535
    spec = build_infra_spec(sb, ctx, tmp_path)
    assert "pid" not in ns_of(spec)
    assert spec["process"]["user"]["uid"] == 65535


# --- user namespaces -----------------------------------------------------------------


def test_a_pod_user_namespace_is_joined_with_its_mappings_and_volumes_idmapped(
        ctx: SpecContext, tmp_path: Path) -> None:
    maps = (IDMap(0, 200000, 65536),)
    inside = dataclasses.replace(ctx, userns=PodUserns(maps, maps, "/pods/p/ns/user"))
    spec = build(inside, container(mounts=[pb.Mount(container_path="/v",
                                                    host_path=str(tmp_path))]))
    linux = spec["linux"]
    assert {"type": "user", "path": "/pods/p/ns/user"} in linux["namespaces"]
    oci_map = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    assert linux["uidMappings"] == linux["gidMappings"] == oci_map
    volume = mount_at(spec, "/v")
    assert volume["uidMappings"] == volume["gidMappings"] == oci_map
    assert "uidMappings" not in mount_at(spec, "/proc")
    # without one, nothing of it
    plain = build(ctx, container())
    assert "uidMappings" not in plain["linux"]
    assert all(n["type"] != "user" for n in plain["linux"]["namespaces"])

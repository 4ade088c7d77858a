"""Tests for cripy.oci.apparmor: field resolution, host probing, the default profile."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.oci.apparmor import (
    DEFAULT_PROFILE,
    DEFAULT_PROFILE_TEXT,
    AppArmorHost,
    Request,
    container_profile,
    prepare_host,
    probe,
    requested,
)
from cripy.oci.runtime import exec_process

SC = pb.LinuxContainerSecurityContext
SP = pb.SecurityProfile


def fake_sys(root: Path, *, enabled: bool = True, profiles: str = "") -> Path:
    """A /sys tree with AppArmor's module parameter and securityfs profile list."""
    (root / "module/apparmor/parameters").mkdir(parents=True)
    (root / "module/apparmor/parameters/enabled").write_text("Y\n" if enabled else "N\n")
    (root / "kernel/security/apparmor").mkdir(parents=True)
    (root / "kernel/security/apparmor/profiles").write_text(profiles)
    return root


@pytest.fixture
def enabled(tmp_path: Path) -> AppArmorHost:
    root = fake_sys(tmp_path / "sys", profiles=(
        f"{DEFAULT_PROFILE} (enforce)\nmy-profile (enforce)\nwith space (complain)\n"
        "/usr/bin/thing (enforce)\n"))
    return AppArmorHost(enabled=True, parser="/usr/sbin/apparmor_parser", sys_root=root)


DISABLED = AppArmorHost()


def profile(kind: pb.SecurityProfile.ProfileType, ref: str = "") -> SC:
    return SC(apparmor=SP(profile_type=kind, localhost_ref=ref))


# --- which field, which request ---------------------------------------------------------


@pytest.mark.parametrize(("sc", "want"), [
    (SC(), None),
    (profile(SP.RuntimeDefault), Request("default")),
    (profile(SP.Unconfined), Request("unconfined")),
    (profile(SP.Localhost, "my-profile"), Request("localhost", "my-profile")),
    (profile(SP.Localhost, "localhost/my-profile"), Request("localhost", "my-profile")),
    (SC(apparmor_profile="runtime/default"), Request("default")),
    (SC(apparmor_profile="unconfined"), Request("unconfined")),
    (SC(apparmor_profile="localhost/my-profile"), Request("localhost", "my-profile")),
    # The newer field wins over the deprecated string.
    (SC(apparmor=SP(profile_type=SP.Unconfined), apparmor_profile="localhost/x"),
     Request("unconfined")),
    (SC(apparmor=SP(profile_type=SP.Localhost, localhost_ref="a"),
        apparmor_profile="unconfined"), Request("localhost", "a")),
])
def test_requested(sc: SC, want: Request | None) -> None:
    assert requested(sc) == want


@pytest.mark.parametrize(("sc", "message"), [
    (SC(apparmor_profile="docker-default"), "apparmor_profile 'docker-default' is not one of"),
    (SC(apparmor_profile="localhost/"), "apparmor_profile: the AppArmor profile name is empty"),
    (SC(apparmor_profile="localhost/a\nb"), "is not a valid AppArmor profile name"),
    (profile(SP.Localhost), "localhost_ref: the AppArmor profile name is empty"),
    (profile(SP.RuntimeDefault, "x"), "localhost_ref 'x' is only valid with profile_type"),
    (SC(apparmor=SP(profile_type=7)), "unknown profile_type 7"),  # type: ignore[arg-type]
])
def test_bad_requests_are_invalid_arguments(sc: SC, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        requested(sc)


# --- what the container runs under ------------------------------------------------------


def test_enabled_host(enabled: AppArmorHost) -> None:
    assert container_profile(SC(), privileged=False, host=enabled) == DEFAULT_PROFILE
    assert container_profile(profile(SP.RuntimeDefault), privileged=False,
                             host=enabled) == DEFAULT_PROFILE
    assert container_profile(profile(SP.Unconfined), privileged=False, host=enabled) is None
    assert container_profile(SC(apparmor_profile="localhost/with space"), privileged=False,
                             host=enabled) == "with space"
    assert container_profile(profile(SP.Localhost, "/usr/bin/thing"), privileged=False,
                             host=enabled) == "/usr/bin/thing"


def test_privileged_runs_unconfined_unless_it_names_a_profile(enabled: AppArmorHost) -> None:
    assert container_profile(SC(), privileged=True, host=enabled) is None
    assert container_profile(profile(SP.RuntimeDefault), privileged=True, host=enabled) is None
    assert container_profile(profile(SP.Localhost, "my-profile"), privileged=True,
                             host=enabled) == "my-profile"


def test_an_unloaded_profile_is_refused_by_name(enabled: AppArmorHost) -> None:
    with pytest.raises(FailedPreconditionError,
                       match="AppArmor profile 'nope' is not loaded on this node"):
        container_profile(SC(apparmor_profile="localhost/nope"), privileged=False, host=enabled)


def test_without_apparmor_the_default_is_unconfined_and_localhost_refused() -> None:
    for sc in (SC(), profile(SP.RuntimeDefault), profile(SP.Unconfined),
               SC(apparmor_profile="runtime/default"), SC(apparmor_profile="unconfined")):
        assert container_profile(sc, privileged=False, host=DISABLED) is None
    for sc in (profile(SP.Localhost, "mine"), SC(apparmor_profile="localhost/mine")):
        with pytest.raises(FailedPreconditionError,
                           match="'mine' was requested, but AppArmor is not enabled on this node"):
            container_profile(sc, privileged=True, host=DISABLED)


def test_an_unavailable_default_profile_is_a_clear_error(enabled: AppArmorHost) -> None:
    broken = AppArmorHost(enabled=True, parser=None, sys_root=enabled.sys_root,
                          default_error="apparmor_parser is not installed")
    with pytest.raises(FailedPreconditionError,
                       match=f"{DEFAULT_PROFILE} .* unavailable on this node: apparmor_parser"):
        container_profile(SC(), privileged=False, host=broken)
    # Asking for nothing in particular keeps working where no profile is needed.
    assert container_profile(SC(), privileged=True, host=broken) is None
    assert container_profile(profile(SP.Localhost, "my-profile"), privileged=False,
                             host=broken) == "my-profile"


# --- probing the host -------------------------------------------------------------------


def test_probe_reads_the_module_parameter_and_securityfs(tmp_path: Path) -> None:
    assert probe(fake_sys(tmp_path / "on")).enabled
    assert not probe(fake_sys(tmp_path / "off", enabled=False)).enabled
    no_securityfs = fake_sys(tmp_path / "nofs")
    shutil.rmtree(no_securityfs / "kernel/security")
    assert not probe(no_securityfs).enabled
    assert not probe(tmp_path / "empty").enabled


def test_this_hosts_apparmor_state_matches_the_kernel() -> None:
    flag = Path("/sys/module/apparmor/parameters/enabled")
    on = flag.exists() and flag.read_text().strip() == "Y"
    assert probe().enabled == (on and Path("/sys/kernel/security/apparmor").is_dir())


def parser() -> str:
    path = shutil.which("apparmor_parser")
    assert path, "apparmor_parser is not installed (scripts/install-deps installs apparmor)"
    return path


def test_the_default_profile_denies_what_it_should() -> None:
    rules = [line.strip() for line in DEFAULT_PROFILE_TEXT.splitlines()]
    assert f"profile {DEFAULT_PROFILE} flags=(attach_disconnected,mediate_deleted) {{" in rules
    for rule in ("deny mount,", "deny /proc/* w,", "deny /sys/firmware/** r,"):
        assert rule in rules
    assert any(r.startswith("deny /proc/{") and "sys" in r for r in rules)
    assert f"ptrace (trace, read, tracedby, readby) peer={DEFAULT_PROFILE}," in rules


def test_an_already_loaded_default_is_used_when_reloading_fails(tmp_path: Path) -> None:
    host = prepare_host(fake_sys(tmp_path / "sys", profiles=f"{DEFAULT_PROFILE} (enforce)\n"))
    if probe().enabled:  # the real kernel: loading works, the fake list is not consulted
        assert host.default_error == ""
    assert container_profile(SC(), privileged=False, host=host) == DEFAULT_PROFILE


def test_an_exec_runs_under_the_containers_profile() -> None:
    """runc gives an exec process only the profile its process spec names."""
    config = {"process": {"args": ["sleep", "1"], "apparmorProfile": DEFAULT_PROFILE,
                          "oomScoreAdj": 5}}
    process = exec_process(config, ["cat", "/proc/self/attr/current"], None, None, False)
    assert process["apparmorProfile"] == DEFAULT_PROFILE
    assert "oomScoreAdj" not in process
    assert "apparmorProfile" not in exec_process({"process": {}}, ["true"], None, None, False)

"""AppArmor on a node that has it: cripy-default for the runtime default, a Localhost
profile that denies writes makes a write fail, unloaded profiles are refused."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from cripy.api import api_pb2 as pb
from cripy.oci.apparmor import DEFAULT_PROFILE, probe
from tests.vm.guest.node import GuestPods

SC = pb.LinuxContainerSecurityContext
SP = pb.SecurityProfile
# One driver: profiles are applied by the OCI runtime at exec, whatever makes the cgroups.
pytestmark = pytest.mark.drivers("cgroupfs")

DENY_PROFILE = "cripy-test-deny-write"
# Everything allowed but writing below /data and to /tmp/forbidden.
DENY_PROFILE_TEXT = f"""\
profile {DENY_PROFILE} flags=(attach_disconnected,mediate_deleted) {{
  file,
  network,
  capability,
  signal,
  deny /data/** w,
  deny /tmp/forbidden w,
}}
"""


def apparmor_parser(*args: str, text: str) -> None:
    parser = shutil.which("apparmor_parser")
    assert parser, "apparmor_parser is not installed"
    subprocess.run([parser, *args], input=text.encode(), check=True, timeout=60,
                   capture_output=True)


@pytest.fixture(scope="module")
def deny_profile() -> Iterator[str]:
    """A Localhost profile loaded the way an operator loads one."""
    apparmor_parser("-K", "-r", text=DENY_PROFILE_TEXT)
    try:
        yield DENY_PROFILE
    finally:
        apparmor_parser("-K", "-R", text=DENY_PROFILE_TEXT)


def label(pods: GuestPods, cid: str) -> str:
    """The AppArmor label of a process exec'd in the container, and of its PID 1."""
    own, first = pods.exec(cid, "cat", "/proc/self/attr/current",
                           "/proc/1/attr/current").stdout.decode().splitlines()
    assert own == first, (own, first)
    return own


def test_the_node_has_apparmor() -> None:
    assert probe().enabled


def test_runtime_default_is_cripy_default(pods: GuestPods) -> None:
    pod_id = pods.run("aa-default")
    for name, security in (
        ("field", SC(apparmor=SP(profile_type=SP.RuntimeDefault))),
        ("legacy", SC(apparmor_profile="runtime/default")),
        ("unset", SC()),
    ):
        cid = pods.create(pod_id, name, ["sleep", "300"], security_context=security)
        assert label(pods, cid) == f"{DEFAULT_PROFILE} (enforce)"
    assert DEFAULT_PROFILE in probe().loaded_profiles()


def test_cripy_default_denies_mounts_even_with_cap_sys_admin(pods: GuestPods) -> None:
    pod_id = pods.run("aa-mount")
    admin = pb.Capability(add_capabilities=["SYS_ADMIN"])
    mount = ["mount", "-t", "tmpfs", "tmpfs", "/tmp"]
    confined = pods.create(pod_id, "confined", ["sleep", "300"], security_context=SC(
        capabilities=admin, apparmor=SP(profile_type=SP.RuntimeDefault)))
    denied = pods.exec(confined, *mount)
    assert denied.exit_code != 0 and b"denied" in denied.stderr.lower(), denied.stderr
    free = pods.create(pod_id, "free", ["sleep", "300"], security_context=SC(
        capabilities=admin, apparmor=SP(profile_type=SP.Unconfined)))
    assert label(pods, free) == "unconfined"
    allowed = pods.exec(free, *mount)
    assert allowed.exit_code == 0, allowed.stderr


def test_a_profile_that_denies_writes_makes_a_write_fail(pods: GuestPods,
                                                         deny_profile: str) -> None:
    pod_id = pods.run("aa-deny")
    for name, security in (
        ("field", SC(apparmor=SP(profile_type=SP.Localhost, localhost_ref=deny_profile))),
        ("legacy", SC(apparmor_profile=f"localhost/{deny_profile}")),
    ):
        cid = pods.create(pod_id, name, ["sleep", "300"], security_context=security)
        assert label(pods, cid) == f"{deny_profile} (enforce)"
        write = pods.exec(cid, "sh", "-c", "echo x > /tmp/forbidden")
        assert write.exit_code != 0 and b"Permission denied" in write.stderr, write.stderr
        assert pods.exec(cid, "sh", "-c", "echo x > /tmp/allowed").exit_code == 0
        assert pods.exec(cid, "ls", "/tmp/forbidden").exit_code != 0


def test_the_newer_field_wins(pods: GuestPods, deny_profile: str) -> None:
    cid = pods.create(pods.run("aa-newer"), "newer", ["sleep", "300"], security_context=SC(
        apparmor=SP(profile_type=SP.Unconfined), apparmor_profile=f"localhost/{deny_profile}"))
    assert label(pods, cid) == "unconfined"
    assert pods.exec(cid, "sh", "-c", "echo x > /tmp/forbidden").exit_code == 0


def test_an_unloaded_profile_is_refused_at_create(pods: GuestPods) -> None:
    pod_id = pods.run("aa-missing")
    with pytest.raises(grpc.RpcError) as info:
        pods.create(pod_id, "missing", ["true"], security_context=SC(
            apparmor=SP(profile_type=SP.Localhost, localhost_ref="cripy-test-not-loaded")))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'cripy-test-not-loaded' is not loaded on this node" in (info.value.details() or "")

"""CDI devices on a cgroup v2 node, with runc and crun and both cgroup drivers, from the
default spec directory /var/run/cdi (the guest's own tmpfs): the device node (allowed by
the cgroup v2 device filter), env, mount and group reach the container."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from tests.support.pods import container_config
from tests.vm.guest.node import GuestPods
from tests.vm.guest.test_crun import run_with

SPEC_DIR = Path("/var/run/cdi")
NULL = os.stat("/dev/null")


# Each handler on one driver, each driver once: CDI edits are the same spec whatever the
# driver; the device cgroup rule is installed by each handler and driver pair's own way.
@pytest.mark.parametrize("handler", [
    pytest.param("runc", marks=pytest.mark.drivers("cgroupfs")),
    pytest.param("crun", marks=pytest.mark.drivers("systemd"))])
def test_a_cdi_device_reaches_the_container(pods: GuestPods, tmp_path: Path,
                                            handler: str) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("from the host\n")
    kind = f"cripy.vm/null{secrets.token_hex(3)}"
    SPEC_DIR.mkdir(parents=True, exist_ok=True)
    spec = SPEC_DIR / f"{kind.replace('/', '-')}.json"
    spec.write_text(json.dumps({
        "cdiVersion": "0.8.0", "kind": kind,
        "devices": [{"name": "zero", "containerEdits": {
            "deviceNodes": [{"path": "/dev/cripy-null", "hostPath": "/dev/null"}],
            "env": ["CDI_DEVICE=zero"],
            "mounts": [{"hostPath": str(share), "containerPath": "/cdi-share",
                        "options": ["ro", "rbind"]}],
            "additionalGids": [4321],
        }}],
    }))
    try:
        pod_id = run_with(pods, handler, f"cdi-{handler}")
        config = container_config("cdi", pods.node.image, ["sleep", "300"])
        config.CDI_devices.append(pb.CDIDevice(name=f"{kind}=zero"))
        cid = pods.create_from(pod_id, config)

        def out(*cmd: str) -> str:
            result = pods.exec(cid, *cmd)
            assert result.exit_code == 0, result.stderr
            return result.stdout.decode()

        assert out("stat", "-c", "%F %t %T", "/dev/cripy-null").strip() == (
            f"character special file {os.major(NULL.st_rdev):x} {os.minor(NULL.st_rdev):x}")
        assert out("sh", "-c", "echo x > /dev/cripy-null && echo written") == "written\n"
        assert "CDI_DEVICE=zero" in out("env").splitlines()
        assert out("cat", "/cdi-share/hello.txt") == "from the host\n"
        assert "4321" in out("id", "-G").split()
    finally:
        spec.unlink(missing_ok=True)

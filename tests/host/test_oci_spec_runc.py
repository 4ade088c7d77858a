"""A spec cripy.oci.spec builds, run by the real runc: user, groups, capabilities and
seccomp as the process inside sees them. Needs root and runc."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path

from cripy.api import api_pb2 as pb
from cripy.oci.spec import SpecContext, build_container_spec
from tests.unit.test_oci_spec import RUNTIME_DEFAULT, SC, container, sandbox

RUNC = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"


def _run_in_runc(
    tmp_path: Path, sc: pb.LinuxContainerSecurityContext
) -> subprocess.CompletedProcess[str]:
    bundle = tmp_path / f"bundle-{uuid.uuid4().hex[:8]}"
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in ("sh", "id", "cat", "grep"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0::/root:/bin/sh\napp:x:1234:1234::/:/bin/sh\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\napp:x:1234:\nextra:x:777:app\n")
    cid = f"cripy-spec-test-{uuid.uuid4().hex[:12]}"
    own_oom = int(Path("/proc/self/oom_score_adj").read_text())
    ctx = SpecContext(
        container_id=cid,
        sandbox_id="sandbox",
        rootfs=rootfs,
        network_ns=None,
        ipc_ns=None,
        uts_ns=None,
        oom_score_adj_min=own_oom,
    )
    cfg = container(
        sc=sc,
        resources=pb.LinuxContainerResources(oom_score_adj=-900, memory_limit_in_bytes=256 << 20),
        command=["sh", "-c", "id; cat /proc/self/status | grep -E 'CapEff|Seccomp:'"],
    )
    sb = sandbox(linux=pb.LinuxPodSandboxConfig(cgroup_parent="/cripy-test"))
    spec = build_container_spec(cfg, sb, {"config": {"Env": ["PATH=/bin"]}}, ctx)
    (bundle / "config.json").write_text(json.dumps(spec))
    state = tmp_path / "runc-state"
    try:
        return subprocess.run(
            [RUNC, "--root", str(state), "run", "--bundle", str(bundle), cid],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    finally:
        subprocess.run(
            [RUNC, "--root", str(state), "delete", "--force", cid], capture_output=True, timeout=60
        )
        for parent in Path("/sys/fs/cgroup").glob("*/cripy-test"):
            with contextlib.suppress(OSError):
                parent.rmdir()  # fails harmlessly while another test still uses it
        unified = Path("/sys/fs/cgroup/cripy-test")
        if unified.is_dir():
            with contextlib.suppress(OSError):
                unified.rmdir()


def test_runc_accepts_spec(tmp_path: Path) -> None:
    sc = SC(
        run_as_user=pb.Int64Value(value=1234),
        run_as_group=pb.Int64Value(value=4321),
        supplemental_groups=[42],
        namespace_options=pb.NamespaceOption(pid=pb.CONTAINER),
        seccomp=RUNTIME_DEFAULT,
    )
    result = _run_in_runc(tmp_path, sc)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "uid=1234(app) gid=4321" in out
    assert "42" in out and "777" in out  # supplemental + /etc/group membership
    assert "CapEff:\t0000000000000000" in out
    assert "Seccomp:\t2" in out

    root = SC(namespace_options=pb.NamespaceOption(pid=pb.CONTAINER), seccomp=RUNTIME_DEFAULT)
    result = _run_in_runc(tmp_path, root)
    assert result.returncode == 0, result.stderr
    assert "uid=0(root) gid=0(root)" in result.stdout
    assert "CapEff:\t00000000a80425fb" in result.stdout  # exactly the default set
    assert "Seccomp:\t2" in result.stdout

"""A throwaway containerd (Debian's) as the baseline CRI runtime of a benchmark run.

It gets its own root, state and socket under a work dir, the same CNI config and plugins
as cripy, plain-HTTP access to the test registry, and a pause image built from catatonit
(registry.k8s.io is out of reach). restrict_oom_score_adj is set because nodes without
CAP_SYS_RESOURCE cannot lower it, the same limitation cripy clamps for.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from tests.support.images import (
    FileEntry,
    ImageConfig,
    ImageSpec,
    Layer,
    files_layer,
    push_image,
)
from tests.support.registry import Registry


def available() -> bool:
    return shutil.which("containerd") is not None


def push_pause_image(registry: Registry) -> str:
    catatonit = Path(shutil.which("catatonit") or "/usr/bin/catatonit").read_bytes()
    layer = files_layer({"pause": FileEntry(catatonit, mode=0o755)})
    pushed = push_image(registry, "pause", "bench", ImageSpec(
        [Layer(layer)], ImageConfig(entrypoint=["/pause", "-P"])))
    return pushed.ref


@contextmanager
def containerd(workdir: Path, registry: Registry, cni_dir: Path) -> Iterator[str]:
    """Start containerd; yields its CRI endpoint."""
    pause = push_pause_image(registry)
    workdir.mkdir(parents=True, exist_ok=True)
    socket_path = workdir / "containerd.sock"
    config = workdir / "config.toml"
    config.write_text(f"""version = 2
root = "{workdir / 'root'}"
state = "{workdir / 'state'}"
[grpc]
  address = "{socket_path}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_dir}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry.host}"]
    endpoint = ["http://{registry.host}"]
""")
    log = (workdir / "containerd.log").open("wb")
    process = subprocess.Popen(["containerd", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"unix://{socket_path}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with grpc.insecure_channel(endpoint) as channel:
                    api_pb2_grpc.RuntimeServiceStub(channel).Version(pb.VersionRequest(),
                                                                     timeout=2)
                break
            except grpc.RpcError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"containerd did not start: {(workdir / 'containerd.log').read_text()}"
                    ) from None
                time.sleep(0.2)
        with grpc.insecure_channel(endpoint) as channel:
            api_pb2_grpc.ImageServiceStub(channel).PullImage(
                pb.PullImageRequest(image=pb.ImageSpec(image=pause)), timeout=120)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        # containerd leaves its shims and mounts to the host; take them down.
        subprocess.run(["pkill", "-f", f"containerd-shim-runc-v2.*{workdir}"], check=False)
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            target = line.split()[1]
            if target.startswith(str(workdir)):
                subprocess.run(["umount", "-l", target], check=False)

"""CRI lifecycle latency and per-container memory, against a real cripy daemon.

Measures, over --runs iterations each:
  - RunPodSandbox (namespaces, CNI bridge + portmap, pod files),
  - CreateContainer + StartContainer of a busybox `sleep`,
  - a full cycle: RunPodSandbox, Create, Start, Stop, Remove, StopPodSandbox, Remove,
and reports p50/p95. Then it starts --containers sleeping containers in one pod and
reports the memory each costs: the container's conmon RSS, its process RSS, and the
daemon's RSS growth, divided by the count.

The CRI calls go through `benchmarks.cri_bench.measure`, which takes any endpoint. When
Debian's containerd is installed, a throwaway containerd with the same CNI network is
measured in the same run and ratios are printed (--no-containerd skips it); any other
runtime can be given with --baseline-endpoint.

Usage: python -m benchmarks.pods [--runs 20] [--containers 10]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import grpc

from benchmarks import containerd
from benchmarks.cri_bench import measure, print_report
from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from tests.support.daemon import Daemon
from tests.support.images import push_busybox
from tests.support.pods import bridge_network, remove_cgroup
from tests.support.registry import Registry


def containerd_pid() -> int | None:
    found = subprocess.run(["pgrep", "-x", "containerd"], capture_output=True, text=True)
    pids = found.stdout.split()
    return int(pids[0]) if pids else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--containers", type=int, default=10)
    parser.add_argument("--baseline-endpoint", default="",
                        help="another CRI endpoint to measure in the same run")
    parser.add_argument("--baseline-image", default="",
                        help="the image reference the baseline runtime should use")
    parser.add_argument("--no-containerd", action="store_true",
                        help="do not measure Debian's containerd even when installed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cripy-bench-") as tmp, Registry() as registry:
        workdir = Path(tmp)
        image = push_busybox(registry).ref
        daemon = Daemon(workdir / "daemon", insecure_registries=[registry.host])
        cgroup_parent = "/cripy-bench"
        try:
            with bridge_network(daemon.cni_dir, workdir, 99), daemon:
                daemon.pull(image)
                results = {"cripy": measure(daemon.endpoint, image, workdir / "logs",
                                            args.runs, args.containers, cgroup_parent,
                                            daemon_pid=daemon.process.pid
                                            if daemon.process else None)}
                if args.baseline_endpoint:
                    results["baseline"] = measure(
                        args.baseline_endpoint, args.baseline_image or image,
                        workdir / "baseline-logs", args.runs, args.containers,
                        cgroup_parent + "-baseline", daemon_pid=None)
                elif containerd.available() and not args.no_containerd:
                    with containerd.containerd(workdir / "containerd", registry,
                                               daemon.cni_dir) as endpoint:
                        with grpc.insecure_channel(endpoint) as channel:
                            api_pb2_grpc.ImageServiceStub(channel).PullImage(
                                pb.PullImageRequest(image=pb.ImageSpec(image=image)),
                                timeout=120)
                        results["baseline"] = measure(
                            endpoint, image, workdir / "baseline-logs", args.runs,
                            args.containers, cgroup_parent + "-baseline",
                            daemon_pid=containerd_pid())
        finally:
            remove_cgroup(cgroup_parent)
            remove_cgroup(cgroup_parent + "-baseline")
    print_report(results, args.runs, args.containers)


if __name__ == "__main__":
    main()

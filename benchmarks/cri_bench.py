"""Runtime-neutral CRI measurements: any endpoint, plain CRI v1 calls."""

from __future__ import annotations

import json
import os
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from tests.support.pods import container_config, pod_config


@dataclass
class Result:
    run_pod: list[float]
    create_start: list[float]
    cycle: list[float]
    monitor_rss: float  # bytes per container: conmon, or containerd's shim shared
    process_rss: float
    daemon_rss: float | None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def timed(func: Callable[[], object]) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


MONITORS = ("conmon", "containerd-shim")  # comm is cut at 15 characters


def monitor_pids_for(object_ids: list[str]) -> list[int]:
    """Container monitors (cripy's conmons, containerd's shims) serving these IDs."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() not in MONITORS:
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(object_id in cmdline for object_id in object_ids):
            found.append(int(pid))
    return found


def measure(endpoint: str, image: str, log_dir: Path, runs: int, containers: int,
            cgroup_parent: str, daemon_pid: int | None) -> Result:
    with grpc.insecure_channel(endpoint) as channel:
        rt = api_pb2_grpc.RuntimeServiceStub(channel)

        def run_pod(name: str) -> tuple[str, pb.PodSandboxConfig]:
            config = pod_config(name, log_dir, cgroup_parent=cgroup_parent)
            response = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=120)
            return response.pod_sandbox_id, config

        def remove_pod(pod_id: str) -> None:
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)

        def create_start(pod_id: str, config: pb.PodSandboxConfig, name: str) -> str:
            cid: str = rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=pod_id, sandbox_config=config,
                config=container_config(name, image, ["sleep", "3600"])),
                timeout=120).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
            return cid

        def cycle() -> None:
            pod_id, config = run_pod("cycle-" + secrets.token_hex(3))
            cid = create_start(pod_id, config, "c")
            rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=120)
            rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120)
            remove_pod(pod_id)

        run_pod_times, create_times, cycle_times = [], [], []
        for i in range(runs):
            started = time.perf_counter()
            pod_id, config = run_pod(f"bench-{i}")
            run_pod_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            create_start(pod_id, config, "c")
            create_times.append(time.perf_counter() - started)
            remove_pod(pod_id)
            cycle_times.append(timed(cycle))

        before = rss_bytes(daemon_pid) if daemon_pid else 0
        pod_id, config = run_pod("memory")
        ids = [create_start(pod_id, config, f"c{i}") for i in range(containers)]
        time.sleep(1)
        monitors = monitor_pids_for([*ids, pod_id])
        monitor_rss = sum(rss_bytes(p) for p in monitors) / containers
        process_rss = 0.0
        for cid in ids:
            status = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid,
                                                                  verbose=True), timeout=30)
            pid = _pid_from_info(status.info)
            process_rss += rss_bytes(pid) if pid else 0
        daemon_rss = ((rss_bytes(daemon_pid) - before) / containers) if daemon_pid else None
        remove_pod(pod_id)
    return Result(run_pod_times, create_times, cycle_times, monitor_rss,
                  process_rss / containers, daemon_rss)


def _pid_from_info(info: dict[str, str]) -> int:
    try:
        return int(json.loads(info.get("info", "{}")).get("pid") or 0)
    except ValueError:
        return 0


def print_report(results: dict[str, Result], runs: int, containers: int) -> None:
    mib = 1024 * 1024
    print(f"{runs} runs each; memory over {containers} running containers")
    for name, r in results.items():
        print(f"[{name}]")
        for label, values in (("RunPodSandbox", r.run_pod), ("Create+Start", r.create_start),
                              ("full pod+container cycle", r.cycle)):
            print(f"  {label:26s} p50 {statistics.median(values) * 1000:7.1f} ms   "
                  f"p95 {percentile(values, 0.95) * 1000:7.1f} ms")
        daemon = f"{r.daemon_rss / mib:.2f} MiB" if r.daemon_rss is not None else "n/a"
        print(f"  per container: monitor {r.monitor_rss / mib:.2f} MiB, process "
              f"{r.process_rss / mib:.2f} MiB, daemon growth {daemon}")
    if "baseline" in results:
        c, b = results["cripy"], results["baseline"]
        for label, cv, bv in (("RunPodSandbox", c.run_pod, b.run_pod),
                              ("Create+Start", c.create_start, b.create_start),
                              ("cycle", c.cycle, b.cycle)):
            print(f"ratio cripy/baseline {label}: p50 "
                  f"{statistics.median(cv) / statistics.median(bv):.2f}")

"""Where RunPodSandbox and StopPodSandbox + RemovePodSandbox spend their time, step by step.

Starts one cripy daemon (and, with --baseline-python, a second one run by that
interpreter: another version of cripy) on its own bridge network, and measures them
interleaved, round by round: RunPodSandbox, then (with --container) a busybox container
created and started in the pod, then StopPodSandbox and RemovePodSandbox. It prints the
p50 of each RPC, the p50 of each creation step (from PodSandboxStatus verbose info) and
the mean of each teardown step (from the daemon's cripy_pod_teardown_step_seconds).

Usage: python -m benchmarks.pod_steps [--runs 20] [--container] [--baseline-python PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.images import push_busybox
from tests.support.pods import bridge_network, container_config, pod_config, remove_cgroup
from tests.support.registry import Registry, free_port

CGROUP_PARENT = "/cripy-pod-steps"


def teardown_means(port: int) -> dict[str, float]:
    """operation/step -> mean seconds, from the daemon's teardown histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if not name.startswith("cripy_pod_teardown_step_seconds_"):
            continue
        labels = {k: v.strip('"') for k, v in (
            part.split("=", 1) for part in name[name.index("{") + 1:name.rindex("}")].split(","))}
        key = f"{labels['operation']}/{labels['step']}"
        if name.startswith("cripy_pod_teardown_step_seconds_sum"):
            sums[key] = float(value)
        elif name.startswith("cripy_pod_teardown_step_seconds_count"):
            counts[key] = float(value)
    return {key: sums[key] / counts[key] for key in sorted(sums) if counts.get(key)}


class Subject:
    def __init__(self, name: str, daemon: Daemon, port: int) -> None:
        self.name, self.daemon, self.port = name, daemon, port
        self.rpcs: dict[str, list[float]] = defaultdict(list)
        self.steps: dict[str, list[float]] = defaultdict(list)

    def round(self, index: int, image: str, log_dir: Path, with_container: bool) -> None:
        rt = self.daemon.runtime
        config = pod_config(f"steps-{index}", log_dir, cgroup_parent=CGROUP_PARENT)
        started = time.perf_counter()
        pod_id = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config),
                                  timeout=120).pod_sandbox_id
        self.rpcs["RunPodSandbox"].append(time.perf_counter() - started)
        info = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
            pod_sandbox_id=pod_id, verbose=True), timeout=30).info.get("info", "{}")
        for step, seconds in json.loads(info).get("creationSteps", {}).items():
            self.steps[step].append(seconds)
        if with_container:
            cid = rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=pod_id, sandbox_config=config,
                config=container_config("c", image, ["sleep", "3600"])),
                timeout=120).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
        started = time.perf_counter()
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        stopped = time.perf_counter()
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        removed = time.perf_counter()
        self.rpcs["StopPodSandbox"].append(stopped - started)
        self.rpcs["RemovePodSandbox"].append(removed - stopped)
        self.rpcs["Stop+Remove"].append(removed - started)

    def report(self) -> None:
        print(f"[{self.name}]")
        for label, values in self.rpcs.items():
            print(f"  {label:28s} p50 {statistics.median(values) * 1000:7.1f} ms")
        print("  creation steps (p50):")
        for step, values in self.steps.items():
            print(f"    {step:26s} {statistics.median(values) * 1000:7.2f} ms")
        print("  teardown steps (mean):")
        for key, seconds in teardown_means(self.port).items():
            print(f"    {key:26s} {seconds * 1000:7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--container", action="store_true",
                        help="a running container in each pod before its stop")
    parser.add_argument("--baseline-python", default="",
                        help="an interpreter whose cripy is measured as the baseline")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cripy-pod-steps-") as tmp, \
            Registry() as registry, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        image = push_busybox(registry).ref
        versions = [("cripy", "")]
        if args.baseline_python:
            versions.insert(0, ("baseline", args.baseline_python))
        subjects = []
        try:
            for octet, (name, python) in enumerate(versions, start=97):
                port = free_port()
                daemon = Daemon(workdir / name, insecure_registries=[registry.host],
                                extra_config=f"[monitoring]\nmetrics_port = {port}\n",
                                python=python)
                stack.enter_context(bridge_network(daemon.cni_dir, workdir / name, octet))
                stack.enter_context(daemon)
                daemon.pull(image)
                subjects.append(Subject(name, daemon, port))
            for i in range(args.runs):
                for subject in subjects:
                    subject.round(i, image, workdir / "logs", args.container)
            print(f"{args.runs} rounds, interleaved"
                  f"{', one running container per pod' if args.container else ''}")
            for subject in subjects:
                subject.report()
        finally:
            stack.close()
            remove_cgroup(CGROUP_PARENT)


if __name__ == "__main__":
    main()

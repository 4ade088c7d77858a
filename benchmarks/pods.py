"""Pods, listing, memory, daemon CPU and pulls: cripy against other CRI runtimes, in one run.

Runtimes, in this order (ratios are printed against the first one, cripy by default):
  - "cripy": this checkout's daemon, started in a temporary state dir;
  - --cripy NAME=PYTHON: another cripy run by that interpreter (before/after comparisons);
  - --endpoint NAME=URL: any running CRI endpoint, e.g. unix:///run/crio/crio.sock; it
    must reach the benchmark's registry over plain HTTP (--registry-port fixes the port)
    and the host's CNI network; its daemon process is found as the socket's owner;
  - "containerd": Debian's containerd when installed (and not --no-containerd), started
    with its own root and the same CNI network (benchmarks/containerd.py).

What is measured, interleaved round by round (the order of the runtimes rotates every
round, so drift and noise hit all alike):
  1. --rounds lifecycle cycles per runtime: RunPodSandbox, CreateContainer and
     StartContainer of a busybox `sleep`, StopContainer, RemoveContainer, StopPodSandbox,
     RemovePodSandbox, each timed; "Stop+Remove pod" and the full cycle are sums;
  2. --pull-rounds pulls of a generated multi-layer gzip image (benchmarks/pull.py),
     removed before each pull;
  3. --pods pods of one running container each, set up once per runtime (all runtimes
     hold theirs at the same time), then --rounds rounds of ListPodSandbox,
     ListContainers and ContainerStatus;
  4. memory: the monitor processes' RSS and PSS per running container (cripy's conmons,
     containerd's shims, found by the pods' and containers' IDs on their command lines),
     and the daemon's RSS idle (after start and one pull) and at --pods pods;
  5. daemon CPU (% of one core: utime+stime from /proc/PID/stat over the window) under
     kubelet-like polling at --pods pods: ListPodSandbox + ListContainers every second,
     ListContainerStats + ListPodSandboxStats every 10 s, for --poll-seconds, one runtime
     after the other (rotating) so that one's polling does not load the other.

Everything it creates (pods, containers, cgroups, mounts, daemons, the bridge) is removed
on any exit, SIGTERM and Ctrl-C included. Needs root and the shared test lock:

Usage: flock /tmp/cripy-test.lock python -m benchmarks.pods [--quick] [--rounds 10]
           [--pods 110] [--poll-seconds 60] [--endpoint NAME=URL ...] [--no-containerd]
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc

from benchmarks import containerd
from benchmarks.cri_bench import monitor_pids_for, percentile, rss_bytes
from benchmarks.pull import add_runtime_arguments, push_bench_image, timed_pull
from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from tests.support.daemon import Daemon
from tests.support.images import push_busybox
from tests.support.pods import bridge_network, container_config, pod_config, remove_cgroup
from tests.support.registry import Registry

CALL_TIMEOUT = 120.0
SETUP_THREADS = 4
#: room for every runtime's pods at once (host-local allocates from one range)
SUBNET = "10.217.0.0/20"
LIFECYCLE_STEPS = ("RunPodSandbox", "CreateContainer", "StartContainer", "StopContainer",
                   "RemoveContainer", "StopPodSandbox", "RemovePodSandbox")
LIST_CALLS = ("ListPodSandbox", "ListContainers", "ContainerStatus")
QUICK = {"rounds": 5, "pods": 30, "poll_seconds": 20, "pull_rounds": 3, "size_mb": 20,
         "layers": 3}
FULL = {"rounds": 10, "pods": 110, "poll_seconds": 60, "pull_rounds": 5, "size_mb": 60,
        "layers": 6}
MIB = 1024 * 1024


# --- pure pieces ------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller defaults: " + ", ".join(f"{k} {v}"
                                                             for k, v in QUICK.items()))
    parser.add_argument("--rounds", type=int, help=f"lifecycle and list rounds ({FULL['rounds']})")
    parser.add_argument("--pods", type=int, help=f"pods held for listing, memory and CPU "
                                                 f"({FULL['pods']})")
    parser.add_argument("--poll-seconds", type=float, dest="poll_seconds",
                        help=f"the kubelet-like polling window ({FULL['poll_seconds']})")
    parser.add_argument("--pull-rounds", type=int, dest="pull_rounds",
                        help=f"pulls per runtime, 0 for none ({FULL['pull_rounds']})")
    parser.add_argument("--size-mb", type=int, dest="size_mb",
                        help=f"size of the pulled image ({FULL['size_mb']})")
    parser.add_argument("--layers", type=int, help=f"its gzip layers ({FULL['layers']})")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = ["cripy", *(n for n, _ in args.cripy), *(n for n, _ in args.endpoint)]
    if len(set(names)) != len(names) or "containerd" in names[1:] and not args.no_containerd:
        parser.error(f"runtime names must be distinct: {', '.join(names)}")
    for option in ("rounds", "pods"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if args.poll_seconds <= 0 or args.pull_rounds < 0:
        parser.error("--poll-seconds must be positive and --pull-rounds not negative")
    return args


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    """The order of round `round_index`: shifted by one each round."""
    shift = round_index % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/PID/stat.

    The command name (field 2) is in parentheses and may hold spaces and parentheses:
    fields are counted from the last ')'."""
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # fields 14 and 15; rest[0] is field 3


def cpu_percent(ticks_before: int, ticks_after: int, seconds: float, clock_ticks: int) -> float:
    """CPU used over a window, in % of one core."""
    if seconds <= 0:
        raise ValueError("the window must be positive")
    return 100.0 * (ticks_after - ticks_before) / clock_ticks / seconds


def unix_path(endpoint: str) -> str:
    for prefix in ("unix://", "unix:"):
        if endpoint.startswith(prefix):
            return endpoint[len(prefix):]
    raise ValueError(f"not a unix socket endpoint: {endpoint!r}")


def listening_inodes(proc_net_unix: str, path: str) -> list[int]:
    """Inodes of the sockets bound to `path` in /proc/net/unix, listening ones first."""
    listening: list[int] = []
    others: list[int] = []
    for line in proc_net_unix.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == path:
            accepting = int(fields[3], 16) & 0x10000  # __SO_ACCEPTCON
            (listening if accepting else others).append(int(fields[6]))
    return listening + others


@dataclass
class Row:
    label: str
    unit: str
    values: dict[str, float | None]


def summary_rows(label: str, samples: dict[str, list[float]], scale: float = 1000.0,
                 unit: str = "ms") -> list[Row]:
    """p50 and p95 rows of one measure (samples per runtime, in seconds)."""
    rows = []
    for name, fraction in (("p50", 0.5), ("p95", 0.95)):
        rows.append(Row(f"{label} {name}", unit, {
            runtime: percentile(values, fraction) * scale if values else None
            for runtime, values in samples.items()}))
    return rows


def ratio_table(rows: list[Row], runtimes: list[str]) -> list[str]:
    """A text table: each runtime's value, then first/other for every other runtime."""
    first, others = runtimes[0], runtimes[1:]
    label_width = max([len(r.label) + len(r.unit) + 3 for r in rows] + [10])
    head = f"{'':{label_width}s}" + "".join(f"{n:>12s}" for n in runtimes) + \
        "".join(f"{first + '/' + n:>20s}" for n in others)
    lines = [head]
    for row in rows:
        cells = "".join(f"{_fmt(row.values.get(n)):>12s}" for n in runtimes)
        ratios = ""
        for n in others:
            mine, theirs = row.values.get(first), row.values.get(n)
            ratio = f"{mine / theirs:.2f}" if mine is not None and theirs else "n/a"
            ratios += f"{ratio:>20s}"
        lines.append(f"{row.label + ' (' + row.unit + ')':{label_width}s}{cells}{ratios}")
    return lines


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


# --- measuring --------------------------------------------------------------------------

def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def socket_owner(endpoint: str) -> int | None:
    """The process that listens on a unix socket endpoint (its daemon)."""
    inodes = listening_inodes(Path("/proc/net/unix").read_text(), unix_path(endpoint))
    wanted = {f"socket:[{inode}]": rank for rank, inode in enumerate(inodes)}
    best: tuple[int, int] | None = None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with suppress(OSError):
                    rank = wanted.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
                    if rank is not None and (best is None or rank < best[0]):
                        best = (rank, int(pid))
    return best[1] if best else None


@dataclass
class Runtime:
    name: str
    endpoint: str
    log_dir: Path
    cgroup_parent: str
    pid: int | None = None
    channel: grpc.Channel | None = None
    _stub: api_pb2_grpc.RuntimeServiceStub | None = None
    steps: dict[str, list[float]] = field(
        default_factory=lambda: {s: [] for s in (*LIFECYCLE_STEPS, "Stop+Remove pod",
                                                 "full cycle", *LIST_CALLS, "pull")})
    pods: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    scalars: dict[str, float | None] = field(default_factory=dict)

    @property
    def rt(self) -> api_pb2_grpc.RuntimeServiceStub:
        if self._stub is None:
            self.channel = grpc.insecure_channel(self.endpoint)
            self._stub = api_pb2_grpc.RuntimeServiceStub(self.channel)
        return self._stub

    def timed(self, step: str, call: Callable[[], object]) -> object:
        started = time.perf_counter()
        result = call()
        self.steps[step].append(time.perf_counter() - started)
        return result

    def run_pod(self, name: str) -> tuple[str, pb.PodSandboxConfig]:
        config = pod_config(name, self.log_dir, cgroup_parent=self.cgroup_parent)
        pod_id: str = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config),
                                            timeout=CALL_TIMEOUT).pod_sandbox_id
        self.pods.append(pod_id)
        return pod_id, config

    def remove_pod(self, pod_id: str) -> None:
        self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                               timeout=CALL_TIMEOUT)
        self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                 timeout=CALL_TIMEOUT)
        self.pods.remove(pod_id)

    def cycle(self, image: str) -> None:
        """One timed lifecycle: every step, then the sums."""
        rt, before = self.rt, {s: len(v) for s, v in self.steps.items()}
        config = pod_config("cycle-" + secrets.token_hex(3), self.log_dir,
                            cgroup_parent=self.cgroup_parent)
        pod_id = str(self.timed("RunPodSandbox", lambda: rt.RunPodSandbox(
            pb.RunPodSandboxRequest(config=config), timeout=CALL_TIMEOUT).pod_sandbox_id))
        self.pods.append(pod_id)
        cid = str(self.timed("CreateContainer", lambda: rt.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=pod_id, sandbox_config=config,
                                      config=container_config("c", image, ["sleep", "3600"])),
            timeout=CALL_TIMEOUT).container_id))
        self.timed("StartContainer", lambda: rt.StartContainer(
            pb.StartContainerRequest(container_id=cid), timeout=CALL_TIMEOUT))
        self.timed("StopContainer", lambda: rt.StopContainer(
            pb.StopContainerRequest(container_id=cid, timeout=0), timeout=CALL_TIMEOUT))
        self.timed("RemoveContainer", lambda: rt.RemoveContainer(
            pb.RemoveContainerRequest(container_id=cid), timeout=CALL_TIMEOUT))
        self.timed("StopPodSandbox", lambda: rt.StopPodSandbox(
            pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT))
        self.timed("RemovePodSandbox", lambda: rt.RemovePodSandbox(
            pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT))
        self.pods.remove(pod_id)
        latest = {s: self.steps[s][-1] for s in LIFECYCLE_STEPS if len(self.steps[s]) > before[s]}
        self.steps["Stop+Remove pod"].append(latest["StopPodSandbox"] +
                                             latest["RemovePodSandbox"])
        self.steps["full cycle"].append(sum(latest.values()))

    def populate(self, image: str, count: int) -> None:
        """`count` pods of one running container each, a few at a time."""
        def one(i: int) -> None:
            pod_id, config = self.run_pod(f"held-{i}")
            cid: str = self.rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=pod_id, sandbox_config=config,
                config=container_config("c", image, ["sleep", "3600"])),
                timeout=CALL_TIMEOUT).container_id
            self.containers.append(cid)
            self.rt.StartContainer(pb.StartContainerRequest(container_id=cid),
                                   timeout=CALL_TIMEOUT)
        with ThreadPoolExecutor(SETUP_THREADS) as pool:
            list(pool.map(one, range(count)))

    def list_round(self, calls: int = 10) -> None:
        rt = self.rt
        for _ in range(calls):
            self.timed("ListPodSandbox", lambda: rt.ListPodSandbox(
                pb.ListPodSandboxRequest(), timeout=CALL_TIMEOUT))
            self.timed("ListContainers", lambda: rt.ListContainers(
                pb.ListContainersRequest(), timeout=CALL_TIMEOUT))
            self._status(random.choice(self.containers))

    def _status(self, cid: str) -> None:
        request = pb.ContainerStatusRequest(container_id=cid)
        self.timed("ContainerStatus", lambda: self.rt.ContainerStatus(request,
                                                                      timeout=CALL_TIMEOUT))

    def poll(self, seconds: float) -> float | None:
        """Kubelet-like polling for `seconds`; the daemon's CPU % over the window."""
        if self.pid is None:
            return None
        rt, stat = self.rt, Path(f"/proc/{self.pid}/stat")
        stats_calls: list[Callable[[], object]] = [
            lambda: rt.ListContainerStats(pb.ListContainerStatsRequest(), timeout=CALL_TIMEOUT),
            lambda: rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(),
                                           timeout=CALL_TIMEOUT)]
        started, ticks = time.monotonic(), cpu_ticks(stat.read_text())
        tick = 0
        while (due := started + tick) < started + seconds:
            time.sleep(max(0.0, due - time.monotonic()))
            rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=CALL_TIMEOUT)
            rt.ListContainers(pb.ListContainersRequest(), timeout=CALL_TIMEOUT)
            if tick % 10 == 0:
                for call in stats_calls:
                    try:
                        call()
                    except grpc.RpcError as exc:  # a runtime without pod stats
                        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                            raise
            tick += 1
        time.sleep(max(0.0, started + seconds - time.monotonic()))
        return cpu_percent(ticks, cpu_ticks(stat.read_text()),
                           time.monotonic() - started, os.sysconf("SC_CLK_TCK"))

    def memory(self) -> None:
        monitors = monitor_pids_for([*self.pods, *self.containers])
        count = len(self.containers)
        self.scalars["monitor RSS / container"] = sum(map(rss_bytes, monitors)) / count / MIB
        self.scalars["monitor PSS / container"] = sum(map(pss_bytes, monitors)) / count / MIB
        self.scalars["daemon RSS at N pods"] = rss_bytes(self.pid) / MIB if self.pid else None

    def clean(self) -> None:
        """Remove every pod this benchmark still holds on the runtime (best effort)."""
        def one(pod_id: str) -> None:
            with suppress(grpc.RpcError, ValueError):
                self.remove_pod(pod_id)
        with ThreadPoolExecutor(SETUP_THREADS) as pool:
            list(pool.map(one, list(self.pods)))
        self.containers.clear()
        if self.channel is not None:
            self.channel.close()
            self.channel, self._stub = None, None


def pull_image(endpoint: str, image: str) -> None:
    with grpc.insecure_channel(endpoint) as channel:
        api_pb2_grpc.ImageServiceStub(channel).PullImage(
            pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=CALL_TIMEOUT)


@contextmanager
def runtimes(args: argparse.Namespace, workdir: Path, registry: Registry,
             cni_dir: Path) -> Iterator[list[Runtime]]:
    """Every runtime started (or reached), cleaned and stopped on exit."""
    found: list[Runtime] = []
    cgroups: list[str] = []

    def add(name: str, endpoint: str, pid: int | None) -> None:
        cgroup = f"/cripy-bench-{name}-{secrets.token_hex(2)}"
        cgroups.append(cgroup)
        (workdir / "logs" / name).mkdir(parents=True)
        found.append(Runtime(name, endpoint, workdir / "logs" / name, cgroup,
                             pid or socket_owner(endpoint)))

    with ExitStack() as stack:
        stack.callback(remove_cgroups, cgroups)  # last: after the daemons stopped
        network = f'[network]\ncni_config_dir = "{cni_dir}"\n'
        for name, python in [("cripy", ""), *args.cripy]:
            daemon = Daemon(workdir / name, insecure_registries=[registry.host],
                            extra_config=network, python=python)
            stack.enter_context(daemon)
            add(name, daemon.endpoint, daemon.process.pid if daemon.process else None)
        for name, endpoint in args.endpoint:
            add(name, endpoint, None)
        if containerd.available() and not args.no_containerd:
            add("containerd", stack.enter_context(containerd.containerd(
                workdir / "containerd", registry, cni_dir)), None)
        stack.callback(clean_all, found)  # first: before the daemons stop
        yield found


def clean_all(found: list[Runtime]) -> None:
    for r in found:
        r.clean()


def remove_cgroups(cgroups: list[str]) -> None:
    for cgroup in cgroups:
        try:
            remove_cgroup(cgroup)
        except OSError as exc:
            print(f"warning: cgroup {cgroup} left behind: {exc}", file=sys.stderr)


def interleaved(found: list[Runtime], rounds: int, step: Callable[[Runtime], None]) -> None:
    names = [r.name for r in found]
    by_name = {r.name: r for r in found}
    for i in range(rounds):
        for name in rotated(names, i):
            step(by_name[name])


def report(found: list[Runtime], args: argparse.Namespace, pull_what: str) -> list[str]:
    names = [r.name for r in found]
    rows: list[Row] = []
    for step in (*LIFECYCLE_STEPS, "Stop+Remove pod", "full cycle"):
        rows += summary_rows(step, {r.name: r.steps[step] for r in found})
    for call in LIST_CALLS:
        rows += summary_rows(f"{call} @{args.pods}", {r.name: r.steps[call] for r in found})
    if args.pull_rounds:
        rows += summary_rows("pull", {r.name: r.steps["pull"] for r in found})
    for scalar, unit in (("monitor RSS / container", "MiB"), ("monitor PSS / container", "MiB"),
                         ("daemon RSS idle", "MiB"), ("daemon RSS at N pods", "MiB"),
                         ("daemon CPU polling", "%")):
        rows.append(Row(scalar.replace("N pods", f"{args.pods} pods"), unit,
                        {r.name: r.scalars.get(scalar) for r in found}))
    return [f"{args.rounds} lifecycle rounds, {args.rounds} x 10 list calls at {args.pods} "
            f"pods, {args.pull_rounds} pulls of {pull_what}, {args.poll_seconds:.0f} s "
            "polling window; interleaved, rotating order; ratios are "
            f"{names[0]}/other (below 1: {names[0]} is faster or smaller)",
            *ratio_table(rows, names)]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every clean-up


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cripy-bench-") as tmp, \
            Registry(port=args.registry_port) as registry:
        workdir = Path(tmp)
        cni_dir = workdir / "cni"
        cni_dir.mkdir()
        image = push_busybox(registry).ref
        pull_ref = push_bench_image(registry, args.size_mb, args.layers, "mixed") \
            if args.pull_rounds else ""
        pull_what = f"{args.size_mb} MiB in {args.layers} gzip layers + busybox"
        with bridge_network(cni_dir, workdir, 0, subnet=SUBNET), \
                runtimes(args, workdir, registry, cni_dir) as found:
            print(f"runtimes: {', '.join(f'{r.name} ({r.endpoint}, pid {r.pid})' for r in found)}",
                  flush=True)
            for r in found:
                pull_image(r.endpoint, image)
                r.cycle(image)  # warm-up: page cache, imports, connections; not counted
                for samples in r.steps.values():
                    samples.clear()
            time.sleep(2)
            for r in found:
                r.scalars["daemon RSS idle"] = rss_bytes(r.pid) / MIB if r.pid else None
            interleaved(found, args.rounds, lambda r: r.cycle(image))
            print(f"lifecycle done at {time.monotonic() - started:.0f} s", flush=True)
            if args.pull_rounds:
                for r in found:
                    timed_pull(r.endpoint, pull_ref)  # warm-up
                interleaved(found, args.pull_rounds,
                            lambda r: r.steps["pull"].append(timed_pull(r.endpoint, pull_ref)))
                print(f"pulls done at {time.monotonic() - started:.0f} s", flush=True)
            for r in found:
                r.populate(image, args.pods)
            print(f"{args.pods} pods each at {time.monotonic() - started:.0f} s", flush=True)
            time.sleep(2)
            for r in found:
                r.memory()
            interleaved(found, args.rounds, Runtime.list_round)
            interleaved(found, 1, lambda r: r.scalars.__setitem__(
                "daemon CPU polling", r.poll(args.poll_seconds)))
            lines = report(found, args, pull_what)
    print("\n".join(lines))
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])

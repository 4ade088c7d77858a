"""Prometheus metrics: CRI operation counts, errors and latencies, image pulls, and the
number of containers and pods by state (counted at scrape time).

Everything lives in this module's own registry (`REGISTRY`), served on
monitoring.metrics_address:metrics_port by `MetricsServer` when the port is not 0.
`record_rpc` and `record_pull` never raise: they sit on the RPC path.

The counters and histograms are this module's own small ones (`Counter`, `Histogram`):
recording is a dict update, and prometheus_client (several MiB of modules) is imported
only when `REGISTRY` is first used: when metrics are served or read, never on a daemon
that has them off. `REGISTRY` exposes them exactly as prometheus_client's own would
(`_total`, `_created`, `_bucket`, `_count`, `_sum`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from cripy.httpserver import HTTPConnections, Request, Response, error_response
from cripy.runtime.store import ContainerState, PodState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric

    from cripy.runtime.container import ContainerManager
    from cripy.runtime.sandbox import SandboxManager

log = logging.getLogger(__name__)

# Every state is exported, zero or not, so the series never disappear.
CONTAINER_STATES = tuple(str(s) for s in ContainerState)
POD_STATES = tuple(str(s) for s in PodState)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0)
_PULL_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class _Series:
    """What Counter and Histogram share: a name, help, label names, and one entry per
    label values seen (an unlabelled one has its single entry from the start)."""

    def __init__(self, name: str, documentation: str,
                 labelnames: Iterable[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._created: dict[tuple[str, ...], float] = {}
        _ALL.append(self)

    def _check(self, labels: tuple[str, ...]) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {labels}")

    def collect(self) -> Metric:
        raise NotImplementedError


class Counter(_Series):
    def __init__(self, name: str, documentation: str,
                 labelnames: Iterable[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0
            self._created[()] = time.time()

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self._check(labels)
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            if labels not in self._values:
                self._values[labels] = 0.0
                self._created[labels] = time.time()
            self._values[labels] += amount

    def collect(self) -> Metric:
        from prometheus_client.metrics_core import CounterMetricFamily
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            entries = [(k, v, self._created[k]) for k, v in self._values.items()]
        for labels, count, created in entries:
            family.add_metric(labels, count, created=created)
        return family


class Histogram(_Series):
    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 *, buckets: tuple[float, ...]) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(sorted(buckets))
        self._counts: dict[tuple[str, ...], list[float]] = {}  # per bucket, then +Inf
        self._sums: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._entry(())

    def _entry(self, labels: tuple[str, ...]) -> list[float]:
        counts = self._counts.get(labels)
        if counts is None:
            counts = self._counts[labels] = [0.0] * (len(self.bounds) + 1)
            self._sums[labels] = 0.0
            self._created[labels] = time.time()
        return counts

    def observe(self, amount: float, *labels: str) -> None:
        self._check(labels)
        with self._lock:
            self._entry(labels)[bisect.bisect_left(self.bounds, amount)] += 1
            self._sums[labels] += amount

    def collect(self) -> Metric:
        from prometheus_client.metrics_core import HistogramMetricFamily
        from prometheus_client.samples import Sample
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*(repr(float(b)) for b in self.bounds), "+Inf"]  # as Prometheus spells them
        with self._lock:
            entries = [(k, list(c), self._sums[k], self._created[k])
                       for k, c in self._counts.items()]
        for labels, counts, total, created in entries:
            cumulative, acc = [], 0.0
            for edge, count in zip(edges, counts, strict=True):
                acc += count
                cumulative.append((edge, acc))
            family.add_metric(labels, cumulative, total)
            family.samples.append(Sample(f"{self.name}_created",
                                         dict(zip(self.labelnames, labels, strict=True)),
                                         created))
        return family


class _OwnMetrics:
    """The collector that shows this module's counters and histograms to REGISTRY."""

    def collect(self) -> Iterable[Metric]:
        return [series.collect() for series in list(_ALL)]


_ALL: list[_Series] = []
_registry: CollectorRegistry | None = None
_registry_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    if name == "REGISTRY":
        return get_registry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_registry() -> CollectorRegistry:
    """The registry of every cripy metric (and the process's), made on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
            made = CollectorRegistry()
            ProcessCollector(registry=made)
            PlatformCollector(registry=made)
            made.register(_OwnMetrics())
            _registry = made
        return _registry


OPERATIONS = Counter("cripy_operations", "CRI operations handled, by RPC name.",
                     ["operation"])
OPERATION_ERRORS = Counter("cripy_operations_errors",
                           "CRI operations that failed, by RPC name and gRPC status code.",
                           ["operation", "code"])
OPERATION_LATENCY = Histogram("cripy_operations_latency_seconds",
                              "Time taken by CRI operations, by RPC name.", ["operation"],
                              buckets=_LATENCY_BUCKETS)
PULL_BYTES = Counter("cripy_image_pulls_bytes", "Bytes downloaded by image pulls.")
PULL_DURATION = Histogram("cripy_image_pull_duration_seconds", "Time taken by image pulls.",
                          buckets=_PULL_BUCKETS)
POD_CREATION_STEPS = Histogram(
    "cripy_pod_creation_step_seconds",
    "Time taken by each step of RunPodSandbox (cgroup, namespaces, shm, cni, pod_files, "
    "infra), by step.", ["step"], buckets=_LATENCY_BUCKETS)
POD_TEARDOWN_STEPS = Histogram(
    "cripy_pod_teardown_step_seconds",
    "Time taken by each step of StopPodSandbox and RemovePodSandbox, by RPC name and step.",
    ["operation", "step"], buckets=_LATENCY_BUCKETS)
CONTAINER_CREATION_STEPS = Histogram(
    "cripy_container_creation_step_seconds",
    "Time taken by each step of CreateContainer (image, rootfs, spec, runc_create) and "
    "StartContainer (start), by step.", ["step"], buckets=_LATENCY_BUCKETS)


def record_rpc(name: str, seconds: float, code: str | None) -> None:
    """One CRI call `name` took `seconds`; `code` is the gRPC status name of its error,
    None when it succeeded."""
    try:
        OPERATIONS.inc(1.0, name)
        OPERATION_LATENCY.observe(max(seconds, 0.0), name)
        if code is not None:
            OPERATION_ERRORS.inc(1.0, name, code)
    except Exception:  # metrics must never fail an RPC
        log.exception("recording metrics of %s failed", name)


def record_pull(bytes_: int, seconds: float) -> None:
    """An image pull downloaded `bytes_` bytes in `seconds`."""
    try:
        PULL_BYTES.inc(max(bytes_, 0))
        PULL_DURATION.observe(max(seconds, 0.0))
    except Exception:
        log.exception("recording image pull metrics failed")


def record_steps(histogram: Histogram, steps: Mapping[str, float], *labels: str) -> None:
    """Observe each step's seconds in `histogram` (one of the *_STEPS above); `labels` are
    its labels before "step"."""
    try:
        for step, seconds in steps.items():
            histogram.observe(max(seconds, 0.0), *labels, step)
    except Exception:
        log.exception("recording step metrics failed")


class StateCollector:
    """cripy_containers{state} and cripy_pods{state}, counted from the managers when
    scraped (no runc calls: the exit watcher keeps the states current)."""

    def __init__(self, containers: ContainerManager, sandboxes: SandboxManager) -> None:
        self.containers = containers
        self.sandboxes = sandboxes

    def describe(self) -> Iterable[Metric]:
        return [_containers_family(), _pods_family()]

    def collect(self) -> Iterable[Metric]:
        containers = _containers_family()
        _add_counts(containers, CONTAINER_STATES, (str(c.state) for c in self.containers.all()))
        pods = _pods_family()
        _add_counts(pods, POD_STATES, (str(s.state) for s in self.sandboxes.all()))
        return [containers, pods]


def _containers_family() -> GaugeMetricFamily:
    from prometheus_client.metrics_core import GaugeMetricFamily
    return GaugeMetricFamily("cripy_containers", "Containers, by state.", labels=["state"])


def _pods_family() -> GaugeMetricFamily:
    from prometheus_client.metrics_core import GaugeMetricFamily
    return GaugeMetricFamily("cripy_pods", "Pod sandboxes, by state.", labels=["state"])


def _add_counts(family: GaugeMetricFamily, known: tuple[str, ...],
                states: Iterable[str]) -> None:
    tally = Tally(states)
    for state in [*known, *sorted(set(tally) - set(known))]:
        family.add_metric([state], tally[state])


class MetricsServer:
    """GET /metrics over HTTP on address:port (port 0: any free one, see `port`)."""

    def __init__(self, address: str, port: int, containers: ContainerManager | None = None,
                 sandboxes: SandboxManager | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.address = address
        self.requested_port = port
        self.registry = registry if registry is not None else get_registry()
        self._collector = (StateCollector(containers, sandboxes)
                           if containers is not None and sandboxes is not None else None)
        self._clients = HTTPConnections(self.handle)
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port really bound (after start)."""
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self._collector is not None:
            self.registry.register(self._collector)
        try:
            self._server = await asyncio.start_server(self._clients, self.address,
                                                      self.requested_port)
        except BaseException:
            self._unregister()
            raise
        log.info("metrics on http://%s:%d/metrics", self.address, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._clients.close()
            await self._server.wait_closed()
            self._server = None
        self._unregister()

    def _unregister(self) -> None:
        if self._collector is not None:
            with contextlib.suppress(KeyError):
                self.registry.unregister(self._collector)

    async def handle(self, request: Request) -> Response:
        if request.path != "/metrics":
            return error_response(404, f"no such endpoint: {request.path} (try /metrics)")
        if request.method not in ("GET", "HEAD"):
            response = error_response(405, f"{request.method} is not allowed on /metrics")
            response.headers.append(("Allow", "GET, HEAD"))
            return response
        from prometheus_client.exposition import choose_encoder
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(200, encoder(self.registry), content_type)

"""Prometheus metrics: the recording helpers, the state gauges, the HTTP endpoint."""

from __future__ import annotations

import asyncio
import socket
import uuid
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cripy import metrics
from cripy.metrics import REGISTRY, MetricsServer, StateCollector, record_pull, record_rpc


def value(name: str, labels: dict[str, str] | None = None,
          registry: CollectorRegistry = REGISTRY) -> float:
    found = registry.get_sample_value(name, labels or {})
    return 0.0 if found is None else found


class FakeManager:
    """What StateCollector reads of a manager: `all()` snapshots with a state."""

    def __init__(self, states: list[str]) -> None:
        self.items = [SimpleNamespace(state=s) for s in states]

    def all(self) -> list[SimpleNamespace]:
        return list(self.items)


def fake_managers(container_states: list[str], pod_states: list[str]) -> tuple[Any, Any]:
    return cast(Any, FakeManager(container_states)), cast(Any, FakeManager(pod_states))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_record_rpc() -> None:
    op = f"Op{uuid.uuid4().hex[:8]}"
    record_rpc(op, 0.003, None)
    record_rpc(op, 0.2, "NOT_FOUND")
    record_rpc(op, 0.4, "NOT_FOUND")
    record_rpc(op, -1.0, "INTERNAL")  # a clock step never breaks anything
    assert value("cripy_operations_total", {"operation": op}) == 4
    assert value("cripy_operations_errors_total", {"operation": op, "code": "NOT_FOUND"}) == 2
    assert value("cripy_operations_errors_total", {"operation": op, "code": "INTERNAL"}) == 1
    assert value("cripy_operations_latency_seconds_count", {"operation": op}) == 4
    assert value("cripy_operations_latency_seconds_sum", {"operation": op}) == \
        pytest.approx(0.603)
    assert value("cripy_operations_latency_seconds_bucket",
                 {"operation": op, "le": "0.005"}) == 2
    text = generate_latest(REGISTRY).decode()
    assert f'cripy_operations_total{{operation="{op}"}} 4.0' in text
    assert f'cripy_operations_errors_total{{code="NOT_FOUND",operation="{op}"}} 2.0' in text
    assert "# TYPE cripy_operations_latency_seconds histogram" in text


def test_record_pull() -> None:
    before_bytes = value("cripy_image_pulls_bytes_total")
    before_count = value("cripy_image_pull_duration_seconds_count")
    record_pull(1000, 2.0)
    record_pull(24, 0.5)
    record_pull(-5, 0.1)  # nonsense is clamped, not raised
    assert value("cripy_image_pulls_bytes_total") == before_bytes + 1024
    assert value("cripy_image_pull_duration_seconds_count") == before_count + 3
    text = generate_latest(REGISTRY).decode()
    assert "# TYPE cripy_image_pulls_bytes_total counter" in text
    assert "# TYPE cripy_image_pull_duration_seconds histogram" in text


def test_state_gauges_are_counted_at_scrape_time() -> None:
    containers, sandboxes = fake_managers(["running", "running", "exited", "weird"],
                                          ["ready", "notready"])
    registry = CollectorRegistry()
    registry.register(StateCollector(containers, sandboxes))

    def gauge(name: str, state: str) -> float:
        return value(name, {"state": state}, registry)

    assert gauge("cripy_containers", "running") == 2
    assert gauge("cripy_containers", "exited") == 1
    assert gauge("cripy_containers", "created") == 0  # every known state, zero or not
    assert gauge("cripy_containers", "creating") == 0
    assert gauge("cripy_containers", "weird") == 1
    assert gauge("cripy_pods", "ready") == 1
    assert gauge("cripy_pods", "notready") == 1
    assert gauge("cripy_pods", "creating") == 0
    containers.items.append(SimpleNamespace(state="created"))
    del sandboxes.items[1]
    assert gauge("cripy_containers", "created") == 1
    assert gauge("cripy_pods", "notready") == 0
    text = generate_latest(registry).decode()
    assert "# TYPE cripy_containers gauge" in text
    assert 'cripy_containers{state="running"} 2.0' in text


def test_metrics_endpoint() -> None:
    containers, sandboxes = fake_managers(["running"], ["ready"])
    port = free_port()
    op = f"Op{uuid.uuid4().hex[:8]}"
    record_rpc(op, 0.01, None)

    async def main() -> None:
        server = MetricsServer("127.0.0.1", port, containers, sandboxes)
        await server.start()
        assert server.port == port
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                         trust_env=False) as client:
                r = await client.get("/metrics")
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/plain")
                assert 'cripy_containers{state="running"} 1.0' in r.text
                assert 'cripy_pods{state="ready"} 1.0' in r.text
                assert f'cripy_operations_total{{operation="{op}"}} 1.0' in r.text
                r = await client.get("/metrics",
                                     headers={"Accept": "application/openmetrics-text"})
                assert r.headers["content-type"].startswith("application/openmetrics-text")
                assert r.text.endswith("# EOF\n")
                assert (await client.get("/")).status_code == 404
                r = await client.post("/metrics")
                assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
        finally:
            await server.stop()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        # Stopped: its collector is gone from the registry, so a new server may add one.
        assert REGISTRY.get_sample_value("cripy_containers", {"state": "running"}) is None
        again = MetricsServer("127.0.0.1", 0, containers, sandboxes)
        await again.start()
        assert again.port != 0
        await again.stop()

    asyncio.run(main())


def test_metrics_server_start_failure_unregisters() -> None:
    containers, sandboxes = fake_managers([], [])

    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = MetricsServer("127.0.0.1", taken.getsockname()[1], containers, sandboxes)
            with pytest.raises(OSError):
                await server.start()
        assert REGISTRY.get_sample_value("cripy_pods", {"state": "ready"}) is None

    asyncio.run(main())


def test_every_state_of_the_store_is_exported() -> None:
    from cripy.runtime.store import ContainerState, PodState

    assert metrics.CONTAINER_STATES == ("creating", "created", "running", "exited")
    assert set(metrics.CONTAINER_STATES) == set(ContainerState)
    assert metrics.POD_STATES == ("creating", "ready", "notready")
    assert set(metrics.POD_STATES) == set(PodState)

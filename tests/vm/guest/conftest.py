"""Fixtures of the guest checks (they run inside the test VM only).

- ``registry``: a docker-registry on the guest's 127.0.0.1 (session)
- ``busybox``: the busybox test image's reference, pushed to it (session)
- ``node``: a `GuestNode` per cgroup driver (session, parametrized over DRIVERS): one
  daemon configured with that `[runtime] cgroup_manager`, a bridge network, busybox pulled,
  and the kubelet's cgroup layout (``node.layout``). A check runs once per driver unless
  it is marked ``@pytest.mark.drivers("systemd")`` (or "cgroupfs"): a check whose subject
  does not depend on the driver runs on one (a comment at the marker says why); the other
  driver's copy is deselected, so each driver's daemon still starts once only
- ``pods``: a `GuestPods` for one check: ``pods.run()`` makes a pod in its own
  pod<uid> cgroup, ``pods.create()`` a container; afterwards everything is removed and
  the check fails if anything leaked (cgroups, scopes, mounts, conmons, veths)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.images import push_busybox
from tests.support.pods import bridge_network
from tests.support.registry import Registry
from tests.vm.guest.node import (
    DRIVERS,
    GuestNode,
    GuestPods,
    daemon_config,
    layout_for,
    save_daemon_log,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "drivers(*names): run the check on these cgroup drivers only")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the copies of ``drivers``-marked checks made for the other drivers.

    (Parametrizing such a check with its driver alone would give it param index 0, which
    pytest groups with the cgroupfs node's checks: the nodes would be set up twice.)"""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("drivers")
        callspec = getattr(item, "callspec", None)
        driver = callspec.params.get("node") if callspec is not None else None
        unknown = set(marker.args) - set(DRIVERS) if marker else set()
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: unknown cgroup drivers {sorted(unknown)}")
        if marker is not None and driver is not None and driver not in marker.args:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    with Registry() as reg:
        yield reg


@pytest.fixture(scope="session")
def busybox(registry: Registry) -> str:
    return push_busybox(registry).ref


@pytest.fixture(scope="session", params=DRIVERS)
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         registry: Registry, busybox: str) -> Iterator[GuestNode]:
    driver: str = request.param
    tmp = tmp_path_factory.mktemp(f"node-{driver}")
    daemon = Daemon(tmp / "daemon", insecure_registries=[registry.host],
                    extra_config=daemon_config(driver))
    layout = layout_for(driver)
    failed_before = request.session.testsfailed
    try:
        with bridge_network(daemon.cni_dir, tmp, 1) as bridge, daemon:
            daemon.pull(busybox)
            yield GuestNode(daemon, bridge, busybox, tmp, driver=driver, layout=layout)
    finally:
        if request.session.testsfailed != failed_before:
            save_daemon_log(daemon, driver)
        layout.close()


@pytest.fixture
def pods(node: GuestNode, tmp_path: Path) -> Iterator[GuestPods]:
    tracker = GuestPods(node, tmp_path / "logs")
    yield tracker
    leaks = tracker.remove()
    assert leaks == [], f"the check leaked: {leaks}"

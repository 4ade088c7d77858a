"""Fixtures of the guest checks (they run inside the test VM only).

- ``registry``: a docker-registry on the guest's 127.0.0.1 (session)
- ``busybox``: the busybox test image's reference, pushed to it (session)
- ``node``: a `GuestNode` per cgroup driver (session, parametrized over DRIVERS): one
  daemon configured with that `[runtime] cgroup_manager`, a bridge network, busybox pulled,
  and the kubelet's cgroup layout (``node.layout``)
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

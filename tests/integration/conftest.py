"""Shared fixtures for the integration tests: real registries and pushed test images.

Every test collected under tests/integration gets the ``integration`` marker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.images import ImageSet, push_standard_images
from tests.support.pods import Node, Pods, bridge_network, leftovers, remove_cgroup
from tests.support.registry import Registry

#: Credentials of ``auth_registry`` and ``token_registry``.
USER = "alice"
PASSWORD = "wonderland"

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """An anonymous registry for the whole session."""
    with Registry() as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry() -> Iterator[Registry]:
    """A registry with HTTP basic auth (htpasswd): ``alice`` / ``wonderland``."""
    with Registry(htpasswd=(USER, PASSWORD)) as reg:
        yield reg


@pytest.fixture(scope="session")
def token_registry() -> Iterator[Registry]:
    """A registry with bearer token auth (token server in-process): ``alice`` /
    ``wonderland``; ``token_registry.token_requests`` counts token requests."""
    with Registry(token=(USER, PASSWORD)) as reg:
        yield reg


@pytest.fixture(scope="session")
def images(registry: Registry) -> ImageSet:
    """The standard test images pushed once to ``registry``: busybox, multilayer,
    index, zstd, uncompressed, user, username, docker."""
    return push_standard_images(registry)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
         images: Any) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("node")
    daemon = Daemon(tmp / "daemon", insecure_registries=[registry.host])
    with bridge_network(daemon.cni_dir, tmp, 1) as bridge, daemon:
        daemon.pull(images.busybox.ref)
        yield Node(daemon, bridge, images.busybox.ref, tmp)


@pytest.fixture
def pods(node: Node, tmp_path: Path) -> Iterator[Pods]:
    tracker = Pods(node, tmp_path / "logs")
    try:
        yield tracker
    finally:
        tracker.cleanup()
        leaks = leftovers(node.daemon, node.bridge, tracker.cgroup_parent)
        remove_cgroup(tracker.cgroup_parent)
        assert leaks == [], f"the test leaked: {leaks}"

"""Shared fixtures for the integration tests: real registries and pushed test images.

Every test collected under tests/integration gets the ``integration`` marker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import ImageSet, push_standard_images
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

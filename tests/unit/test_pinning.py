from __future__ import annotations

from pathlib import Path

import pytest

from cripy.config import ConfigError, load
from cripy.errors import InvalidArgumentError
from cripy.image.pinning import PinnedImages

PAUSE = "registry.local/pause:3.9"
APP = "registry.local/team/app:1.0"
BUSYBOX = "docker.io/library/busybox:latest"


@pytest.mark.parametrize(("pattern", "pinned"), [
    (PAUSE, {PAUSE}),
    ("busybox", {BUSYBOX}),  # an exact reference also matches its normalized form
    ("registry.local/*", {PAUSE, APP}),
    ("registry.local/team/*", {APP}),
    ("*pause*", {PAUSE}),
    ("*", {PAUSE, APP, BUSYBOX}),
    ("registry.local/pause", set()),  # exact: another tag is another name
])
def test_patterns_match_as_crio_documents(pattern: str, pinned: set[str]) -> None:
    matcher = PinnedImages([pattern])
    assert {n for n in (PAUSE, APP, BUSYBOX) if matcher.matches([n])} == pinned


def test_repo_digests_are_names_too() -> None:
    digest = "registry.local/pause@sha256:" + "a" * 64
    assert PinnedImages(["registry.local/pause@*"]).matches(["registry.local/x:1", digest])


@pytest.mark.parametrize("pattern", ["", " pause", "*pause", "reg*/pause", "**", "a b"])
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(InvalidArgumentError, match="pinned image pattern"):
        PinnedImages([pattern])


def test_config_load_names_the_bad_pattern(tmp_path: Path) -> None:
    path = tmp_path / "cripy.toml"
    path.write_text('[image]\npinned_images = ["registry.local/pause:3.9", "*pau*se"]\n')
    with pytest.raises(ConfigError, match=r"image.pinned_images: .*'\*pau\*se'"):
        load(path)
    path.write_text('[image]\npinned_images = ["registry.local/*"]\n')
    assert load(path).image.pinned_images == ["registry.local/*"]

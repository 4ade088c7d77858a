"""Pinned images: the `[image] pinned_images` patterns, as CRI-O spells them.

A pattern is one of:

- exact: `registry.local/pause:3.9` matches that name only. A pattern that parses as an
  image reference is also compared in its normalized form, so `busybox` pins
  `docker.io/library/busybox:latest`;
- glob: a trailing `*`, `registry.local/system/*` matches every name with that prefix
  (`*` alone matches every image);
- keyword: `*` at both ends, `*pause*` matches every name containing `pause`.

A `*` anywhere else (leading only, or in the middle) is refused when the config is
loaded. Names are an image's repo tags and repo digests (`name:tag`, `name@digest`).

Pinned only tells the kubelet's image garbage collection to leave the image alone;
RemoveImage still removes a pinned image when asked, as with CRI-O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cripy.errors import InvalidArgumentError
from cripy.image.reference import parse_reference


@dataclass(frozen=True)
class _Pattern:
    kind: str  # "exact", "glob" or "keyword"
    text: str  # without the stars
    normalized: str = ""  # exact patterns: the reference's normalized form, if it is one

    def matches(self, name: str) -> bool:
        if self.kind == "glob":
            return name.startswith(self.text)
        if self.kind == "keyword":
            return self.text in name
        return name in (self.text, self.normalized)


def _compile(pattern: str) -> _Pattern:
    """One pattern, checked; raises InvalidArgumentError naming what is wrong with it."""
    if not pattern or pattern != pattern.strip() or any(c.isspace() for c in pattern):
        raise InvalidArgumentError(
            f"pinned image pattern {pattern!r} is empty or contains white space")
    if len(pattern) > 1 and pattern.startswith("*") and pattern.endswith("*"):
        kind, text = "keyword", pattern[1:-1]
    elif pattern.endswith("*"):
        kind, text = "glob", pattern[:-1]
    else:
        kind, text = "exact", pattern
    if "*" in text:
        raise InvalidArgumentError(
            f"pinned image pattern {pattern!r}: '*' may only end a pattern (glob) or "
            "both start and end it (keyword)")
    if kind == "keyword" and not text:
        raise InvalidArgumentError(f"pinned image pattern {pattern!r}: empty keyword")
    normalized = ""
    if kind == "exact":
        try:
            ref = parse_reference(text)
        except InvalidArgumentError:
            pass
        else:
            normalized = f"{ref.name}@{ref.digest}" if ref.digest else f"{ref.name}:{ref.tag}"
    return _Pattern(kind, text, normalized)


class PinnedImages:
    """Tells which images the configured patterns pin."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self._patterns = [_compile(p) for p in patterns]

    def matches(self, names: Iterable[str]) -> bool:
        return any(p.matches(name) for name in names for p in self._patterns)


def validate_patterns(patterns: Sequence[str]) -> None:
    """Raise InvalidArgumentError for the first bad pattern (for config loading)."""
    PinnedImages(patterns)

"""The streaming servers' single-use token cache."""

from __future__ import annotations

import re

import pytest

from cripy.streaming.tokens import TokenCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tokens_are_random_url_safe_and_long() -> None:
    cache: TokenCache[str] = TokenCache(60)
    tokens = {cache.issue("x") for _ in range(500)}
    assert len(tokens) == 500
    for token in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", token)  # >= 128 bits of base64url


def test_a_token_is_taken_once() -> None:
    cache: TokenCache[str] = TokenCache(60)
    a, b = cache.issue("a"), cache.issue("b")
    assert cache.take(b) == "b"
    assert cache.take(b) is None
    assert cache.take(a) == "a"
    assert cache.take(a) is None
    assert cache.take("unknown") is None
    assert cache.take("") is None
    assert len(cache) == 0


def test_tokens_expire_after_the_ttl() -> None:
    clock = Clock()
    cache: TokenCache[str] = TokenCache(10, clock=clock)
    early, late = cache.issue("early"), cache.issue("late")
    clock.now += 9.99
    assert cache.take(early) == "early"
    clock.now += 0.01  # exactly the deadline: gone
    assert cache.take(late) is None
    assert len(cache) == 0


def test_expired_tokens_are_dropped_when_issuing() -> None:
    clock = Clock()
    cache: TokenCache[int] = TokenCache(5, clock=clock)
    for i in range(10):
        cache.issue(i)
    clock.now += 3
    kept = cache.issue(99)
    assert len(cache) == 11
    clock.now += 2.5
    cache.issue(100)
    assert len(cache) == 2  # the first ten expired
    assert cache.take(kept) == 99


def test_the_cache_is_bounded_and_evicts_the_oldest() -> None:
    cache: TokenCache[int] = TokenCache(60, max_size=3)
    tokens = [cache.issue(i) for i in range(5)]
    assert len(cache) == 3
    assert cache.take(tokens[0]) is None
    assert cache.take(tokens[1]) is None
    assert [cache.take(t) for t in tokens[2:]] == [2, 3, 4]


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenCache(60, max_size=0)

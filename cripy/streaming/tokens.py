"""Single-use tokens for streaming URLs (the kubelet's request cache).

Exec, Attach and PortForward answer with a URL holding a random token; the streaming
server trades the token for the request it stands for, once, within the TTL. The cache
is bounded: when full, the oldest token goes.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

TOKEN_BYTES = 16  # 128 bits, URL-safe base64 without padding: 22 characters
DEFAULT_MAX_SIZE = 1000  # the kubelet's limit of requests in flight


class TokenCache(Generic[T]):
    def __init__(
        self,
        ttl: float,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.ttl = ttl
        self.max_size = max_size
        self._clock = clock
        # token -> (deadline, target), oldest first
        self._entries: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def issue(self, target: T) -> str:
        """A fresh token for `target`."""
        now = self._clock()
        self._expire(now)
        while len(self._entries) >= self.max_size:
            self._entries.popitem(last=False)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        while token in self._entries:  # never in practice
            token = secrets.token_urlsafe(TOKEN_BYTES)
        self._entries[token] = (now + self.ttl, target)
        return token

    def take(self, token: str) -> T | None:
        """The target of `token`, removing it; None if unknown, used or expired."""
        entry = self._entries.pop(token, None)
        if entry is None:
            return None
        deadline, target = entry
        if self._clock() >= deadline:
            return None
        return target

    def _expire(self, now: float) -> None:
        # Entries are in issue order and share one TTL, so deadlines ascend too.
        while self._entries:
            token, (deadline, _) = next(iter(self._entries.items()))
            if deadline > now:
                break
            del self._entries[token]

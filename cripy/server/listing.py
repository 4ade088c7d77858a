"""List responses made of per-snapshot encodings.

Turning a record into its protobuf (metadata, labels and annotations, the maps filled entry
by entry) costs far more than anything else in ListContainers and ListPodSandbox. The
store's objects are frozen snapshots, replaced on every change, so the encoding of one
snapshot never goes stale. `Encodings` keeps each snapshot's encoded list entry for as long
as the snapshot itself lives (a weak reference whose end drops the entry: the cache holds
no more than the live objects, and an update is a new snapshot, so a new entry). A response
is the concatenation of its entries (each a field of wire type 2: tag, length, message),
parsed once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from google.protobuf.message import Message

from cripy.runtime.store import Container, Sandbox

T = TypeVar("T", Container, Sandbox)
M = TypeVar("M", bound=Message)


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Encodings(Generic[T]):
    """Each live snapshot's `convert`ed message, encoded (length first) for any response
    field that repeats or holds one."""

    def __init__(self, convert: Callable[[T], Message]) -> None:
        self._convert: Callable[[T], Message] = convert
        self._entries: dict[int, tuple[weakref.ref[T], bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def field(self, cls: type[Message], name: str, objs: Iterable[T]) -> bytes:
        """`objs` encoded as the message field `name` of `cls` (one, or repeated)."""
        bodies = [self._body(obj) for obj in objs]
        if not bodies:
            return b""
        tag = varint(cls.DESCRIPTOR.fields_by_name[name].number << 3 | 2)
        return tag + tag.join(bodies)

    def response(self, cls: type[M], name: str, objs: Iterable[T]) -> M:
        """A new `cls` whose field `name` holds `objs`."""
        return cls.FromString(self.field(cls, name, objs))

    def _body(self, obj: T) -> bytes:
        key = id(obj)
        found = self._entries.get(key)
        if found is not None and found[0]() is obj:
            return found[1]
        payload = self._convert(obj).SerializeToString()
        body = varint(len(payload)) + payload
        self._entries[key] = (weakref.ref(obj, lambda ref: self._forget(key, ref)), body)
        return body

    def _forget(self, key: int, ref: weakref.ref[T]) -> None:
        found = self._entries.get(key)
        if found is not None and found[0] is ref:
            del self._entries[key]

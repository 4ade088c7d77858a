"""The runtime's state: pods and containers, their states, names and durable records.

Only state lives here (the lifecycle controllers in sandbox.py and container.py drive it):

- `Sandbox` and `Container` are frozen: every reader holds a snapshot that never changes
  under it. A change is a new object made by `Store.update(id, fn)`, which writes the
  record (atomically, in a thread) *before* the in-memory object is replaced, so what a
  client was told is always on disk first.
- States are enums with an explicit table of allowed transitions; an update that breaks
  the table is a bug and raises `IllegalTransition`.
- One ID-prefix index and one name registrar per kind.
- Records carry a schema version. The loader ignores fields it does not know, migrates
  older versions, and quarantines (moves aside, with a log line) a record it cannot read,
  so one bad file never keeps the daemon from starting.

This module imports nothing of cripy's but the API, the errors and the file helpers, so
everything (metrics, the status API, the servers) may import it.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import dataclasses
import enum
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

from google.protobuf.message import DecodeError

from cripy.api import api_pb2 as pb
from cripy.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from cripy.fsutil import atomic_write_json, remove_tree

log = logging.getLogger(__name__)

#: The version every record is written with. Version 1 records have no version field.
SCHEMA_VERSION = 2
SCHEMA_FIELD = "schema_version"


class IllegalTransition(RuntimeError):
    """A state change the transition table forbids: a bug in a controller."""


class PodState(enum.StrEnum):
    CREATING = "creating"  # the record exists, the pod is being made
    READY = "ready"
    NOTREADY = "notready"  # stopped (or lost its namespaces)


class ContainerState(enum.StrEnum):
    CREATING = "creating"  # the record exists, the container is being made
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


#: Allowed changes. Removal is not a state: the object leaves the store.
POD_TRANSITIONS: Mapping[PodState, frozenset[PodState]] = {
    PodState.CREATING: frozenset({PodState.READY}),
    PodState.READY: frozenset({PodState.NOTREADY}),
    PodState.NOTREADY: frozenset(),
}
CONTAINER_TRANSITIONS: Mapping[ContainerState, frozenset[ContainerState]] = {
    ContainerState.CREATING: frozenset({ContainerState.CREATED}),
    ContainerState.CREATED: frozenset({ContainerState.RUNNING, ContainerState.EXITED}),
    ContainerState.RUNNING: frozenset({ContainerState.EXITED}),
    ContainerState.EXITED: frozenset(),
}

#: What the OCI runtime reports for a frozen container: not a state of the records.
PAUSED = "paused"

CONTAINER_STATE_TO_PB: Mapping[ContainerState, pb.ContainerState] = {
    ContainerState.CREATED: pb.CONTAINER_CREATED,
    ContainerState.RUNNING: pb.CONTAINER_RUNNING,
    ContainerState.EXITED: pb.CONTAINER_EXITED,
    ContainerState.CREATING: pb.CONTAINER_UNKNOWN,
}


# --- the objects --------------------------------------------------------------------------


def _encode(message: Any) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def _decode(cls: type[Any], text: Any) -> Any:
    if not isinstance(text, str):
        raise ValueError("config is not a string")
    message = cls()
    try:
        message.ParseFromString(base64.b64decode(text, validate=True))
    except DecodeError as exc:
        raise ValueError(f"config does not parse: {exc}") from None
    return message


@dataclass(frozen=True)
class Sandbox:
    id: str
    config: pb.PodSandboxConfig  # never changed in place: an update makes a new one
    runtime_handler: str
    created_at: int
    state: PodState = PodState.CREATING
    ips: tuple[str, ...] = ()
    namespaces: Mapping[str, str] = field(default_factory=dict)  # kind -> pinned file
    infra_pid: int | None = None
    #: step -> seconds of its creation (cripy.runtime.timing); {} in older records
    creation_steps: Mapping[str, float] = field(default_factory=dict)

    kind = "pod sandbox"
    record_name = "pod"
    transitions = POD_TRANSITIONS

    @property
    def name(self) -> str:
        m = self.config.metadata
        return f"k8s_{m.name}_{m.namespace}_{m.uid}_{m.attempt}"

    @property
    def options(self) -> pb.NamespaceOption:
        return self.config.linux.security_context.namespace_options

    @property
    def shares_pid(self) -> bool:
        return self.options.pid == pb.POD

    @property
    def host_network(self) -> bool:
        return bool(self.options.network == pb.NODE)

    def to_record(self) -> dict[str, Any]:
        return {
            SCHEMA_FIELD: SCHEMA_VERSION,
            "id": self.id,
            "config": _encode(self.config),
            "runtime_handler": self.runtime_handler,
            "created_at": self.created_at,
            "state": str(self.state),
            "ips": list(self.ips),
            "namespaces": dict(self.namespaces),
            "infra_pid": self.infra_pid,
            "creation_steps": dict(self.creation_steps),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Self:
        return cls(
            id=_text(record, "id"), config=_decode(pb.PodSandboxConfig, record["config"]),
            runtime_handler=_text(record, "runtime_handler"),
            created_at=_int(record, "created_at"), state=PodState(record["state"]),
            ips=tuple(_texts(record.get("ips") or [])),
            namespaces={str(k): str(v) for k, v in (record.get("namespaces") or {}).items()},
            infra_pid=_optional_int(record.get("infra_pid")),
            creation_steps=_seconds(record.get("creation_steps") or {}),
        )


@dataclass(frozen=True)
class Container:
    id: str
    sandbox_id: str
    config: pb.ContainerConfig  # never changed in place: an update makes a new one
    image_id: str
    pod_name: str
    created_at: int
    log_path: str
    stop_signal: int = signal.SIGTERM
    state: ContainerState = ContainerState.CREATING
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    #: The process's identity as created: uid, gid, then the supplementary groups.
    user: tuple[int, ...] = ()
    #: step -> seconds of its creation and start (cripy.runtime.timing); {} in older records
    creation_steps: Mapping[str, float] = field(default_factory=dict)

    kind = "container"
    record_name = "container"
    transitions = CONTAINER_TRANSITIONS

    @property
    def name(self) -> str:
        return f"k8s_{self.config.metadata.name}_{self.pod_name}"

    @property
    def pb_state(self) -> pb.ContainerState:
        return CONTAINER_STATE_TO_PB[self.state]

    @property
    def live(self) -> bool:
        """Created or running: runc has it, and it may exit."""
        return self.state in (ContainerState.CREATED, ContainerState.RUNNING)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(self) if f.name != "config"}
        record["state"] = str(self.state)
        record["config"] = _encode(self.config)
        record[SCHEMA_FIELD] = SCHEMA_VERSION
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Self:
        return cls(
            id=_text(record, "id"), sandbox_id=_text(record, "sandbox_id"),
            config=_decode(pb.ContainerConfig, record["config"]),
            image_id=_text(record, "image_id"), pod_name=_text(record, "pod_name"),
            created_at=_int(record, "created_at"), log_path=_text(record, "log_path"),
            stop_signal=_int(record, "stop_signal", int(signal.SIGTERM)),
            state=ContainerState(record["state"]),
            started_at=_int(record, "started_at", 0), finished_at=_int(record, "finished_at", 0),
            exit_code=_int(record, "exit_code", 0), reason=_text(record, "reason", ""),
            message=_text(record, "message", ""), pid=_int(record, "pid", 0),
            user=tuple(_ints(record.get("user", []))),
            creation_steps=_seconds(record.get("creation_steps") or {}),
        )


def _text(record: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = record.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def _texts(values: Any) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError("expected a list of strings")
    return values


def _ints(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError("expected a list of integers")
    return values


def _int(record: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = record.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} is not an integer")
    return value


def _seconds(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
        raise ValueError("creation_steps is not an object of numbers")
    return {str(k): float(v) for k, v in value.items()}


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("expected an integer")
    return value


# --- records ------------------------------------------------------------------------------


def _from_v1(record: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had no version field; its fields are version 2's (the loader fills the
    ones the oldest v1 records lack: infra_pid, stop_signal, reason, message)."""
    return {**record, SCHEMA_FIELD: 2}


#: version -> the function that turns such a record into the next version's.
MIGRATIONS: Mapping[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _from_v1}


def upgrade(parsed: Any) -> dict[str, Any]:
    """A parsed record brought to SCHEMA_VERSION; ValueError when that is impossible."""
    if not isinstance(parsed, dict):
        raise ValueError("the record is not a JSON object")
    record: dict[str, Any] = parsed
    version = record.get(SCHEMA_FIELD, 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"schema version {version!r} is not a version")
    if version > SCHEMA_VERSION:
        # Written by a newer cripy: read what this one knows (unknown fields are ignored).
        log.warning("record %s has schema version %d, newer than %d: reading the fields "
                    "this version knows", record.get("id"), version, SCHEMA_VERSION)
        return record
    while version < SCHEMA_VERSION:
        record = MIGRATIONS[version](record)
        version = record[SCHEMA_FIELD]
    return record


T = TypeVar("T", Sandbox, Container)


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """One object directory found at start-up: its object, or None without a usable record
    (never written: a create cut short; or unreadable: quarantined)."""

    id: str
    obj: T | None


class Store(Generic[T]):
    """Every object of one kind, by ID (with a prefix index) and by name, with its record
    at `<directory>/<id>/<record_name>.json`."""

    def __init__(self, cls: type[T], directory: Path, quarantine: Path) -> None:
        self.cls: type[T] = cls
        self.directory = directory
        self.quarantine = quarantine
        directory.mkdir(parents=True, exist_ok=True)
        self._items: dict[str, T] = {}
        self._ids: list[str] = []  # sorted: the prefix index
        self._names: dict[str, str] = {}  # name -> id
        self._updating: dict[str, asyncio.Lock] = {}

    # -- reads (from memory) --------------------------------------------------------------

    def get(self, ident: str) -> T:
        """The object with this ID or unique ID prefix."""
        kind = self.cls.kind
        if not ident:
            raise InvalidArgumentError(f"{kind} ID is empty")
        found = self._items.get(ident)
        if found is not None:
            return found
        i = bisect.bisect_left(self._ids, ident)
        if i == len(self._ids) or not self._ids[i].startswith(ident):
            raise NotFoundError(f"{kind} {ident!r} not found")
        if i + 1 < len(self._ids) and self._ids[i + 1].startswith(ident):
            raise InvalidArgumentError(f"{kind} ID prefix {ident!r} is ambiguous")
        return self._items[self._ids[i]]

    def find(self, object_id: str) -> T | None:
        """The object with exactly this ID, if any."""
        return self._items.get(object_id)

    def all(self) -> list[T]:
        return list(self._items.values())

    def ids(self) -> frozenset[str]:
        return frozenset(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

    def object_dir(self, object_id: str) -> Path:
        return self.directory / object_id

    # -- changes (persisted first) --------------------------------------------------------

    async def add(self, obj: T) -> T:
        """Register a new object: its name must be free. The record is written first."""
        holder = self._names.get(obj.name)
        if holder is not None:
            raise AlreadyExistsError(
                f"{self.cls.kind} name {obj.name!r} is already in use by {holder}")
        if obj.id in self._items:
            raise AlreadyExistsError(f"{self.cls.kind} {obj.id} already exists")
        self._names[obj.name] = obj.id  # taken now: a concurrent add sees it
        try:
            await self._write(obj)
        except BaseException:
            del self._names[obj.name]
            raise
        self._insert(obj)
        return obj

    async def update(self, object_id: str, fn: Callable[[T], T]) -> T:
        """Apply `fn` to the current object, check the state change, write the record,
        then make the result current. Updates of one object are applied one at a time."""
        if object_id not in self._items:  # no lock is kept for an ID that never was
            raise NotFoundError(f"{self.cls.kind} {object_id!r} not found")
        lock = self._updating.setdefault(object_id, asyncio.Lock())
        async with lock:
            current = self._items.get(object_id)
            if current is None:
                raise NotFoundError(f"{self.cls.kind} {object_id!r} not found")
            new = fn(current)
            if new.id != current.id or new.name != current.name:
                raise IllegalTransition(f"{self.cls.kind} {object_id}: ID and name are fixed")
            if new.state != current.state and \
                    new.state not in current.transitions[current.state]:
                raise IllegalTransition(
                    f"{self.cls.kind} {object_id}: {current.state} -> {new.state} "
                    "is not an allowed transition")
            if new == current:
                return current
            await self._write(new)
            if self._items.get(object_id) is current:
                self._items[object_id] = new
            return new

    async def set(self, object_id: str, **changes: Any) -> T:
        """`update` with fields to replace."""
        return await self.update(object_id, lambda o: dataclasses.replace(o, **changes))

    async def delete(self, object_id: str) -> None:
        """Forget the object and remove its directory (record and all). An update in
        flight finishes first, so no record is written back after the removal."""
        async with self._updating.setdefault(object_id, asyncio.Lock()):
            await asyncio.to_thread(remove_tree, self.object_dir(object_id))
            self.forget(object_id)

    def forget(self, object_id: str) -> None:
        obj = self._items.pop(object_id, None)
        self._updating.pop(object_id, None)
        if obj is None:
            return
        i = bisect.bisect_left(self._ids, object_id)
        if i < len(self._ids) and self._ids[i] == object_id:
            del self._ids[i]
        if self._names.get(obj.name) == object_id:
            del self._names[obj.name]

    def _insert(self, obj: T) -> None:
        if obj.id not in self._items:
            bisect.insort(self._ids, obj.id)
        self._items[obj.id] = obj
        self._names[obj.name] = obj.id

    async def _write(self, obj: T) -> None:
        await asyncio.to_thread(self._save, obj.id, obj.to_record())

    def _save(self, object_id: str, record: dict[str, Any]) -> None:
        directory = self.object_dir(object_id)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / f"{self.cls.record_name}.json", record)

    # -- start-up -------------------------------------------------------------------------

    async def load(self) -> list[Loaded[T]]:
        """Read every record into the store (in a thread); see `Loaded`."""
        found = await asyncio.to_thread(self._load_all)
        for item in found:
            if item.obj is not None:
                self._insert(item.obj)
        return found

    def _load_all(self) -> list[Loaded[T]]:
        out: list[Loaded[T]] = []
        for path in sorted(self.directory.iterdir()):
            if not path.is_dir():
                continue
            record_path = path / f"{self.cls.record_name}.json"
            try:
                text = record_path.read_bytes()
            except FileNotFoundError:
                log.warning("%s %s has no record (its create was cut short)",
                            self.cls.kind, path.name)
                out.append(Loaded(path.name, None))
                continue
            try:
                obj = self.cls.from_record(upgrade(json.loads(text)))
                if obj.id != path.name:
                    raise ValueError(f"the record is of {obj.id!r}")
            except (ValueError, KeyError, TypeError) as exc:
                self._quarantine(record_path, exc)
                out.append(Loaded(path.name, None))
                continue
            out.append(Loaded(path.name, obj))
        return out

    def _quarantine(self, record_path: Path, reason: Exception) -> None:
        self.quarantine.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.quarantine / \
            f"{self.cls.record_name}-{record_path.parent.name}-{time.time_ns()}.json"
        os.replace(record_path, target)
        log.error("%s %s: record unreadable (%s): moved to %s; starting without it",
                  self.cls.kind, record_path.parent.name, reason, target)

"""The runtime store: states and their transitions, the prefix index, names, records."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from cripy.runtime.store import (
    CONTAINER_TRANSITIONS,
    POD_TRANSITIONS,
    SCHEMA_VERSION,
    Container,
    ContainerState,
    IllegalTransition,
    PodState,
    Sandbox,
    Store,
    upgrade,
)


def pod(pod_id: str, name: str = "web", state: PodState = PodState.CREATING) -> Sandbox:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}"))
    return Sandbox(id=pod_id, config=config, runtime_handler="", created_at=1, state=state)


def container(cid: str, name: str = "app", state: ContainerState = ContainerState.CREATING
              ) -> Container:
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name),
                                image=pb.ImageSpec(image="busybox"))
    return Container(id=cid, sandbox_id="p" * 64, config=config, image_id="sha256:1",
                     pod_name="web_default_uid_0", created_at=2, log_path="", state=state)


def pods(tmp_path: Path) -> Store[Sandbox]:
    return Store(Sandbox, tmp_path / "pods", tmp_path / "quarantine")


def containers(tmp_path: Path) -> Store[Container]:
    return Store(Container, tmp_path / "containers", tmp_path / "quarantine")


def record_file(store: Store[Any], object_id: str) -> Path:
    return store.object_dir(object_id) / f"{store.cls.record_name}.json"


def test_every_state_has_a_row_in_its_table() -> None:
    assert set(POD_TRANSITIONS) == set(PodState)
    assert set(CONTAINER_TRANSITIONS) == set(ContainerState)


@pytest.mark.parametrize(("before", "after", "allowed"), [
    (PodState.CREATING, PodState.READY, True),
    (PodState.READY, PodState.NOTREADY, True),
    (PodState.CREATING, PodState.NOTREADY, False),
    (PodState.NOTREADY, PodState.READY, False),
    (PodState.READY, PodState.CREATING, False),
])
def test_pod_transitions(tmp_path: Path, before: PodState, after: PodState,
                         allowed: bool) -> None:
    async def main() -> None:
        store = pods(tmp_path)
        await store.add(pod("a" * 64, state=before))
        if allowed:
            assert (await store.set("a" * 64, state=after)).state == after
        else:
            with pytest.raises(IllegalTransition, match=f"{before} -> {after}"):
                await store.set("a" * 64, state=after)
            assert store.get("a" * 64).state == before

    asyncio.run(main())


@pytest.mark.parametrize(("before", "after", "allowed"), [
    (ContainerState.CREATING, ContainerState.CREATED, True),
    (ContainerState.CREATED, ContainerState.RUNNING, True),
    (ContainerState.CREATED, ContainerState.EXITED, True),
    (ContainerState.RUNNING, ContainerState.EXITED, True),
    (ContainerState.CREATING, ContainerState.RUNNING, False),
    (ContainerState.EXITED, ContainerState.RUNNING, False),
    (ContainerState.RUNNING, ContainerState.CREATED, False),
])
def test_container_transitions(tmp_path: Path, before: ContainerState,
                               after: ContainerState, allowed: bool) -> None:
    async def main() -> None:
        store = containers(tmp_path)
        await store.add(container("c" * 64, state=before))
        if allowed:
            assert (await store.set("c" * 64, state=after)).state == after
        else:
            with pytest.raises(IllegalTransition):
                await store.set("c" * 64, state=after)

    asyncio.run(main())


def test_prefix_index(tmp_path: Path) -> None:
    async def main() -> None:
        store = pods(tmp_path)
        for pod_id, name in (("ab" + "0" * 62, "one"), ("ac" + "0" * 62, "two"),
                             ("b" * 64, "three")):
            await store.add(pod(pod_id, name))
        assert store.get("ab").id == "ab" + "0" * 62
        assert store.get("b").id == "b" * 64
        assert store.get("b" * 64).id == "b" * 64
        with pytest.raises(InvalidArgumentError, match="prefix 'a' is ambiguous"):
            store.get("a")
        with pytest.raises(NotFoundError, match="pod sandbox 'c' not found"):
            store.get("c")
        with pytest.raises(InvalidArgumentError, match="pod sandbox ID is empty"):
            store.get("")
        await store.delete("ac" + "0" * 62)
        assert store.get("a").id == "ab" + "0" * 62
        assert store.find("ac" + "0" * 62) is None

    asyncio.run(main())


def test_names_are_unique_until_the_holder_leaves(tmp_path: Path) -> None:
    async def main() -> None:
        store = pods(tmp_path)
        await store.add(pod("a" * 64, "web"))
        with pytest.raises(AlreadyExistsError, match=f"already in use by {'a' * 64}"):
            await store.add(pod("b" * 64, "web"))
        # Two adds racing for one name: exactly one wins.
        results = await asyncio.gather(store.add(pod("c" * 64, "db")),
                                       store.add(pod("d" * 64, "db")),
                                       return_exceptions=True)
        assert sum(isinstance(r, AlreadyExistsError) for r in results) == 1
        await store.delete("a" * 64)
        await store.add(pod("b" * 64, "web"))
        assert not store.object_dir("a" * 64).exists()

    asyncio.run(main())


def test_update_writes_the_record_before_memory_changes(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        store = pods(tmp_path)
        await store.add(pod("a" * 64))
        before = store.get("a" * 64)

        def full(object_id: str, record: dict[str, Any]) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store, "_save", full)
        with pytest.raises(OSError):
            await store.set("a" * 64, state=PodState.READY, ips=("10.0.0.2",))
        assert store.get("a" * 64) is before  # memory unchanged: nothing was acknowledged
        monkeypatch.undo()
        after = await store.set("a" * 64, state=PodState.READY, ips=("10.0.0.2",))
        assert before.state == PodState.CREATING  # a snapshot never changes
        assert json.loads(record_file(store, "a" * 64).read_text())["ips"] == ["10.0.0.2"]
        assert store.get("a" * 64) is after

    asyncio.run(main())


def test_snapshots_are_frozen(tmp_path: Path) -> None:
    snapshot = pod("a" * 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.state = PodState.READY  # type: ignore[misc]


def test_updates_of_one_object_apply_in_turn(tmp_path: Path) -> None:
    async def main() -> None:
        store = containers(tmp_path)
        await store.add(container("c" * 64))

        def bump(c: Container) -> Container:
            return dataclasses.replace(c, exit_code=c.exit_code + 1)

        await asyncio.gather(*(store.update("c" * 64, bump) for _ in range(20)))
        assert store.get("c" * 64).exit_code == 20
        again = containers(tmp_path)
        await again.load()
        assert again.get("c" * 64).exit_code == 20

    asyncio.run(main())


def test_updates_of_unknown_or_removed_objects_leave_no_state(tmp_path: Path) -> None:
    async def main() -> None:
        store = containers(tmp_path)
        for n in range(100):
            with pytest.raises(NotFoundError):
                await store.set(f"{n:064x}", exit_code=1)
        await store.add(container("c" * 64))
        await store.set("c" * 64, exit_code=1)
        await store.delete("c" * 64)
        assert store._updating == {}

    asyncio.run(main())


def test_records_round_trip_with_their_version(tmp_path: Path) -> None:
    async def main() -> None:
        store = containers(tmp_path)
        await store.add(container("c" * 64))
        await store.set("c" * 64, state=ContainerState.CREATED, pid=42)
        record = json.loads(record_file(store, "c" * 64).read_text())
        assert record["schema_version"] == SCHEMA_VERSION
        again = containers(tmp_path)
        [loaded] = await again.load()
        assert loaded.obj == store.get("c" * 64)

    asyncio.run(main())


def v1_container_record(cid: str) -> dict[str, Any]:
    """A record as cripy wrote it before records had versions (and before stop_signal,
    reason and message were recorded)."""
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="old"))
    return {"id": cid, "sandbox_id": "p" * 64, "image_id": "sha256:1",
            "pod_name": "web_default_uid_0", "created_at": 5, "log_path": "",
            "state": "running", "started_at": 6, "finished_at": 0, "exit_code": 0, "pid": 7,
            "config": base64.b64encode(config.SerializeToString()).decode()}


def test_a_version_1_record_loads(tmp_path: Path) -> None:
    cid = "c" * 64
    (tmp_path / "containers" / cid).mkdir(parents=True)
    (tmp_path / "containers" / cid / "container.json").write_text(
        json.dumps(v1_container_record(cid)))

    async def main() -> None:
        store = containers(tmp_path)
        [loaded] = await store.load()
        assert loaded.obj is not None
        c = loaded.obj
        assert (c.state, c.pid, c.config.metadata.name, c.reason) == (
            ContainerState.RUNNING, 7, "old", "")
        assert c.stop_signal == 15

    asyncio.run(main())


def test_unknown_fields_and_newer_versions_are_tolerated(tmp_path: Path) -> None:
    record = {**v1_container_record("c" * 64), "schema_version": SCHEMA_VERSION + 1,
              "checkpoint": {"from": "the future"}}
    assert upgrade(record) == record
    c = Container.from_record(upgrade(record))
    assert c.id == "c" * 64
    assert upgrade(v1_container_record("c" * 64))["schema_version"] == SCHEMA_VERSION
    with pytest.raises(ValueError):
        upgrade({"schema_version": "two"})
    with pytest.raises(ValueError):
        upgrade([1, 2])


@pytest.mark.parametrize("content", [
    b"{not json",
    b"[]",
    json.dumps({"id": "c" * 64, "state": "running"}).encode(),  # fields missing
    json.dumps({**v1_container_record("c" * 64), "state": "levitating"}).encode(),
    json.dumps({**v1_container_record("c" * 64), "config": "***"}).encode(),
    json.dumps(v1_container_record("d" * 64)).encode(),  # another object's record
])
def test_an_unreadable_record_is_quarantined(tmp_path: Path, content: bytes,
                                             caplog: pytest.LogCaptureFixture) -> None:
    good, bad = "a" * 64, "c" * 64

    async def main() -> None:
        store = containers(tmp_path)
        await store.add(container(good))
        record_file(store, bad).parent.mkdir()
        record_file(store, bad).write_bytes(content)
        again = containers(tmp_path)
        with caplog.at_level(logging.ERROR):
            loaded = await again.load()
        assert {(x.id, x.obj is not None) for x in loaded} == {(good, True), (bad, False)}
        assert [c.id for c in again.all()] == [good]
        [moved] = list((tmp_path / "quarantine").iterdir())
        assert moved.read_bytes() == content
        assert moved.name.startswith(f"container-{bad}-")
        assert not record_file(again, bad).exists()
        assert f"container {bad}: record unreadable" in caplog.text

    asyncio.run(main())


def test_a_directory_without_a_record_is_reported(tmp_path: Path) -> None:
    async def main() -> None:
        store = pods(tmp_path)
        store.object_dir("a" * 64).mkdir()
        [loaded] = await store.load()
        assert (loaded.id, loaded.obj) == ("a" * 64, None)
        assert not (tmp_path / "quarantine").exists()

    asyncio.run(main())


def test_a_delete_waits_for_an_update_in_flight(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        store = containers(tmp_path)
        await store.add(container("c" * 64, state=ContainerState.RUNNING))
        slow_save = store._save

        def save(object_id: str, record: dict[str, Any]) -> None:
            import time

            time.sleep(0.1)  # the write is still going when the delete comes
            slow_save(object_id, record)

        monkeypatch.setattr(store, "_save", save)
        update = asyncio.create_task(store.set("c" * 64, state=ContainerState.EXITED))
        await asyncio.sleep(0.02)
        await store.delete("c" * 64)
        await update
        assert not store.object_dir("c" * 64).exists()  # no record came back
        assert store.find("c" * 64) is None
        with pytest.raises(NotFoundError):
            await store.set("c" * 64, exit_code=1)

    asyncio.run(main())


def test_creation_steps_are_kept_and_older_records_have_none(tmp_path: Path) -> None:
    steps = {"namespaces": 0.004, "cni": 0.031, "pod_files": 0.001}

    async def main() -> None:
        store = pods(tmp_path)
        await store.add(dataclasses.replace(pod("a" * 64), creation_steps=steps))
        [loaded] = await pods(tmp_path).load()
        assert loaded.obj is not None and loaded.obj.creation_steps == steps

    asyncio.run(main())
    old = pod("b" * 64).to_record()
    del old["creation_steps"]
    assert Sandbox.from_record(upgrade(old)).creation_steps == {}
    assert Container.from_record(upgrade(v1_container_record("c" * 64))).creation_steps == {}
    with pytest.raises(ValueError, match="creation_steps"):
        Sandbox.from_record({**old, "creation_steps": {"cni": "slow"}})

"""The step timer: durations, concurrent steps, and what a record keeps of them."""

from __future__ import annotations

import asyncio

import pytest

from cripy.runtime.timing import Steps, merged, share_of_wall_clock


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_sequential_steps_get_their_own_durations() -> None:
    clock = Clock()
    steps = Steps(clock)
    with steps.step("namespaces"):
        clock.now += 0.010
    clock.now += 0.005  # between steps: counted in elapsed only
    with steps.step("cni"):
        clock.now += 0.030
    assert steps.durations() == pytest.approx({"namespaces": 0.010, "cni": 0.030})
    assert list(steps.durations()) == ["namespaces", "cni"]  # the order they started in
    assert steps.elapsed() == pytest.approx(0.045)


def test_a_step_run_twice_adds_up_and_a_failing_step_still_counts() -> None:
    clock = Clock()
    steps = Steps(clock)
    with steps.step("spec"):
        clock.now += 0.002
    with pytest.raises(RuntimeError), steps.step("spec"):
        clock.now += 0.003
        raise RuntimeError("boom")
    assert steps.durations() == pytest.approx({"spec": 0.005})


def test_begin_ends_a_step_when_asked() -> None:
    clock = Clock()
    steps = Steps(clock)
    done = steps.begin("rootfs")
    clock.now += 0.020
    done()
    clock.now += 1.0
    assert steps.durations() == pytest.approx({"rootfs": 0.020})


def test_overlapping_steps_share_the_time_they_overlap() -> None:
    # cni runs 10..40, pod_files 20..30: the 10 ms of overlap is split between them.
    spans = [("cni", 10.0, 40.0), ("pod_files", 20.0, 30.0), ("infra", 40.0, 45.0)]
    assert share_of_wall_clock(spans) == pytest.approx(
        {"cni": 25.0, "pod_files": 5.0, "infra": 5.0})
    assert sum(share_of_wall_clock(spans).values()) == pytest.approx(35.0)  # 10..45


def test_no_steps_and_empty_steps() -> None:
    assert share_of_wall_clock([]) == {}
    assert share_of_wall_clock([("nri", 5.0, 5.0)]) == {"nri": 0.0}


def test_concurrent_steps_never_add_up_to_more_than_the_wall_clock() -> None:
    async def main() -> tuple[dict[str, float], float]:
        steps = Steps()
        await asyncio.gather(steps.timed("cni", asyncio.sleep(0.05)),
                             steps.timed("pod_files", asyncio.sleep(0.02)),
                             steps.timed("shm", asyncio.sleep(0.01)))
        return steps.durations(), steps.elapsed()

    durations, elapsed = asyncio.run(main())
    assert set(durations) == {"cni", "pod_files", "shm"}
    assert all(seconds > 0 for seconds in durations.values())
    assert sum(durations.values()) <= elapsed
    assert durations["cni"] > durations["pod_files"] > durations["shm"]


def test_timed_returns_the_result() -> None:
    async def answer() -> int:
        return 42

    async def main() -> int:
        return await Steps().timed("x", answer())

    assert asyncio.run(main()) == 42


def test_merged_adds_later_steps() -> None:
    assert merged({"spec": 1.0, "runc_create": 2.0}, {"start": 0.5, "spec": 0.25}) == {
        "spec": 1.25, "runc_create": 2.0, "start": 0.5}

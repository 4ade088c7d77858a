"""The tests' NRI plugin: behaviour documents become the answers it gives."""

from __future__ import annotations

from cripy.nri import api_pb2, events
from tests.support.nri_plugin import NriPlugin, adjustment_from_json, apply_behaviour, call_record


def test_adjustment_from_json() -> None:
    adjust = adjustment_from_json(
        {
            "env": {"A": "1"},
            "annotations": {"k": "v"},
            "mounts": [{"source": "/s", "destination": "/d", "options": ["bind", "ro"]}],
            "hooks": [{"phase": "poststop", "path": "/bin/true", "args": ["true", "x"]}],
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 10, "soft": 5}],
            "oom_score_adj": 300,
            "memory_limit": 1 << 26,
            "cpu_shares": 256,
            "cpuset_cpus": "0-1",
        }
    )
    assert [(kv.key, kv.value) for kv in adjust.env] == [("A", "1")]
    assert dict(adjust.annotations) == {"k": "v"}
    [mount] = adjust.mounts
    assert (mount.source, mount.destination, mount.type, list(mount.options)) == (
        "/s",
        "/d",
        "bind",
        ["bind", "ro"],
    )
    [hook] = adjust.hooks.poststop
    assert (hook.path, list(hook.args)) == ("/bin/true", ["true", "x"])
    [rlimit] = adjust.rlimits
    assert (rlimit.type, rlimit.hard, rlimit.soft) == ("RLIMIT_NOFILE", 10, 5)
    assert adjust.linux.oom_score_adj.value == 300
    assert adjust.linux.resources.memory.limit.value == 1 << 26
    assert adjust.linux.resources.cpu.shares.value == 256
    assert adjust.linux.resources.cpu.cpus == "0-1"
    assert not adjustment_from_json({"env": {"A": "1"}}).linux.HasField("resources")


def test_apply_behaviour_sets_the_knobs() -> None:
    plugin = NriPlugin()
    apply_behaviour(
        plugin,
        {
            "events": ["CreateContainer", "stopcontainer"],
            "adjust": {"env": {"X": "y"}},
            "update_self": {"StopContainer": {"memory_limit": 1 << 27}},
            "errors": {"RunPodSandbox": "no"},
            "delays": {"StartContainer": 2},
        },
    )
    assert events.event_names(plugin.events_mask) == ["CreateContainer", "StopContainer"]
    created = plugin.responses["CreateContainer"]
    assert isinstance(created, api_pb2.CreateContainerResponse)
    assert created.adjust.env[0].key == "X"
    assert plugin.errors == {"RunPodSandbox": "no"}
    assert plugin.delays == {"StartContainer": 2.0}
    request = api_pb2.StopContainerRequest(container=api_pb2.Container(id="c9"))
    rsp = plugin.handlers["StopContainer"](request)
    assert isinstance(rsp, api_pb2.StopContainerResponse)
    [update] = rsp.update
    assert update.container_id == "c9"
    assert update.linux.resources.memory.limit.value == 1 << 27


def test_call_record_of_a_state_change() -> None:
    event = api_pb2.StateChangeEvent(
        event=api_pb2.STOP_POD_SANDBOX, pod=api_pb2.PodSandbox(id="p1", name="n", namespace="ns")
    )
    record = call_record("StopPodSandbox", event)
    assert record["event"] == "StopPodSandbox"
    assert record["pod"] == {"id": "p1", "name": "n", "namespace": "ns"}
    assert "container" not in record

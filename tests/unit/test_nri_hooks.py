"""What the NRI adaptation shows plugins: containers from their OCI spec, the state in
Synchronize parts."""

from __future__ import annotations

from cripy.nri import api_pb2 as nri
from cripy.nri.hooks import SYNC_PART_BYTES, container_from_spec, sync_parts


def test_the_state_is_split_into_synchronize_parts_below_the_limit() -> None:
    pods = [nri.PodSandbox(id=f"p{i}") for i in range(3)]
    big = "x" * (SYNC_PART_BYTES // 3)
    containers = [nri.Container(id=f"c{i}", args=[big]) for i in range(5)]
    parts = sync_parts(pods, containers)
    assert len(parts) > 1
    assert [p.more for p in parts] == [True] * (len(parts) - 1) + [False]
    assert all(p.ByteSize() <= SYNC_PART_BYTES + 64 for p in parts)
    assert [p.id for part in parts for p in part.pods] == ["p0", "p1", "p2"]
    assert [c.id for part in parts for c in part.containers] == [f"c{i}" for i in range(5)]
    (single,) = sync_parts(pods, [])
    assert not single.more and len(single.pods) == 3


def test_a_container_being_created_is_shown_as_its_spec_says() -> None:
    spec = {
        "process": {"args": ["sh"], "env": ["A=1"], "oomScoreAdj": 100,
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 10, "soft": 5}]},
        "mounts": [{"destination": "/data", "type": "bind", "source": "/src",
                    "options": ["rbind"]}],
        "annotations": {"k": "v"},
        "hooks": {"prestart": [{"path": "/bin/hook", "timeout": 3}]},
        "linux": {"namespaces": [{"type": "network", "path": "/run/netns/x"}],
                  "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
                               "fileMode": 0o666}],
                  "resources": {"memory": {"limit": 1024}, "cpu": {"shares": 2, "cpus": "0"}},
                  "cgroupsPath": "/pod/ctr"},
    }
    shown = container_from_spec(nri.Container(id="c1", name="app"), spec)
    assert (shown.id, shown.name, list(shown.args), list(shown.env)) == \
        ("c1", "app", ["sh"], ["A=1"])
    assert shown.mounts[0].destination == "/data" and shown.annotations["k"] == "v"
    assert shown.hooks.prestart[0].timeout.value == 3
    assert shown.linux.devices[0].file_mode.value == 0o666
    assert shown.linux.resources.memory.limit.value == 1024
    assert (shown.linux.resources.cpu.shares.value, shown.linux.resources.cpu.cpus) == (2, "0")
    assert shown.linux.cgroups_path == "/pod/ctr" and shown.linux.oom_score_adj.value == 100
    assert shown.rlimits[0].type == "RLIMIT_NOFILE"

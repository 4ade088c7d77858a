"""`cripy ctl` formatting and parsing that needs no runtime: ages, IDs, tables, configs."""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from cripy.cli import ctl
from cripy.cli.ctl import (
    CtlError,
    age,
    human_duration,
    load_container_config,
    load_pod_config,
    parse_labels,
    print_table,
    resolve_id,
    rfc3339,
)
from cripy.cli.ctl_runtime import (
    container_rows,
    dump_entries,
    exit_status,
    filter_containers,
    filter_pods,
    image_column,
    parse_bytes,
    parse_since,
    pod_rows,
    status_entry,
    truncate_id,
)
from cripy.cli.main import build_parser

S = 1_000_000_000  # nanoseconds in a second
NOW = 1_700_000_000 * S
ID_A = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
ID_B = "a1b2ffff" + "0" * 56
ID_C = "c" * 64


# --- ages -----------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "Less than a second"), (0.9, "Less than a second"), (1, "1 second"),
    (1.99, "1 second"), (2, "2 seconds"), (59.9, "59 seconds"), (60, "About a minute"),
    (119, "About a minute"), (120, "2 minutes"), (3599, "59 minutes"),
    (3600, "About an hour"), (5399, "About an hour"), (5400, "2 hours"),
    (47 * 3600, "47 hours"), (48 * 3600, "2 days"), (13 * 86400, "13 days"),
    (14 * 86400, "2 weeks"), (59 * 86400, "8 weeks"), (60 * 86400, "2 months"),
    (729 * 86400, "24 months"), (730 * 86400, "2 years"),
])
def test_human_duration_like_go_units(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_age() -> None:
    assert age(NOW - 5 * S, NOW) == "5 seconds ago"
    assert age(NOW - 3 * 60 * S, NOW) == "3 minutes ago"
    assert age(NOW + 10 * S, NOW) == "Less than a second ago"  # clock skew


def test_rfc3339() -> None:
    assert rfc3339(0) == "0001-01-01T00:00:00Z"
    assert rfc3339(NOW + 120) == "2023-11-14T22:13:20.00000012Z"


# --- IDs ------------------------------------------------------------------------------


def test_truncated_ids_and_image_column() -> None:
    assert truncate_id(ID_A) == "a1b2c3d4e5f60"
    assert truncate_id(ID_A, no_trunc=True) == ID_A
    digest = "sha256:" + "f" * 64
    assert image_column(digest) == "f" * 13
    assert image_column(digest, no_trunc=True) == digest
    assert image_column("127.0.0.1:5000/busybox:latest") == "127.0.0.1:5000/busybox:latest"


def test_resolve_id() -> None:
    ids = [ID_A, ID_B, ID_C]
    assert resolve_id(ID_A, ids, "pod") == ID_A
    assert resolve_id("a1b2c", ids, "pod") == ID_A
    assert resolve_id("c", ids, "pod") == ID_C
    assert resolve_id("ab", ["ab", "abc"], "pod") == "ab"  # an exact match wins


@pytest.mark.parametrize(("prefix", "code", "words"), [
    ("a1b2", "INVALID_ARGUMENT", "ambiguous"),
    ("a", "INVALID_ARGUMENT", "a1b2c3d4e5f60, a1b2ffff00000"),
    ("ff", "NOT_FOUND", "no container with ID 'ff'"),
    ("", "INVALID_ARGUMENT", "cannot be empty"),
])
def test_resolve_id_failures(prefix: str, code: str, words: str) -> None:
    with pytest.raises(CtlError) as info:
        resolve_id(prefix, [ID_A, ID_B, ID_C], "container")
    assert info.value.code == code
    assert words in str(info.value)


# --- filters and tables ---------------------------------------------------------------


def pod(pod_id: str, name: str, created: int, *, namespace: str = "default",
        state: pb.PodSandboxState = pb.SANDBOX_READY, labels: dict[str, str] | None = None,
        handler: str = "", attempt: int = 0) -> pb.PodSandbox:
    return pb.PodSandbox(
        id=pod_id, state=state, created_at=created, labels=labels or {},
        runtime_handler=handler,
        metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid="u", attempt=attempt))


def container(cid: str, name: str, pod_id: str, created: int, *,
              state: pb.ContainerState = pb.CONTAINER_RUNNING, image: str = "busybox",
              labels: dict[str, str] | None = None) -> pb.Container:
    return pb.Container(
        id=cid, pod_sandbox_id=pod_id, state=state, created_at=created, labels=labels or {},
        image=pb.ImageSpec(image=image), image_ref="sha256:" + "e" * 64,
        metadata=pb.ContainerMetadata(name=name, attempt=1))


PODS = [
    pod(ID_A, "web", NOW - 120 * S, labels={"app": "web"}),
    pod(ID_B, "db", NOW - 5 * S, namespace="data", state=pb.SANDBOX_NOTREADY, handler="kata",
        attempt=2),
    pod(ID_C, "web-2", NOW - 3 * 3600 * S, labels={"app": "web", "tier": "x"}),
]


def test_filter_pods() -> None:
    def names(**kwargs: object) -> list[str]:
        return [p.metadata.name for p in filter_pods(PODS, **kwargs)]  # type: ignore[arg-type]

    assert names() == ["db", "web", "web-2"]  # newest first
    assert names(name="^web") == ["web", "web-2"]
    assert names(name="^web$") == ["web"]
    assert names(namespace="dat") == ["db"]
    assert names(state=pb.SANDBOX_READY) == ["web", "web-2"]
    assert names(labels={"app": "web", "tier": "x"}) == ["web-2"]
    assert names(id_prefix="a1b2") == ["db", "web"]
    assert names(latest=True) == ["db"]
    assert names(last=2) == ["db", "web"]
    assert names(latest=True, last=2) == ["db", "web"]
    with pytest.raises(CtlError, match="bad regular expression"):
        names(name="(")


def test_pod_table() -> None:
    out = io.StringIO()
    print_table(pod_rows(filter_pods(PODS), NOW), out)
    lines = out.getvalue().splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"]
    assert lines[0].index("CREATED") == len("a1b2c3d4e5f60") + 3
    assert lines[1].split() == ["a1b2ffff00000", "5", "seconds", "ago", "NotReady", "db",
                                "data", "2", "kata"]
    assert lines[2].split() == ["a1b2c3d4e5f60", "2", "minutes", "ago", "Ready", "web",
                                "default", "0", "(default)"]
    assert lines[3].split()[1:4] == ["3", "hours", "ago"]
    assert pod_rows(PODS[:1], NOW, no_trunc=True)[1][0] == ID_A


def test_filter_containers_and_table() -> None:
    containers = [
        container("c1" + "0" * 62, "app", ID_A, NOW - 10 * S,
                  labels={"io.kubernetes.pod.name": "from-label"}),
        container("c2" + "0" * 62, "sidecar", ID_B, NOW - 60 * S, state=pb.CONTAINER_EXITED,
                  image="sha256:" + "d" * 64),
        container("c3" + "0" * 62, "orphan", "f" * 64, NOW - 30 * S, state=pb.CONTAINER_CREATED),
    ]
    assert [c.metadata.name for c in filter_containers(containers)] == [
        "app", "orphan", "sidecar"]
    assert [c.metadata.name for c in filter_containers(containers, pod_prefix="a1b2c")] == [
        "app"]
    assert [c.metadata.name for c in filter_containers(
        containers, state=pb.CONTAINER_EXITED)] == ["sidecar"]
    assert [c.metadata.name for c in filter_containers(
        containers, image=lambda c: c.image.image == "busybox")] == ["app", "orphan"]
    assert [c.metadata.name for c in filter_containers(containers, id_prefix="c2")] == [
        "sidecar"]

    rows = container_rows(filter_containers(containers), {ID_B: "db"}, NOW)
    assert rows[0] == ["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID",
                       "POD"]
    assert rows[1] == ["c100000000000", "busybox", "10 seconds ago", "Running", "app", "1",
                       "a1b2c3d4e5f60", "from-label"]
    assert rows[2] == ["c300000000000", "busybox", "30 seconds ago", "Created", "orphan", "1",
                       "fffffffffffff", "unknown"]
    assert rows[3] == ["c200000000000", "ddddddddddddd", "About a minute ago", "Exited",
                       "sidecar", "1", "a1b2ffff00000", "db"]


def test_print_table_pads_columns_with_three_spaces() -> None:
    out = io.StringIO()
    print_table([["A", "BB", "C"], ["long", "x", ""]], out)
    assert out.getvalue() == "A      BB   C\nlong   x\n"


# --- inspect JSON ---------------------------------------------------------------------


def test_status_entry_and_dump() -> None:
    status = pb.ContainerStatus(id="c1", state=pb.CONTAINER_EXITED, created_at=NOW,
                                started_at=NOW + S, finished_at=0, exit_code=0)
    entry = status_entry(status, {"info": '{"pid": 12}', "plain": "text"},
                         ["created_at", "started_at", "finished_at"])
    data = entry["status"]
    assert data["id"] == "c1"
    assert data["state"] == "CONTAINER_EXITED"
    assert data["exitCode"] == 0  # defaults are shown, as crictl does
    assert data["createdAt"] == "2023-11-14T22:13:20Z"
    assert data["startedAt"] == "2023-11-14T22:13:21Z"
    assert data["finishedAt"] == "0001-01-01T00:00:00Z"
    assert entry["info"] == {"info": {"pid": 12}, "plain": "text"}
    assert "info" not in status_entry(status, {}, [])
    assert json.loads(dump_entries([entry]))["status"]["id"] == "c1"
    assert len(json.loads(dump_entries([entry, entry]))) == 2


# --- flags ----------------------------------------------------------------------------


def test_parse_labels() -> None:
    assert parse_labels(["a=b", "c=", "d=e=f"]) == {"a": "b", "c": "", "d": "e=f"}
    for bad in ("novalue", "=x"):
        with pytest.raises(CtlError, match="KEY=VALUE"):
            parse_labels([bad])


@pytest.mark.parametrize(("text", "value"), [
    ("1024", 1024), ("64m", 64 << 20), ("64M", 64 << 20), ("1g", 1 << 30), ("2Gi", 2 << 30),
    ("512k", 512 << 10), ("10b", 10), ("1MiB", 1 << 20),
])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "m", "1.5g", "-1", "12x"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


@pytest.mark.parametrize(("text", "nanos"), [
    ("10s", NOW - 10 * S), ("42m", NOW - 42 * 60 * S), ("1h30m", NOW - 5400 * S),
    ("500ms", NOW - S // 2), ("1.5h", NOW - 5400 * S),
    ("2023-11-14T22:13:20Z", NOW), ("2023-11-14T22:13:20", NOW),
    ("2023-11-14T23:13:20.5+01:00", NOW + S // 2), ("2023-11-14", NOW - 80000 * S),
    ("1700000000", NOW), ("1700000000.25", NOW + S // 4),
])
def test_parse_since(text: str, nanos: int) -> None:
    assert parse_since(text, NOW) == nanos


@pytest.mark.parametrize("text", ["yesterday", "10", "5 minutes", "1d"])
def test_parse_since_rejects(text: str) -> None:
    if text == "10":  # plain integers are Unix seconds
        assert parse_since(text, NOW) == 10 * S
        return
    with pytest.raises(CtlError, match="--since"):
        parse_since(text, NOW)


def test_exit_status() -> None:
    assert [exit_status(c) for c in (0, 1, 3, 137, 255, 256, -1)] == [0, 1, 3, 137, 255, 1, 255]


# --- config files ---------------------------------------------------------------------


def test_configs_accept_snake_case_and_lower_camel(tmp_path: Path) -> None:
    pod_file = tmp_path / "pod.json"
    pod_file.write_text(json.dumps({"metadata": {"name": "p", "namespace": "ns"},
                                    "log_directory": "/tmp/logs",
                                    "dnsConfig": {"servers": ["10.0.0.1"]}}))
    config = load_pod_config(str(pod_file))
    assert config.log_directory == "/tmp/logs"
    assert list(config.dns_config.servers) == ["10.0.0.1"]
    assert len(config.metadata.uid) == 36  # a uid is made up when missing, as crictl does

    ctr_file = tmp_path / "ctr.json"
    ctr_file.write_text(json.dumps({"metadata": {"name": "c"}, "image": {"image": "busybox"},
                                    "command": ["sh"], "logPath": "c.log"}))
    assert load_container_config(str(ctr_file)).log_path == "c.log"


@pytest.mark.parametrize(("content", "code", "words"), [
    (None, "NOT_FOUND", "not found"),
    ("{nope", "INVALID_ARGUMENT", "Failed to load JSON"),
    ('{"metadata": {"name": "p", "namespace": "n"}, "bogus": 1}', "INVALID_ARGUMENT",
     'no field named "bogus"'),
    ('{"metadata": {"name": "p", "namespace": "n"}, "hostname": 5}', "INVALID_ARGUMENT",
     "hostname"),
    ('{"metadata": {"name": "p"}}', "INVALID_ARGUMENT", "metadata.namespace"),
    ("{}", "INVALID_ARGUMENT", "metadata.name"),
])
def test_bad_pod_configs_are_one_line_errors(tmp_path: Path, content: str | None, code: str,
                                             words: str) -> None:
    path = tmp_path / "pod.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CtlError) as info:
        load_pod_config(str(path))
    assert info.value.code == code
    assert words in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_container_config_needs_name_and_image(tmp_path: Path) -> None:
    path = tmp_path / "ctr.json"
    path.write_text('{"metadata": {"name": "c"}}')
    with pytest.raises(CtlError, match="image.image is required"):
        load_container_config(str(path))


# --- errors and exit statuses ---------------------------------------------------------


def _args(verb: str) -> argparse.Namespace:
    return argparse.Namespace(runtime_endpoint="unix:///nonexistent.sock", image_endpoint="",
                              timeout=1.0, verb=verb)


def test_run_reports_one_line_with_code(capsys: pytest.CaptureFixture[str]) -> None:
    def failing(client: ctl.Client, args: argparse.Namespace) -> None:
        raise CtlError("NOT_FOUND", "no pod with ID 'x'\nsecond line")

    assert ctl.run(failing, _args("inspectp")) == 1
    assert capsys.readouterr().err == (
        "cripy ctl inspectp: NOT_FOUND: no pod with ID 'x' second line\n")
    assert ctl.run(lambda client, args: 3, _args("exec")) == 3
    assert ctl.run(lambda client, args: None, _args("exec")) == 0


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["ctl", "stop", "-t", "soon", "x"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("cripy ctl stop: INVALID_ARGUMENT: argument -t/--timeout")
    assert err.count("\n") == 1


def test_exec_takes_the_rest_as_the_command() -> None:
    args = build_parser().parse_args(["ctl", "-t", "5", "exec", "-s", "--timeout", "3", "abc",
                                      "sh", "-c", "exit 3"])
    assert (args.timeout, args.exec_timeout, args.container, args.cmd) == (
        5.0, 3, "abc", ["sh", "-c", "exit 3"])
    args = build_parser().parse_args(["ctl", "stop", "-t", "2", "abc"])
    assert (args.timeout, args.stop_timeout) == (10.0, 2)

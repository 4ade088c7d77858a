"""The pure pieces of the benchmarks: arguments, rotation, /proc arithmetic, the tables."""

from __future__ import annotations

import pytest

from benchmarks.footprint import ImportRow, parse_importtime, total_ms
from benchmarks.pods import (
    FULL,
    QUICK,
    Row,
    cpu_percent,
    cpu_ticks,
    listening_inodes,
    parse_args,
    ratio_table,
    rotated,
    summary_rows,
    unix_path,
)


def test_defaults_are_the_full_run() -> None:
    args = parse_args([])
    assert (args.rounds, args.pods, args.poll_seconds) == (10, 110, 60)
    assert {k: getattr(args, k) for k in FULL} == FULL
    assert not args.no_containerd and args.endpoint == []


def test_quick_lowers_defaults_but_explicit_options_win() -> None:
    args = parse_args(["--quick", "--pods", "50"])
    assert args.pods == 50
    assert args.rounds == QUICK["rounds"] and args.poll_seconds == QUICK["poll_seconds"]


def test_endpoints_repeat_in_order() -> None:
    args = parse_args(["--endpoint", "crio=unix:///run/crio/crio.sock",
                       "--endpoint", "other=unix:///tmp/x.sock", "--no-containerd"])
    assert args.endpoint == [("crio", "unix:///run/crio/crio.sock"),
                             ("other", "unix:///tmp/x.sock")]


@pytest.mark.parametrize("argv", [
    ["--endpoint", "crio"],                       # no URL
    ["--endpoint", "cripy=unix:///x.sock"],       # the name of this checkout's cripy
    ["--endpoint", "a=unix:///x", "--endpoint", "a=unix:///y"],
    ["--endpoint", "containerd=unix:///x"],       # clashes with the throwaway containerd
    ["--pods", "0"],
    ["--poll-seconds", "0"],
])
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_containerd_endpoint_is_fine_without_the_throwaway_one() -> None:
    args = parse_args(["--endpoint", "containerd=unix:///x", "--no-containerd"])
    assert args.endpoint == [("containerd", "unix:///x")]


def test_rotation_shifts_by_one_each_round() -> None:
    names = ["cripy", "containerd", "crio"]
    assert [rotated(names, i) for i in range(4)] == [
        ["cripy", "containerd", "crio"], ["containerd", "crio", "cripy"],
        ["crio", "cripy", "containerd"], ["cripy", "containerd", "crio"]]
    assert rotated([], 3) == []


def test_cpu_ticks_counts_from_the_last_parenthesis() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime ...: a command name with spaces and parentheses must not shift fields.
    stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 900 0 3 0 150 45 0 0 20 0 7 0 1234"
    assert cpu_ticks(stat) == 195


def test_cpu_percent_of_one_core() -> None:
    assert cpu_percent(1000, 1300, 60.0, 100) == pytest.approx(5.0)
    assert cpu_percent(0, 0, 10.0, 100) == 0.0
    with pytest.raises(ValueError):
        cpu_percent(0, 1, 0.0, 100)


def test_unix_path() -> None:
    assert unix_path("unix:///run/x.sock") == "/run/x.sock"
    assert unix_path("unix:/run/x.sock") == "/run/x.sock"
    with pytest.raises(ValueError, match="not a unix socket"):
        unix_path("tcp://127.0.0.1:1")


def test_listening_inodes_come_first() -> None:
    table = "\n".join([
        "Num       RefCount Protocol Flags    Type St Inode Path",
        "0000000000000000: 00000003 00000000 00000000 0001 03 5001 /run/x.sock",
        "0000000000000000: 00000002 00000000 00010000 0001 01 5000 /run/x.sock",
        "0000000000000000: 00000002 00000000 00010000 0001 01 6000 /run/other.sock",
        "0000000000000000: 00000003 00000000 00000000 0001 03 7000",
    ])
    assert listening_inodes(table, "/run/x.sock") == [5000, 5001]
    assert listening_inodes(table, "/run/none.sock") == []


def test_summary_rows_are_p50_and_p95_in_ms() -> None:
    rows = summary_rows("RunPodSandbox", {"a": [0.1, 0.2, 0.3, 0.4, 1.0], "b": []})
    assert [r.label for r in rows] == ["RunPodSandbox p50", "RunPodSandbox p95"]
    assert rows[0].values == {"a": pytest.approx(300.0), "b": None}
    assert rows[1].values["a"] == pytest.approx(1000.0)


def test_ratio_table_divides_by_the_first_runtime() -> None:
    lines = ratio_table([Row("ListContainers p50", "ms", {"cripy": 1.5, "ctrd": 3.0,
                                                           "crio": None}),
                         Row("daemon CPU polling", "%", {"cripy": 4.0, "ctrd": 0.0,
                                                         "crio": 2.0})],
                        ["cripy", "ctrd", "crio"])
    head, first, second = lines
    assert head.split() == ["cripy", "ctrd", "crio", "cripy/ctrd", "cripy/crio"]
    assert first.split() == ["ListContainers", "p50", "(ms)", "1.50", "3.00", "n/a",
                             "0.50", "n/a"]
    # a zero denominator gives no ratio rather than a crash
    assert second.split() == ["daemon", "CPU", "polling", "(%)", "4.00", "0.00", "2.00",
                              "n/a", "2.00"]


def test_importtime_parsing_and_total() -> None:
    text = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |   _io",
        "import time:      2000 |       2100 | cripy.daemon",
        "some other stderr line",
    ])
    rows = parse_importtime(text)
    assert rows == [ImportRow(100, 100, 1, "_io"), ImportRow(2000, 2100, 0, "cripy.daemon")]
    assert total_ms(rows) == pytest.approx(2.1)

"""The remotecommand protocol's shared parts: channels, the resize stream, the status."""

from __future__ import annotations

import json

import pytest

from cripy.streaming.remotecommand import (
    Channel,
    ResizeParser,
    channels_of,
    error_channel_message,
    status_json,
)
from cripy.streaming.session import AttachTarget, ExecTarget, Outcome, TerminalSize


def test_resize_objects_split_and_joined() -> None:
    parser = ResizeParser()
    assert parser.feed(b'{"Width":80,"Height":24}\n{"Width":1') == [TerminalSize(80, 24)]
    assert parser.feed(b'00,"Height":40}{"Width":5,"Height":6}') == [
        TerminalSize(100, 40), TerminalSize(5, 6)]
    assert parser.feed(b"  \n") == []


def test_resize_decodes_as_go_does() -> None:
    parser = ResizeParser()
    assert parser.feed(b'{"width": 7, "HEIGHT": 8}') == [TerminalSize(7, 8)]
    assert parser.feed(b'{"Width": 9}') == [TerminalSize(9, 0)]  # missing: zero
    assert parser.feed(b'[1, 2]{"Width": -1, "Height": 2}{"Width": true}'
                       b'{"Width": 70000}{"Width": 1, "Height": 1}') == [
        None, None, None, None, TerminalSize(1, 1)]


def test_resize_garbage_is_an_error_and_the_parser_starts_over() -> None:
    parser = ResizeParser()
    assert parser.feed(b"{" + b" " * 100) == []  # could still become an object
    with pytest.raises(ValueError, match="no JSON object"):
        parser.feed(b"x" * (ResizeParser.LIMIT + 1))
    assert parser.feed(b'{"Width": 2, "Height": 3}') == [TerminalSize(2, 3)]


def test_channels() -> None:
    assert [int(c) for c in Channel] == [0, 1, 2, 3, 4]
    assert Channel.RESIZE.stream_type == "resize"
    everything = ExecTarget("c", ["sh"], tty=False, stdin=True, stdout=True, stderr=True)
    assert channels_of(everything) == {Channel.ERROR, Channel.STDIN, Channel.STDOUT,
                                       Channel.STDERR}
    terminal = AttachTarget("c", tty=True, stdin=True, stdout=True, stderr=True)
    assert channels_of(terminal) == {Channel.ERROR, Channel.STDIN, Channel.STDOUT,
                                     Channel.RESIZE}
    assert Channel.RESIZE not in channels_of(terminal, resize=False)


def test_the_error_channel_at_the_end() -> None:
    failed = Outcome(exit_code=3)
    assert json.loads(status_json(failed))["reason"] == "NonZeroExitCode"
    assert error_channel_message("v4.channel.k8s.io", failed) == status_json(failed)
    assert error_channel_message("v5.channel.k8s.io", Outcome()) == status_json(Outcome())
    assert error_channel_message("channel.k8s.io", Outcome()) is None
    assert error_channel_message("v3.channel.k8s.io", failed) == (
        b"command terminated with non-zero exit code: error executing command, "
        b"exit status 3")
    assert error_channel_message("v2.channel.k8s.io", Outcome(error="boom")) == b"boom"

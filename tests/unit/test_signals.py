"""Stop signals: the CRI enum against Linux numbers, image STOPSIGNAL strings, precedence."""

from __future__ import annotations

import signal

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import InvalidArgumentError
from cripy.oci import signals


def test_every_enum_value_maps_to_the_linux_number() -> None:
    for name, value in pb.Signal.items():
        if value == pb.RUNTIME_DEFAULT:
            continue
        number = signals.from_pb(value)
        if hasattr(signal, name):  # what Python knows agrees with the table
            assert number == int(getattr(signal, name)), name
    assert signals.from_pb(pb.SIGRTMIN) == int(signal.SIGRTMIN) == 34
    assert signals.from_pb(pb.SIGRTMINPLUS1) == 35
    assert signals.from_pb(pb.SIGRTMINPLUS15) == 49
    assert signals.from_pb(pb.SIGRTMAXMINUS14) == 50
    assert signals.from_pb(pb.SIGRTMAXMINUS1) == 63
    assert signals.from_pb(pb.SIGRTMAX) == int(signal.SIGRTMAX) == 64
    assert signals.from_pb(pb.SIGSTKFLT) == 16
    assert signals.from_pb(pb.RUNTIME_DEFAULT) is None


def test_numbers_map_back_to_one_name() -> None:
    assert signals.to_pb(15) == pb.SIGTERM
    assert signals.to_pb(17) == pb.SIGCHLD  # not SIGCLD
    assert signals.to_pb(6) == pb.SIGABRT  # not SIGIOT
    assert signals.to_pb(29) == pb.SIGIO  # not SIGPOLL
    assert signals.to_pb(36) == pb.SIGRTMINPLUS2
    assert signals.to_pb(0) == pb.RUNTIME_DEFAULT
    for name, value in pb.Signal.items():
        if value != pb.RUNTIME_DEFAULT and name not in ("SIGCLD", "SIGIOT", "SIGPOLL"):
            assert signals.to_pb(signals.from_pb(value) or 0) == value, name


def test_unknown_enum_value_is_invalid() -> None:
    with pytest.raises(InvalidArgumentError, match="stop_signal 99"):
        signals.from_pb(99)


@pytest.mark.parametrize(("text", "number"), [
    ("SIGQUIT", 3), ("quit", 3), ("9", 9), (" SIGUSR1 ", 10), ("SIGRTMIN", 34),
    ("RTMIN+2", 36), ("SIGRTMAX-1", 63), ("SIGRTMAX", 64),
])
def test_parse_image_stop_signals(text: str, number: int) -> None:
    assert signals.parse(text) == number


@pytest.mark.parametrize("text", ["SIGNOPE", "0", "65", "SIGRTMIN+31", "SIGRTMAX+1", "RTMIN-1"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        signals.parse(text)


def test_precedence_config_then_image_then_sigterm() -> None:
    image = {"config": {"StopSignal": "SIGQUIT"}}
    assert signals.stop_signal(pb.ContainerConfig(stop_signal=pb.SIGUSR2), image) == 12
    assert signals.stop_signal(pb.ContainerConfig(), image) == 3
    assert signals.stop_signal(pb.ContainerConfig(), {"config": {}}) == signal.SIGTERM
    assert signals.stop_signal(pb.ContainerConfig(), {}) == signal.SIGTERM
    bogus = {"config": {"StopSignal": "SIGBOGUS"}}
    assert signals.stop_signal(pb.ContainerConfig(), bogus) == signal.SIGTERM

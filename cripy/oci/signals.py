"""Stop signals: the CRI's Signal enum, image STOPSIGNAL strings and Linux numbers.

A container stops with ContainerConfig.stop_signal when it names one (KEP-4960), else
with its image's STOPSIGNAL, else SIGTERM; ContainerStatus.stop_signal reports which.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping
from typing import Any

from cripy.api import api_pb2 as pb
from cripy.errors import InvalidArgumentError

log = logging.getLogger(__name__)

#: Linux's signal numbers by name (the generic ones; x86, arm and most others agree).
_NUMBERS: dict[str, int] = {
    "SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6,
    "SIGIOT": 6, "SIGBUS": 7, "SIGFPE": 8, "SIGKILL": 9, "SIGUSR1": 10, "SIGSEGV": 11,
    "SIGUSR2": 12, "SIGPIPE": 13, "SIGALRM": 14, "SIGTERM": 15, "SIGSTKFLT": 16,
    "SIGCHLD": 17, "SIGCLD": 17, "SIGCONT": 18, "SIGSTOP": 19, "SIGTSTP": 20,
    "SIGTTIN": 21, "SIGTTOU": 22, "SIGURG": 23, "SIGXCPU": 24, "SIGXFSZ": 25,
    "SIGVTALRM": 26, "SIGPROF": 27, "SIGWINCH": 28, "SIGIO": 29, "SIGPOLL": 29,
    "SIGPWR": 30, "SIGSYS": 31,
}  # fmt: skip
#: The real-time range as the C library (and so every runtime) numbers it.
RTMIN, RTMAX = 34, 64
#: The name reported for a number several names share.
_PREFERRED = ("SIGABRT", "SIGCHLD", "SIGIO")


def _enum_number(name: str) -> int:
    """The number of a Signal enum value's name (SIGRTMINPLUS3, SIGRTMAXMINUS1 ...)."""
    if name.startswith("SIGRTMINPLUS"):
        return RTMIN + int(name.removeprefix("SIGRTMINPLUS"))
    if name.startswith("SIGRTMAXMINUS"):
        return RTMAX - int(name.removeprefix("SIGRTMAXMINUS"))
    return {"SIGRTMIN": RTMIN, "SIGRTMAX": RTMAX}.get(name) or _NUMBERS[name]


_BY_ENUM: dict[int, int] = {
    value: _enum_number(name) for name, value in pb.Signal.items() if value != pb.RUNTIME_DEFAULT
}
_TO_ENUM: dict[int, pb.Signal] = {}
for _name in sorted(pb.Signal.keys(), key=lambda name: name not in _PREFERRED):
    if _name != "RUNTIME_DEFAULT":
        _TO_ENUM.setdefault(_enum_number(_name), getattr(pb, _name))


def from_pb(value: int) -> int | None:
    """The number a ContainerConfig.stop_signal asks for; None for RUNTIME_DEFAULT."""
    if value == pb.RUNTIME_DEFAULT:
        return None
    try:
        return _BY_ENUM[value]
    except KeyError:
        raise InvalidArgumentError(f"stop_signal {value} is not a known signal") from None


def to_pb(number: int) -> pb.Signal:
    """The Signal enum value for a signal number (RUNTIME_DEFAULT if it has none)."""
    return _TO_ENUM.get(number, pb.RUNTIME_DEFAULT)


def parse(text: str) -> int:
    """A signal as images write it: "SIGQUIT", "QUIT", "3", "SIGRTMIN+2", "RTMAX-1"."""
    value = text.strip().upper()
    if value.isdigit():
        number = int(value)
        if not 0 < number <= RTMAX:
            raise ValueError(f"signal {text!r} is out of range")
        return number
    name = value if value.startswith("SIG") else f"SIG{value}"
    for base, origin, sign in (("SIGRTMIN", RTMIN, 1), ("SIGRTMAX", RTMAX, -1)):
        if name == base:
            return origin
        offset = name.removeprefix(base)
        if offset != name and offset[:1] == ("+" if sign > 0 else "-") and offset[1:].isdigit():
            number = origin + sign * int(offset[1:])
            if RTMIN <= number <= RTMAX:
                return number
    if name in _NUMBERS:
        return _NUMBERS[name]
    raise ValueError(f"unknown signal {text!r}")


def stop_signal(config: pb.ContainerConfig, image_config: Mapping[str, Any]) -> int:
    """The signal that stops the container: the config's, the image's, or SIGTERM."""
    asked = from_pb(config.stop_signal)
    if asked is not None:
        return asked
    value = str((image_config.get("config") or {}).get("StopSignal") or "")
    if not value:
        return signal.SIGTERM
    try:
        return parse(value)
    except ValueError:
        log.warning("image stop signal %r is unknown: using SIGTERM", value)
        return signal.SIGTERM

"""The kubelet's remotecommand protocol, sans-IO: what SPDY and WebSocket share.

- the channels (stdin, stdout, stderr, error, resize) as WebSocket channel numbers and
  SPDY stream types;
- the resize stream: JSON objects `{"Width": w, "Height": h}` one after another;
- what goes on the error channel when the command ends: from v4 on the metav1.Status
  JSON, before that only a failure's message.
"""

from __future__ import annotations

import enum
import json

from cripy.streaming.session import AttachTarget, ExecTarget, Outcome, TerminalSize

#: v5 (WebSocket only) adds closing a single channel; it is 255 followed by the channel.
STREAM_CLOSE = 255

#: Protocols whose error channel carries the Status JSON.
JSON_STATUS_PROTOCOLS = frozenset({"v5.channel.k8s.io", "v4.channel.k8s.io",
                                   "v4.base64.channel.k8s.io"})


class Channel(enum.IntEnum):
    """A remotecommand channel: its number on WebSocket; `stream_type` on SPDY."""

    STDIN = 0
    STDOUT = 1
    STDERR = 2
    ERROR = 3
    RESIZE = 4

    @property
    def stream_type(self) -> str:
        return self.name.lower()


def channels_of(target: ExecTarget | AttachTarget, *, resize: bool = True
                ) -> frozenset[Channel]:
    """The channels a session of `target` uses: a terminal merges stderr into stdout,
    and only a terminal is resized (by protocols that have the resize channel)."""
    wanted = {Channel.ERROR}
    if target.stdin:
        wanted.add(Channel.STDIN)
    if target.stdout:
        wanted.add(Channel.STDOUT)
    if target.stderr and not target.tty:
        wanted.add(Channel.STDERR)
    if target.tty and resize:
        wanted.add(Channel.RESIZE)
    return frozenset(wanted)


class ResizeParser:
    """Terminal sizes from the resize stream, fed in chunks (an object may span them).

    A size decodes as Go's encoding/json into `{Width, Height uint16}` would: names
    match case-insensitively and a missing one is 0. `feed` returns what the chunk
    completed: a TerminalSize per object, or None for a JSON value that is not a size.
    It raises ValueError when no JSON object starts within LIMIT bytes (garbage); the
    buffer is then empty again.
    """

    LIMIT = 4096

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[TerminalSize | None]:
        self._buffer += data
        text = self._buffer.decode("latin-1")  # sizes are ASCII; any byte is kept as is
        out: list[TerminalSize | None] = []
        position = 0
        while True:
            start = len(text) - len(text[position:].lstrip())
            if start == len(text):
                self._buffer.clear()
                return out
            try:
                value, end = self._decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                del self._buffer[:start]
                if len(self._buffer) > self.LIMIT:
                    self._buffer.clear()
                    raise ValueError(f"resize stream: no JSON object in {self.LIMIT} "
                                     "bytes") from None
                return out  # incomplete: wait for more
            position = end
            out.append(terminal_size(value))


def terminal_size(value: object) -> TerminalSize | None:
    """A decoded resize object as a TerminalSize, or None when it is not one."""
    if not isinstance(value, dict):
        return None
    fields = {str(k).lower(): v for k, v in value.items()}
    width, height = fields.get("width", 0), fields.get("height", 0)
    for n in (width, height):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 0xFFFF:
            return None
    return TerminalSize(width=width, height=height)


def status_json(outcome: Outcome) -> bytes:
    """The metav1.Status the kubelet's remotecommand protocol (v4+) sends on the error
    stream when the command ends."""
    if outcome.error:
        status = {"metadata": {}, "status": "Failure", "message": outcome.error,
                  "reason": "InternalError", "code": 500}
    elif outcome.exit_code == 0:
        status = {"metadata": {}, "status": "Success"}
    else:
        status = {
            "metadata": {},
            "status": "Failure",
            "message": _exit_message(outcome.exit_code),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(outcome.exit_code)}]},
        }
    return json.dumps(status).encode()


def error_channel_message(protocol: str, outcome: Outcome) -> bytes | None:
    """What goes on the error channel when the command ends; None: nothing (a success
    before v4)."""
    if protocol in JSON_STATUS_PROTOCOLS:
        return status_json(outcome)
    if outcome.error:
        return outcome.error.encode()
    if outcome.exit_code:
        return _exit_message(outcome.exit_code).encode()
    return None


def _exit_message(exit_code: int) -> str:
    return (f"command terminated with non-zero exit code: error executing command, "
            f"exit status {exit_code}")

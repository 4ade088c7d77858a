"""systemd's readiness protocol (sd_notify): state lines in a datagram to $NOTIFY_SOCKET.

systemd (Type=notify) passes the socket's address in NOTIFY_SOCKET: a path, or a name in
the abstract namespace written with a leading '@'. The daemon takes the variable out of
its environment at start, as sd_notify(unset_environment=1) does, because its children
must not see it: runc given NOTIFY_SOCKET would proxy the socket into the container and
wait for the container to report READY.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"
SEND_TIMEOUT = 5.0


class Notifier:
    """Sends state lines ("READY=1", "STOPPING=1", "STATUS=...") to systemd, if it listens."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Take NOTIFY_SOCKET out of `environ` (default os.environ) and keep it here."""
        env = os.environ if environ is None else environ
        return cls(env.pop(ENV, None))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _sockaddr(self) -> str | bytes | None:
        address = self.address
        if address is None:
            return None
        if address.startswith("@"):
            return b"\0" + address[1:].encode()
        if address.startswith("/"):
            return address
        return None

    def notify(self, *states: str) -> bool:
        """Send the state lines in one datagram; False when nobody listens. Blocking (a
        single send on a local socket): call it from a thread in async code."""
        if self.address is None:
            return False
        sockaddr = self._sockaddr()
        if sockaddr is None:
            log.warning("%s=%r is not a unix socket address; not notifying systemd",
                        ENV, self.address)
            return False
        message = "\n".join(states).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(message, sockaddr)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

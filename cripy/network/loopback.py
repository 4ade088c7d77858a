"""Bringing up `lo` in a fresh network namespace with one ioctl, what the CNI loopback
plugin does for ADD, without running it. Called by the thread (or helper process) that
has just made the pod's namespaces, while it is inside them."""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = "16sH14x"  # struct ifreq: the name, then ifr_flags (and the rest of the union)


def bring_up_lo() -> None:
    """Set `lo` of the calling thread's network namespace up; raises OSError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(_IFREQ, b"lo", 0)
        _, flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, request))
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | IFF_UP))

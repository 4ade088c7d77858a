"""The guest's initramfs: busybox, the kernel modules the guest needs before its root is
mounted, and an /init that mounts this machine's root (9p, read-only) under a tmpfs
overlay and hands over to systemd.

The archive is a cpio "newc" archive written here, so nothing but busybox-static and the
kernel's own modules is needed; it is built per run in a temp dir.
"""

from __future__ import annotations

import lzma
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

#: Modules for virtio-9p and overlayfs, in load order (each needs the ones before it).
MODULES: tuple[str, ...] = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay",
)  # fmt: skip

#: 9p mount tags: the host root (read-only) and the results directory (writable).
ROOT_TAG = "hostroot"
RESULTS_TAG = "results"
#: Where the results share is mounted in the guest.
GUEST_RESULTS = "/cripy-vm-results"
#: Printed on the serial console by /init: the first sign that the guest runs.
INIT_MARKER = "cripy-vm: initramfs running"

_S_IFDIR = 0o040000
_S_IFREG = 0o100000


class CpioWriter:
    """Writes a cpio archive in the "newc" format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if mode & _S_IFDIR else 1, 0, len(data),
                  0, 0, 0, 0, len(encoded), 0)
        self._out += b"070701" + b"".join(b"%08x" % value for value in fields)
        self._out += encoded
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, _S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, _S_IFREG | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self._out)


@dataclass(frozen=True)
class GuestSetup:
    """What /init prepares in the new root before systemd starts."""

    #: Units linked to /dev/null (slow or irrelevant in a test VM).
    masked_units: Sequence[str]
    #: Unit files written to /etc/systemd/system: name -> content.
    units: dict[str, str]
    #: Sizes of the tmpfs mounted over these guest paths.
    tmpfs: dict[str, str]
    #: The unit systemd starts (one of `units`).
    default_target: str
    #: Host directories that must stay visible although a tmpfs above covers them (a
    #: checkout under /tmp): bound from the read-only share, at the same path.
    keep_visible: Sequence[str] = ()
    hostname: str = "cripy-vm"


def module_file(modules_dir: Path, name: str) -> Path:
    """The module's file under /lib/modules/VERSION (plain .ko or compressed .ko.xz)."""
    for suffix in (".ko", ".ko.xz"):
        found = sorted(modules_dir.rglob(name + suffix))
        if found:
            return found[0]
    raise FileNotFoundError(f"kernel module {name} not found under {modules_dir}")


def module_bytes(path: Path) -> bytes:
    """The module, decompressed: busybox insmod loads plain ELF files only."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def init_script(setup: GuestSetup) -> str:
    """The /init shell script (busybox sh)."""
    q = shlex.quote
    lines = [
        "#!/bin/busybox sh",
        "/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /proc /sys /dev",
        "/bin/busybox --install -s",
        "mount -t devtmpfs devtmpfs /dev",
        "exec </dev/console >/dev/console 2>&1",
        f"echo {q(INIT_MARKER)}",
        "fail() { echo \"cripy-vm: init failed: $*\"; poweroff -f; }",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        f"for m in {' '.join(MODULES)}; do",
        "  insmod /modules/$m.ko || fail \"insmod $m\"",
        "done",
        "mkdir -p /lower /rw /newroot",
        f"mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 {ROOT_TAG}"
        " /lower || fail 'mount the host root over 9p'",
        "mount -t tmpfs -o mode=0755 rw /rw",
        "mkdir /rw/upper /rw/work",
        "mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay"
        " /newroot || fail 'mount the root overlay'",
    ]
    for path, size in setup.tmpfs.items():
        mode = "1777" if path in ("/tmp", "/var/tmp") else "0755"
        lines.append(f"mkdir -p /newroot{q(path)}")
        lines.append(f"mount -t tmpfs -o size={size},mode={mode} tmpfs /newroot{q(path)}"
                     f" || fail {q('tmpfs ' + path)}")
    for path in setup.keep_visible:
        lines.append(f"mkdir -p /newroot{q(path)} && mount --bind /lower{q(path)} /newroot{q(path)}"
                     f" || fail {q('bind ' + path)}")
    lines += [
        f"mkdir -p /newroot{GUEST_RESULTS}",
        f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {RESULTS_TAG}"
        f" /newroot{GUEST_RESULTS} || fail 'mount the results share'",
        "echo '# cripy test VM: no filesystems beyond those /init mounted' > /newroot/etc/fstab",
        f"echo {q(setup.hostname)} > /newroot/etc/hostname",
        # The host may itself be a container; the guest is a VM (systemd checks this file).
        "rm -f /newroot/.dockerenv",
        "units=/newroot/etc/systemd/system",
        # The host's own enablements (timers, getty, its services) are not the guest's.
        "rm -rf $units/*.wants",
    ]
    for unit in setup.masked_units:
        lines.append(f"ln -sf /dev/null $units/{q(unit)}")
    for name, content in setup.units.items():
        lines.append(f"cat > $units/{q(name)} <<'CRIPY_VM_UNIT'\n{content.rstrip()}\nCRIPY_VM_UNIT")
    lines.append(f"ln -sf {q(setup.default_target)} $units/default.target")
    lines += [
        "umount /proc /sys",
        "mount --move /dev /newroot/dev",
        "echo 'cripy-vm: starting systemd'",
        "exec switch_root /newroot /lib/systemd/systemd",
        "",
    ]
    return "\n".join(lines)


def build_initramfs(modules_dir: Path, setup: GuestSetup) -> bytes:
    """The initramfs archive for a kernel whose modules are in `modules_dir`."""
    cpio = CpioWriter()
    for directory in ("bin", "modules", "dev", "proc", "sys"):
        cpio.directory(directory)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for name in MODULES:
        cpio.file(f"modules/{name}.ko", module_bytes(module_file(modules_dir, name)))
    cpio.file("init", init_script(setup).encode(), 0o755)
    return cpio.finish()

"""The test VM's initramfs: a cpio archive the kernel (and cpio(1)) can read, and an
/init that mounts what the guest needs before systemd."""

from __future__ import annotations

import lzma
import subprocess
from pathlib import Path

from tests.vm.initramfs import (
    GUEST_RESULTS,
    INIT_MARKER,
    CpioWriter,
    GuestSetup,
    init_script,
    module_bytes,
    module_file,
)
from tests.vm.machine import covered_by_tmpfs, guest_units, kernel_cmdline


def test_cpio_reads_the_archive_back(tmp_path: Path) -> None:
    cpio = CpioWriter()
    cpio.directory("bin")
    cpio.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    cpio.file("odd", b"x" * 5)  # sizes not a multiple of 4 are padded
    archive = cpio.finish()
    assert len(archive) % 4 == 0
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin" / "tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"


def test_modules_are_found_and_decompressed(tmp_path: Path) -> None:
    plain = tmp_path / "kernel" / "fs" / "9p.ko"
    packed = tmp_path / "kernel" / "fs" / "overlay.ko.xz"
    plain.parent.mkdir(parents=True)
    plain.write_bytes(b"\x7fELF plain")
    packed.write_bytes(lzma.compress(b"\x7fELF packed", format=lzma.FORMAT_XZ))
    assert module_bytes(module_file(tmp_path, "9p")) == b"\x7fELF plain"
    assert module_bytes(module_file(tmp_path, "overlay")) == b"\x7fELF packed"


def test_init_mounts_the_shares_and_hands_over_to_systemd() -> None:
    units = guest_units(Path("/src/cripy"))
    script = init_script(GuestSetup(masked_units=["slow.service"], units=units,
                                    tmpfs={"/tmp": "1G"}, default_target="cripy-vm.target"))
    assert script.startswith("#!/bin/busybox sh\n")
    assert INIT_MARKER in script
    assert "ro,cache=loose" in script and f"/newroot{GUEST_RESULTS}" in script
    assert "mount -t tmpfs -o size=1G,mode=1777 tmpfs /newroot/tmp" in script
    assert "ln -sf /dev/null $units/slow.service" in script
    assert "ExecStart=/src/cripy/.venv/bin/python -m tests.vm.inguest" in script
    assert script.rstrip().endswith("exec switch_root /newroot /lib/systemd/systemd")
    assert "systemd.unified_cgroup_hierarchy=1" in kernel_cmdline()


def test_a_checkout_under_a_guest_tmpfs_stays_visible() -> None:
    assert covered_by_tmpfs(Path("/srv/cripy")) == []
    assert covered_by_tmpfs(Path("/tmp/ci/cripy")) == ["/tmp/ci/cripy"]
    script = init_script(GuestSetup(masked_units=[], units={}, tmpfs={"/tmp": "1G"},
                                    default_target="x.target", keep_visible=["/tmp/ci/cripy"]))
    mount_tmp = script.index("tmpfs /newroot/tmp")
    bind = script.index("mount --bind /lower/tmp/ci/cripy /newroot/tmp/ci/cripy")
    assert mount_tmp < bind

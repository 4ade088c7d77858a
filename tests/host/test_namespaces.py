"""Pinned pod namespaces: real unshare, real bind mounts (needs root)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from cripy.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError
from cripy.network import namespaces
from cripy.network.namespaces import is_pinned, pin_namespaces, unpin_namespaces

ROOT = Path(__file__).resolve().parents[2]


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if line.split()[4].startswith(prefix)]


@pytest.fixture
def ns_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "pod" / "ns"
    try:
        yield directory
    finally:
        asyncio.run(unpin_namespaces(directory))
        assert mounts_under(tmp_path) == []


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def test_pin_net_ipc_uts_with_a_hostname(ns_dir: Path) -> None:
    pinned = asyncio.run(pin_namespaces(ns_dir, ["net", "ipc", "uts"], "web-0"))
    assert pinned == {k: ns_dir / k for k in ("net", "ipc", "uts")}
    assert all(is_pinned(p) for p in pinned.values())
    assert run("nsenter", f"--uts={pinned['uts']}", "hostname") == "web-0"
    # Fresh namespaces, not ours: other inodes, and a network with only lo, which is up.
    for kind, path in pinned.items():
        assert os.stat(path).st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino
    links = run("nsenter", f"--net={pinned['net']}", "ip", "-o", "link").splitlines()
    assert len(links) == 1 and ": lo:" in links[0] and ",UP," in links[0]
    assert len(mounts_under(ns_dir)) == 3

    asyncio.run(unpin_namespaces(ns_dir))
    assert not any(is_pinned(p) or p.exists() for p in pinned.values())
    assert mounts_under(ns_dir.parent) == []
    asyncio.run(unpin_namespaces(ns_dir))  # again: nothing to do, no error


def test_only_the_requested_kinds(ns_dir: Path) -> None:
    pinned = asyncio.run(pin_namespaces(ns_dir, ["ipc"], None))
    assert list(pinned) == ["ipc"] and is_pinned(pinned["ipc"])
    assert not (ns_dir / "net").exists() and not (ns_dir / "uts").exists()


def test_unpin_copes_with_files_already_gone(ns_dir: Path) -> None:
    pinned = asyncio.run(pin_namespaces(ns_dir, ["net", "uts"], None))
    subprocess.run(["umount", "-l", str(pinned["net"])], check=True)
    pinned["net"].unlink()
    asyncio.run(unpin_namespaces(ns_dir))
    assert not pinned["uts"].exists() and mounts_under(ns_dir.parent) == []


def test_unpinning_a_directory_that_never_existed(tmp_path: Path) -> None:
    asyncio.run(unpin_namespaces(tmp_path / "nothing" / "here"))


def test_is_pinned_is_false_for_ordinary_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    assert not is_pinned(plain) and not is_pinned(tmp_path / "missing")
    assert is_pinned(Path("/proc/self/ns/net"))


@pytest.mark.parametrize("kinds, hostname", [
    (["pid"], None), ([], None), (["net"], "web"), (["uts"], "-n"), (["uts"], "a b"),
    (["uts"], "x" * 65),
])
def test_bad_requests_are_refused_before_anything_is_made(
        ns_dir: Path, kinds: list[str], hostname: str | None) -> None:
    with pytest.raises(InvalidArgumentError):
        asyncio.run(pin_namespaces(ns_dir, kinds, hostname))
    assert not ns_dir.exists()


def test_pinning_over_live_pins_is_refused_and_leaves_them(ns_dir: Path) -> None:
    first = asyncio.run(pin_namespaces(ns_dir, ["net"], None))
    with pytest.raises(AlreadyExistsError):
        asyncio.run(pin_namespaces(ns_dir, ["net", "uts"], None))
    assert is_pinned(first["net"])


def test_a_failure_after_pinning_unpins_everything(
        ns_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = namespaces._pin_in_own_thread

    def pin_then_fail(paths: dict[str, Path], hostname: str | None) -> None:
        real(paths, hostname)
        assert all(is_pinned(p) for p in paths.values())
        raise FailedPreconditionError("injected")

    monkeypatch.setattr(namespaces, "_pin_in_own_thread", pin_then_fail)
    with pytest.raises(FailedPreconditionError, match="injected"):
        asyncio.run(pin_namespaces(ns_dir, ["net", "ipc", "uts"], "h"))
    assert not ns_dir.exists() and mounts_under(ns_dir.parent) == []


def test_a_failing_unshare_leaves_nothing(ns_dir: Path) -> None:
    ns_dir.mkdir(parents=True)
    (ns_dir / "uts").mkdir()  # unshare cannot bind a namespace onto a directory
    with pytest.raises(FailedPreconditionError, match="uts"):
        asyncio.run(pin_namespaces(ns_dir, ["net", "uts"], None))
    assert not (ns_dir / "net").exists() and mounts_under(ns_dir.parent) == []


# In a mount namespace of its own, under a shared tmpfs with a peer, pinning must not
# propagate nsfs mounts to the peer, and unpinning must leave no mount at all.
SHARED_SCRIPT = textwrap.dedent("""
    import asyncio, os, subprocess, sys
    from pathlib import Path
    from cripy.network.namespaces import is_pinned, pin_namespaces, unpin_namespaces

    base = Path(sys.argv[1])
    shared, peer = base / "shared", base / "peer"
    shared.mkdir(); peer.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "cripyt", str(shared)], check=True)
    subprocess.run(["mount", "--make-shared", str(shared)], check=True)
    subprocess.run(["mount", "--bind", str(shared), str(peer)], check=True)  # a peer

    def mounts(prefix):
        with open("/proc/self/mountinfo") as f:
            return [l.split() for l in f if l.split()[4].startswith(str(prefix))]

    pod = shared / "pod" / "ns"
    pinned = asyncio.run(pin_namespaces(pod, ["net", "uts"], "shared-test"))
    assert all(is_pinned(p) for p in pinned.values())
    assert not is_pinned(peer / "pod" / "ns" / "net"), "pin propagated to the peer"
    assert not is_pinned(peer / "pod" / "ns" / "uts"), "pin propagated to the peer"
    own = [m for m in mounts(pod) if m[4] == str(pod)]  # the private self-mount
    assert own and not any(f.startswith("shared:") for f in own[-1][6:own[-1].index("-")]), own
    asyncio.run(unpin_namespaces(pod))
    left = mounts(shared / "pod") + mounts(peer / "pod")
    assert left == [], left
    print("ok")
""")


def test_pins_under_a_shared_mount_do_not_propagate(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         sys.executable, "-c", SHARED_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr

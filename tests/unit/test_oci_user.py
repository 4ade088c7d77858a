"""Tests for cripy.oci.user: user/group resolution in an untrusted rootfs."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cripy.errors import InvalidArgumentError, NotFoundError
from cripy.oci.user import (
    ProcessUser,
    parse_group,
    parse_passwd,
    read_rootfs_file,
    resolve_user,
)

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment
broken line without colons
bad:x:notanumber:1::/:/bin/sh
+nisuser::::::
app:x:1000:1001:App:/home/app:/bin/sh
other:x:2000:2000::/:/bin/sh
"""
GROUP = """\
root:x:0:
daemon:x:1:
appgrp:x:1001:
staff:x:50:app,other
wheel:x:10: app
video:x:44:
malformed
weird:x:-5:app
"""


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


def test_parse_tolerates_malformed_lines() -> None:
    names = [p.name for p in parse_passwd(PASSWD.encode())]
    assert names == ["root", "daemon", "app", "other"]
    groups = {g.name: g for g in parse_group(GROUP.encode())}
    assert set(groups) == {"root", "daemon", "appgrp", "staff", "wheel", "video"}
    assert groups["staff"].members == ("app", "other")
    assert groups["wheel"].members == ("app",)
    assert parse_passwd(b"\xff\xfe:x:1:1::/:\n") != []  # undecodable bytes do not crash
    assert parse_passwd(None) == []


def test_default_is_root(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_user(empty) == ProcessUser(0, 0, [0], None)


def test_numeric_uid_without_passwd(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_user(empty, run_as_user=4242) == ProcessUser(4242, 0, [0], None)


def test_numeric_uid_found_in_passwd(rootfs: Path) -> None:
    u = resolve_user(rootfs, run_as_user=1000)
    assert (u.uid, u.gid, u.username) == (1000, 1001, "app")
    # Primary group first, then the /etc/group groups listing "app".
    assert u.additional_gids == [1001, 50, 10]


def test_run_as_username(rootfs: Path) -> None:
    u = resolve_user(rootfs, run_as_username="other")
    assert (u.uid, u.gid, u.additional_gids) == (2000, 2000, [2000, 50])


def test_unknown_username(rootfs: Path) -> None:
    with pytest.raises(NotFoundError, match="'ghost'"):
        resolve_user(rootfs, run_as_username="ghost")


def test_run_as_group_overrides(rootfs: Path) -> None:
    u = resolve_user(rootfs, run_as_user=1000, run_as_group=7)
    assert u.gid == 7 and u.additional_gids[0] == 7


def test_run_as_group_needs_user(rootfs: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="run_as_group"):
        resolve_user(rootfs, run_as_group=7)


def test_user_and_username_exclusive(rootfs: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        resolve_user(rootfs, run_as_user=1, run_as_username="app")


def test_supplemental_groups_merge_and_strict(rootfs: Path) -> None:
    u = resolve_user(rootfs, run_as_user=1000, supplemental_groups=[44, 50, 44])
    assert u.additional_gids == [1001, 50, 10, 44]
    s = resolve_user(rootfs, run_as_user=1000, supplemental_groups=[44], strict_groups=True)
    assert s.additional_gids == [1001, 44]


@pytest.mark.parametrize(
    ("image_user", "expected"),
    [
        ("", (0, 0)),
        ("1000", (1000, 1001)),
        ("3333", (3333, 0)),
        ("app", (1000, 1001)),
        ("1000:44", (1000, 44)),
        ("app:staff", (1000, 50)),
        ("app:3000", (1000, 3000)),
        ("3333:video", (3333, 44)),
        (" daemon ", (1, 1)),
    ],
)
def test_image_user_forms(rootfs: Path, image_user: str, expected: tuple[int, int]) -> None:
    u = resolve_user(rootfs, image_user=image_user)
    assert (u.uid, u.gid) == expected


@pytest.mark.parametrize(
    ("image_user", "error"),
    [
        ("ghost", NotFoundError),
        ("app:nogroup", NotFoundError),
        ("app:", InvalidArgumentError),
        (":50", InvalidArgumentError),
        ("99999999999", InvalidArgumentError),
        ("1:99999999999", InvalidArgumentError),
        ("a\x00b", InvalidArgumentError),
    ],
)
def test_image_user_errors(rootfs: Path, image_user: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        resolve_user(rootfs, image_user=image_user)


def test_cri_user_overrides_image_user(rootfs: Path) -> None:
    assert resolve_user(rootfs, run_as_user=2000, image_user="app").uid == 2000


@pytest.mark.parametrize("bad", [-1, 4294967295, 1 << 40])
def test_out_of_range_ids(rootfs: Path, bad: int) -> None:
    with pytest.raises(InvalidArgumentError):
        resolve_user(rootfs, run_as_user=bad)
    with pytest.raises(InvalidArgumentError):
        resolve_user(rootfs, run_as_user=0, run_as_group=bad)
    with pytest.raises(InvalidArgumentError):
        resolve_user(rootfs, supplemental_groups=[bad])


# --- hostile rootfs ----------------------------------------------------------------------





def test_absolute_symlink_stays_in_rootfs(hostile: tuple[Path, Path]) -> None:
    root, secret = hostile
    (root / "etc" / "passwd").symlink_to(secret)  # absolute host path
    assert read_rootfs_file(root, "/etc/passwd") is None
    with pytest.raises(NotFoundError):
        resolve_user(root, run_as_username="evil")
    # The same absolute target, recreated inside the rootfs, is what it means there.
    inside = root / str(secret).lstrip("/")
    inside.parent.mkdir(parents=True)
    inside.write_text("fine:x:7:7::/:/bin/sh\n")
    assert resolve_user(root, run_as_username="fine").uid == 7


def test_relative_dotdot_symlink_clamped_at_root(hostile: tuple[Path, Path]) -> None:
    root, secret = hostile
    (root / "etc" / "passwd").symlink_to("../../../../../../" + secret.name)
    assert read_rootfs_file(root, "/etc/passwd") is None
    (root / secret.name).write_text("inroot:x:8:8::/:/bin/sh\n")
    assert resolve_user(root, run_as_username="inroot").uid == 8


def test_symlinked_parent_directory(hostile: tuple[Path, Path]) -> None:
    root, secret = hostile
    (root / "etc").rmdir()
    (root / "etc").symlink_to(str(secret.parent))  # /etc -> the host's tmp dir
    (secret.parent / "passwd").write_text("evil:x:666:666::/:/bin/sh\n")
    assert read_rootfs_file(root, "/etc/passwd") is None
    (root / str(secret.parent).lstrip("/")).mkdir(parents=True)
    (root / str(secret.parent).lstrip("/") / "passwd").write_text("ok:x:9:9::/:/bin/sh\n")
    assert resolve_user(root, run_as_username="ok").uid == 9


def test_symlink_to_shadow_like_file_outside(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to("/etc/shadow")
    # /etc/shadow inside this rootfs does not exist: nothing is read from the host.
    assert read_rootfs_file(root, "/etc/passwd") is None
    assert resolve_user(root, run_as_user=5).uid == 5


def test_symlink_loop(hostile: tuple[Path, Path]) -> None:
    root, _ = hostile
    (root / "etc" / "passwd").symlink_to("passwd2")
    (root / "etc" / "passwd2").symlink_to("/etc/passwd")
    assert read_rootfs_file(root, "/etc/passwd") is None
    assert resolve_user(root, run_as_user=3).uid == 3


def test_non_regular_files_ignored(hostile: tuple[Path, Path]) -> None:
    root, _ = hostile
    (root / "etc" / "passwd").mkdir()
    assert read_rootfs_file(root, "/etc/passwd") is None
    os.mkfifo(root / "etc" / "group")
    result: list[bytes | None] = []
    t = threading.Thread(target=lambda: result.append(read_rootfs_file(root, "/etc/group")))
    t.start()
    t.join(5)
    assert not t.is_alive(), "reading a FIFO must not block"
    assert result == [None]


def test_file_under_non_directory(hostile: tuple[Path, Path]) -> None:
    root, _ = hostile
    (root / "etc").rmdir()
    (root / "etc").write_text("not a dir")
    assert read_rootfs_file(root, "/etc/passwd") is None


def test_oversized_file_refused(hostile: tuple[Path, Path]) -> None:
    root, _ = hostile
    with open(root / "etc" / "passwd", "wb") as f:
        f.truncate(64 << 20)  # sparse: costs nothing on disk
    with pytest.raises(InvalidArgumentError, match="larger"):
        resolve_user(root, run_as_username="app")
    (root / "etc" / "group").write_bytes(b"x" * 100)
    with pytest.raises(InvalidArgumentError):
        read_rootfs_file(root, "/etc/group", max_size=10)


def test_missing_rootfs_dir(tmp_path: Path) -> None:
    assert read_rootfs_file(tmp_path / "nope", "/etc/passwd") is None


def test_to_oci() -> None:
    assert ProcessUser(1, 2, [2, 3]).to_oci() == {"uid": 1, "gid": 2, "additionalGids": [2, 3]}
    assert ProcessUser(1, 2).to_oci() == {"uid": 1, "gid": 2}

"""The checkpoint archive's pieces: locations, the rootfs diff, deletions, the archive
write (atomic) and read (untrusted), CRIU's log lines, the probe."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from cripy.errors import DeadlineExceededError, FailedPreconditionError, InvalidArgumentError
from cripy.oci.checkpoint import (
    CriuSupport,
    check_location,
    criu_errors,
    dump,
    probe_criu,
    remove_deleted,
    runtime_criu_problem,
    unpack_archive,
    write_archive,
    write_rootfs_diff,
)

DUMP_LOG = """(00.1) Dumping opened files (pid: 240)
(00.2) Error (criu/files-reg.c:1710): Can't lookup mount=30 for fd=1 path=/out
(00.3) Error (criu/cr-dump.c:1635): Dump files (pid: 240) failed with -1
(00.4) Unlock network
(00.5) Error (criu/cr-dump.c:2053): Dumping FAILED.
"""


def test_criu_errors_are_the_last_error_lines() -> None:
    assert criu_errors(DUMP_LOG) == (
        "(00.2) Error (criu/files-reg.c:1710): Can't lookup mount=30 for fd=1 path=/out; "
        "(00.3) Error (criu/cr-dump.c:1635): Dump files (pid: 240) failed with -1; "
        "(00.5) Error (criu/cr-dump.c:2053): Dumping FAILED.")
    assert criu_errors("all fine\n") == ""


def test_probe_says_why_not(tmp_path: Path) -> None:
    assert probe_criu(False) == CriuSupport(
        False, "disabled by [runtime] enable_criu_support = false")
    missing = probe_criu(True, binary="no-such-criu-binary")
    assert not missing.available and "criu is not installed" in missing.reason
    with pytest.raises(FailedPreconditionError, match="criu is not installed"):
        missing.check()


@pytest.mark.parametrize(("location", "problem"), [
    ("", "is empty"),
    ("relative/a.tar", "not an absolute path"),
    ("/x/../a.tar", "contains '..'"),
    ("/no/such/dir/a.tar", "does not exist"),
    ("/proc/a.tar", "not allowed"),
    ("/sys/fs/a.tar", "not allowed"),
])
def test_bad_locations(location: str, problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem):
        check_location(location, [])


def test_locations_in_own_dirs_directories_and_symlinks_are_refused(tmp_path: Path) -> None:
    own = tmp_path / "root"
    (own / "sub").mkdir(parents=True)
    with pytest.raises(InvalidArgumentError, match="not allowed"):
        check_location(str(own / "sub" / "a.tar"), [own])
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        check_location(str(own), [])
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidArgumentError, match="symlink"):
        check_location(str(tmp_path / "link"), [])
    assert check_location(str(tmp_path / "a.tar"), [own]) == tmp_path.resolve() / "a.tar"


def test_rootfs_diff_leaves_out_mount_destinations(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    for path in ("tmp/marker", "etc/hosts", "etc/app.conf", "proc/x", "dev/shm/y"):
        (upper / path).parent.mkdir(parents=True, exist_ok=True)
        (upper / path).write_text(path)
    deleted = write_rootfs_diff(upper, [], ["/proc", "/etc/hosts", "/dev"], tmp_path / "d.tar")
    assert deleted == []
    with tarfile.open(tmp_path / "d.tar") as tf:
        assert sorted(tf.getnames()) == ["etc", "etc/app.conf", "tmp", "tmp/marker"]
        member = tf.extractfile("tmp/marker")
        assert member is not None and member.read() == b"tmp/marker"


def test_remove_deleted_never_follows_symlinks(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    outside = tmp_path / "outside"
    (rootfs / "etc" / "dir").mkdir(parents=True)
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (rootfs / "etc" / "motd").write_text("bye")
    (rootfs / "etc" / "dir" / "file").write_text("bye")
    (rootfs / "escape").symlink_to(outside)
    remove_deleted(rootfs, ["/etc/motd", "/etc/dir", "/escape/precious", "/not/there"])
    assert sorted(os.listdir(rootfs / "etc")) == []
    assert (outside / "precious").read_text() == "keep"
    with pytest.raises(InvalidArgumentError, match="bad deleted path"):
        remove_deleted(rootfs, ["/etc/../../x"])


def test_the_archive_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    (stage / "checkpoint").mkdir(parents=True)
    (stage / "checkpoint" / "inventory.img").write_bytes(b"\x01")
    (stage / "config.dump").write_text(json.dumps({"id": "c1", "rootfsImageName": "busybox"}))
    (stage / "spec.dump").write_text(json.dumps({"annotations": {}}))
    (stage / "deleted.files").write_text(json.dumps(["/bin/vi"]))
    out = tmp_path / "out"
    out.mkdir()
    write_archive(stage, out / "a.tar")
    assert os.listdir(out) == ["a.tar"]
    (tmp_path / "unpacked").mkdir()
    unpacked = unpack_archive(out / "a.tar", tmp_path / "unpacked", 1 << 30)
    assert unpacked.image_names == ["busybox"]
    assert unpacked.deleted_files() == ["/bin/vi"]
    assert (unpacked.images / "inventory.img").read_bytes() == b"\x01"


def test_write_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "config.dump").write_text("{}")
    (stage / "gone").write_text("x")
    out = tmp_path / "out"
    out.mkdir()

    class Boom(Exception):
        pass

    original = tarfile.TarFile.add

    def failing_add(self: tarfile.TarFile, name: str, *args: object, **kwargs: object) -> None:
        if str(name).endswith("gone"):
            raise Boom
        original(self, name, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tarfile.TarFile, "add", failing_add)
        with pytest.raises(Boom):
            write_archive(stage, out / "a.tar")
    assert os.listdir(out) == []


def one_file_tar(name: str, content: bytes) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tf.addfile(info, io.BytesIO(content))
    return data.getvalue()


def test_an_archive_without_criu_images_is_no_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(one_file_tar("config.dump", b"{}"))
    (tmp_path / "dest").mkdir()
    with pytest.raises(InvalidArgumentError, match="is not a checkpoint archive"):
        unpack_archive(tmp_path / "x.tar", tmp_path / "dest", 1 << 20)
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    (tmp_path / "dest2").mkdir()
    with pytest.raises(InvalidArgumentError, match="cannot be read"):
        unpack_archive(tmp_path / "junk.tar", tmp_path / "dest2", 1 << 20)


def test_archive_entries_cannot_escape(tmp_path: Path) -> None:
    (tmp_path / "evil.tar").write_bytes(one_file_tar("../evil", b"x"))
    (tmp_path / "dest").mkdir()
    with pytest.raises(InvalidArgumentError, match="cannot be read"):
        unpack_archive(tmp_path / "evil.tar", tmp_path / "dest", 1 << 20)
    assert not (tmp_path / "evil").exists()


def test_a_dump_past_its_timeout_is_killed(tmp_path: Path) -> None:
    with pytest.raises(DeadlineExceededError, match=r"checkpoint of c1 did not finish within 0.3s"):
        asyncio.run(dump(["sh", "-c", f"echo $$ > {tmp_path}/pid; exec sleep 30"],
                         "checkpoint of c1", tmp_path, 0.3))
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists()


def test_a_failed_dump_says_what_criu_logged(tmp_path: Path) -> None:
    (tmp_path / "dump.log").write_text(DUMP_LOG)
    with pytest.raises(FailedPreconditionError,
                       match=r"checkpoint of c1 failed: .*Can't lookup mount=30"):
        asyncio.run(dump(["false"], "checkpoint of c1", tmp_path, 10))


def test_a_crun_without_criu_is_named(tmp_path: Path) -> None:
    fake = tmp_path / "crun"
    fake.write_text("#!/bin/sh\necho 'crun version 1.8.1'\necho '+SYSTEMD +SECCOMP +YAJL'\n")
    fake.chmod(0o755)
    assert "built without CRIU support" in runtime_criu_problem(str(fake), "crun")
    fake.write_text("#!/bin/sh\necho 'crun version 1.14'\necho '+SYSTEMD +CRIU +YAJL'\n")
    assert runtime_criu_problem(str(fake), "crun") == ""
    assert runtime_criu_problem("/nonexistent/runc", "runc") == ""

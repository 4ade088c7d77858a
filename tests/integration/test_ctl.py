"""`cripy ctl` against a real daemon: crictl-like output and one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.registry import Registry


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
           auth_registry: Registry) -> Iterator[Daemon]:
    hosts = [registry.host, auth_registry.host]
    with Daemon(tmp_path_factory.mktemp("ctl"), insecure_registries=hosts) as d:
        yield d


def test_version(daemon: Daemon) -> None:
    out = daemon.ctl("version").stdout
    assert "RuntimeName:  cripy" in out
    assert "RuntimeApiVersion:  v1" in out


def test_info_shows_conditions(daemon: Daemon) -> None:
    info = json.loads(daemon.ctl("info").stdout)
    types = {c["type"]: c for c in info["status"]["conditions"]}
    assert types["RuntimeReady"]["status"] is True
    assert types["NetworkReady"].get("status", False) is False
    assert info["config"]["root"] == str(daemon.root)


def test_pull_images_inspecti_rmi(daemon: Daemon, images: Any) -> None:
    busybox = images.busybox
    pulled = daemon.ctl("pull", busybox.ref)
    assert pulled.stdout.strip() == f"Image is up to date for {busybox.config_digest}"

    table = daemon.ctl("images").stdout.splitlines()
    assert table[0].split() == ["IMAGE", "TAG", "IMAGE", "ID", "SIZE"]
    row = next(line.split() for line in table if line.startswith(busybox.name + " "))
    assert row[1] == busybox.tag
    assert row[2] == busybox.config_digest.removeprefix("sha256:")[:13]
    assert row[3].endswith("MB")

    digests = daemon.ctl("images", "--digests", busybox.ref).stdout.splitlines()
    assert digests[0].split()[:3] == ["IMAGE", "TAG", "DIGEST"]
    assert digests[1].split()[2] == busybox.digest.removeprefix("sha256:")[:13]

    assert busybox.config_digest in daemon.ctl("images", "-q").stdout.split()
    listed = json.loads(daemon.ctl("images", "-o", "json").stdout)
    assert busybox.config_digest in [i["id"] for i in listed["images"]]

    inspected = json.loads(daemon.ctl("inspecti", busybox.ref).stdout)
    assert inspected["status"]["id"] == busybox.config_digest
    assert inspected["info"]["info"]["imageSpec"]["config"]["Cmd"] == ["sh"]

    fsinfo = json.loads(daemon.ctl("imagefsinfo").stdout)
    assert int(fsinfo["status"]["imageFilesystems"][0]["usedBytes"]["value"]) > 0

    removed = daemon.ctl("rmi", busybox.ref).stdout
    assert removed.strip() == f"Deleted: {busybox.ref}"
    assert busybox.config_digest not in daemon.ctl("images", "-q").stdout


def test_pull_with_creds(daemon: Daemon, auth_registry: Registry) -> None:
    from tests.support.images import push_busybox

    pushed = push_busybox(auth_registry, repo="ctl-private")
    denied = daemon.ctl("pull", pushed.ref, check=False)
    assert denied.returncode == 1
    assert denied.stderr.startswith("cripy ctl pull: UNAUTHENTICATED: ")
    ok = daemon.ctl("pull", "--creds", "alice:wonderland", pushed.ref)
    assert pushed.config_digest in ok.stdout


def one_line_error(result: Any) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return str(lines[0])


def test_errors_are_one_readable_line(daemon: Daemon, registry: Registry) -> None:
    line = one_line_error(daemon.ctl("pull", f"{registry.host}/nope:1", check=False))
    assert line.startswith("cripy ctl pull: NOT_FOUND: ")
    line = one_line_error(daemon.ctl("inspecti", "no-such-image", check=False))
    assert "no such image" in line
    line = one_line_error(daemon.ctl("pull", "Bad:Ref", check=False))
    assert "INVALID_ARGUMENT" in line


def test_unreachable_endpoint_is_one_line(tmp_path: Path, daemon: Daemon) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "cripy", "ctl", "-r", f"unix://{tmp_path}/none.sock",
         "-t", "1", "version"], capture_output=True, text=True, timeout=30)
    assert "cannot connect to unix://" in one_line_error(result)

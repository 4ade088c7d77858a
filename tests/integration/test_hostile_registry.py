"""Hostile images and registries: bombs, forbidden device nodes, redirect loops, wrong
digests, and a registry that never answers. Each is refused cleanly, nothing is kept."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.images import ImageConfig, ImageSpec, Layer, push_image
from tests.support.registry import Registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_nothing_kept(daemon: Daemon) -> None:
    assert list(daemon.images.ListImages(pb.ListImagesRequest()).images) == []
    assert list((daemon.root / "image" / "layers").iterdir()) == []
    assert list((daemon.root / "image" / "tmp").iterdir()) == []
    assert daemon.runtime.Version(pb.VersionRequest()).runtime_name == "cripy"


def pull_error(daemon: Daemon, ref: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        daemon.pull(ref)
    return info.value


def test_a_decompression_bomb_is_bounded(tmp_path: Path, registry: Registry) -> None:
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 64 * 1024 * 1024
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    pushed = push_image(registry, "bomb", "v1",
                        ImageSpec([Layer(bomb.getvalue(), "gzip")], ImageConfig()))
    config = "[image]\nmax_layer_bytes = 8388608\n"
    with Daemon(tmp_path, insecure_registries=[registry.host], extra_config=config) as daemon:
        err = pull_error(daemon, pushed.ref)
        assert err.code() == grpc.StatusCode.DATA_LOSS
        assert "8388608" in (err.details() or "")
        assert_nothing_kept(daemon)


def test_device_nodes_are_refused_when_the_config_forbids_them(tmp_path: Path,
                                                               registry: Registry) -> None:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("dev/mem-copy")
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 1, 1
        tar.addfile(info)
    pushed = push_image(registry, "devices", "v1", ImageSpec([Layer(layer.getvalue())],
                                                             ImageConfig()))
    config = "[image]\nallow_device_nodes = false\n"
    with Daemon(tmp_path, insecure_registries=[registry.host], extra_config=config) as daemon:
        err = pull_error(daemon, pushed.ref)
        assert err.code() == grpc.StatusCode.DATA_LOSS
        assert "mem-copy" in (err.details() or "")
        assert_nothing_kept(daemon)


class FakeRegistry(ThreadingHTTPServer):
    """A registry that serves one small image and misbehaves in one chosen way."""

    def __init__(self, behaviour: str) -> None:
        super().__init__(("127.0.0.1", 0), FakeRegistryHandler)
        self.behaviour = behaviour
        # "wrong-diff-id": one sound layer, but the config names another diff ID for it.
        self.layer_blob = gzip.compress(tar_of_one_file()) if behaviour == "wrong-diff-id" \
            else b""
        diff_ids = [digest(b"something else")] if self.layer_blob else []
        layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                   "digest": digest(self.layer_blob), "size": len(self.layer_blob)}] \
            if self.layer_blob else []
        self.config_blob = json.dumps({"architecture": "amd64", "os": "linux",
                                       "rootfs": {"type": "layers",
                                                  "diff_ids": diff_ids}}).encode()
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digest(self.config_blob), "size": len(self.config_blob)},
            "layers": layers,
        }).encode()
        self.requests = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class FakeRegistryHandler(BaseHTTPRequestHandler):
    server: FakeRegistry

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests += 1
        behaviour = self.server.behaviour
        if self.path == "/v2/":
            self.reply(200, b"{}", "application/json")
        elif "/manifests/" in self.path:
            body = self.server.manifest
            if behaviour == "wrong-digest" and "sha256:" in self.path:
                body = body.replace(b'"layers"', b'"layers" ')
            self.reply(200, body, OCI_MANIFEST)
        elif "/blobs/" in self.path and behaviour == "redirect-loop":
            self.send_response(302)
            self.send_header("Location", self.path + "x")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif "/blobs/" in self.path and behaviour == "truncated":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.server.config_blob)))
            self.end_headers()
            self.wfile.write(self.server.config_blob[:10])
            self.wfile.flush()
            self.close_connection = True
        elif "/blobs/" in self.path and self.server.layer_blob and \
                self.path.endswith(digest(self.server.layer_blob)):
            self.reply(200, self.server.layer_blob, "application/octet-stream")
        elif "/blobs/" in self.path:
            self.reply(200, self.server.config_blob, "application/octet-stream")
        else:
            self.reply(404, b'{"errors": []}', "application/json")

    def reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Content-Digest", digest(body))
        self.end_headers()
        self.wfile.write(body)


def tar_of_one_file() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("file")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"data\n"))
    return buf.getvalue()


@contextmanager
def fake_registry(behaviour: str) -> Iterator[FakeRegistry]:
    server = FakeRegistry(behaviour)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("behaviour", "code", "needle"), [
    ("redirect-loop", grpc.StatusCode.UNAVAILABLE, "redirect"),
    ("truncated", grpc.StatusCode.UNAVAILABLE, "received 10 bytes"),
    ("wrong-digest", grpc.StatusCode.DATA_LOSS, "sha256:"),
    ("wrong-diff-id", grpc.StatusCode.DATA_LOSS, "but the image config says"),
])
def test_a_misbehaving_registry_is_refused(tmp_path: Path, behaviour: str,
                                           code: grpc.StatusCode, needle: str) -> None:
    with fake_registry(behaviour) as server, \
            Daemon(tmp_path, insecure_registries=[server.host]) as daemon:
        ref = f"{server.host}/app:1"
        if behaviour == "wrong-digest":
            ref = f"{server.host}/app@{digest(server.manifest)}"
        err = pull_error(daemon, ref)
        assert err.code() == code, err.details()
        assert needle in (err.details() or "")
        assert_nothing_kept(daemon)


def test_a_registry_that_never_answers_times_out(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections (kernel backlog) and never says a word
    host = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        config = "[image]\nregistry_timeout = 1\n"
        with Daemon(tmp_path, insecure_registries=[host], extra_config=config) as daemon:
            started = time.monotonic()
            err = pull_error(daemon, f"{host}/app:1")
            assert time.monotonic() - started < 30
            assert err.code() in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED), err.details()
            assert host in (err.details() or "")
            assert_nothing_kept(daemon)
    finally:
        listener.close()


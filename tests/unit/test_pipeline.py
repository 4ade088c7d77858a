"""The streaming pull's pure parts: the feed between download and unpack, gzip streaming,
and a LayerSink unpacking while bytes arrive (no registry, no root tools)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cripy.errors import IntegrityError
from cripy.image import layer
from cripy.image.layer import GzipSource
from cripy.image.pipeline import Feed, FeedAborted, LayerSink


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1577836800
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_all(source: GzipSource, size: int = 1000) -> bytes:
    out = []
    while data := source.read(size):
        assert len(data) <= size
        out.append(data)
    return b"".join(out)


def test_gzip_source_reads_members_and_zero_padding() -> None:
    blob = gzip.compress(b"a" * 100_000) + gzip.compress(b"bc") + b"\0" * 700
    assert read_all(GzipSource(io.BytesIO(blob))) == b"a" * 100_000 + b"bc"


def test_gzip_source_notices_truncation_and_garbage() -> None:
    blob = gzip.compress(os.urandom(50_000))
    with pytest.raises(EOFError):
        read_all(GzipSource(io.BytesIO(blob[:-9])))
    for garbage in (b"garbage", b"garbage" * 10):
        with pytest.raises((EOFError, zlib.error, layer.GZIP_IMPL.error)):
            read_all(GzipSource(io.BytesIO(blob + garbage)))


def test_gzip_source_bounds_each_read_of_a_bomb() -> None:
    source = GzipSource(io.BytesIO(gzip.compress(bytes(64 * 1024 * 1024))))
    assert len(source.read(4096)) == 4096


def test_the_fastest_inflate_available_is_used() -> None:
    assert layer.GZIP_IMPL.__name__ == "isal.isal_zlib"


def test_feed_hands_chunks_to_a_thread_and_applies_back_pressure() -> None:
    data = os.urandom(300_000)

    async def go() -> bytes:
        feed = Feed(asyncio.get_running_loop(), limit=10_000)
        got: list[bytes] = []

        def reader() -> None:
            while chunk := feed.read(777):
                got.append(chunk)

        thread = asyncio.ensure_future(asyncio.to_thread(reader))
        for i in range(0, len(data), 4096):
            await feed.put(data[i:i + 4096])
            assert feed._buffered <= 10_000 + 4096
        feed.close()
        await thread
        return b"".join(got)

    assert asyncio.run(go()) == data


def test_an_aborted_feed_stops_its_reader() -> None:
    async def go() -> None:
        feed = Feed(asyncio.get_running_loop())
        await feed.put(b"x")
        feed.abort()
        with pytest.raises(FeedAborted):
            feed.read(10)

    asyncio.run(go())


def feed_sink(tmp_path: Path, blob: bytes, media_type: str = "application/vnd.oci.image"
              ".layer.v1.tar+gzip") -> tuple[LayerSink, str]:
    async def go() -> tuple[LayerSink, str]:
        stage = tmp_path / "stage"
        stage.mkdir()
        with ThreadPoolExecutor(1) as pool:
            sink = LayerSink(stage, media_type, label="layer x", size=len(blob),
                             max_bytes=1 << 30, allow_devices=False, executor=pool)
            for i in range(0, len(blob), 5000):
                await sink.write(blob[i:i + 5000])
            return sink, await sink.finish()

    return asyncio.run(go())


def test_a_layer_sink_unpacks_while_fed(tmp_path: Path) -> None:
    tar = tar_of({"a/b.txt": b"hello" * 1000, "c": os.urandom(70_000)})
    blob = gzip.compress(tar)
    sink, blob_digest = feed_sink(tmp_path, blob)
    assert blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    result = sink.result()
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert (sink.stage / "diff" / "a" / "b.txt").read_bytes() == b"hello" * 1000


def test_a_corrupt_layer_still_gets_its_digest_and_the_error_waits(tmp_path: Path) -> None:
    blob = gzip.compress(b"not a tar at all" * 100)
    sink, blob_digest = feed_sink(tmp_path, blob)
    assert blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    with pytest.raises(IntegrityError, match="layer x"):
        sink.result()


def test_discard_removes_the_stage(tmp_path: Path) -> None:
    async def go() -> Path:
        stage = tmp_path / "stage"
        stage.mkdir()
        with ThreadPoolExecutor(1) as pool:
            sink = LayerSink(stage, "application/vnd.oci.image.layer.v1.tar", label="layer x",
                             size=10_000, max_bytes=1 << 30, allow_devices=False,
                             executor=pool)
            await sink.write(tar_of({"f": b"x" * 5000})[:3000])
            await sink.discard()
        return stage

    assert not asyncio.run(go()).exists()

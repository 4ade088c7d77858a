"""Images as the runtime sees them: pull, look up, list, remove, measure.

This owns the pull pipeline (registry -> verified blobs -> unpacked layers -> image
record) on top of `ImageStore`, `RegistryClient` and `LayerSink`. The gRPC layer only
translates requests into these calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cripy.config import Config
from cripy.crashpoints import crash_point
from cripy.errors import FailedPreconditionError, IntegrityError, InvalidArgumentError
from cripy.fsutil import remove_tree
from cripy.image.manifest import Descriptor
from cripy.image.pinning import PinnedImages
from cripy.image.pipeline import LayerSink, to_completion
from cripy.image.reference import Reference, parse_reference
from cripy.image.registry import Credentials, RegistryClient, Resolved
from cripy.image.store import ImageRecord, ImageStore, LayerRecord, digest_hex
from cripy.metrics import record_pull
from cripy.oci.handlers import select
from cripy.runtime.locks import LockTable

log = logging.getLogger(__name__)

T = TypeVar("T")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{6,64}$")


@dataclass(frozen=True)
class ImageUser:
    """Who the image's config says its processes run as."""

    uid: int | None
    username: str


class ImageManager:
    def __init__(self, config: Config, store: ImageStore, client: RegistryClient) -> None:
        self.config = config
        self.store = store
        self.client = client
        self._layer_locks = LockTable()  # by diff ID; an entry lives while it is used
        self._gc_lock = asyncio.Lock()
        # Parsed image configs by ID: content-addressed, so never stale. ListImages reads
        # every image's user from them, and the kubelet lists images often.
        self._configs: dict[str, dict[str, Any]] = {}
        # Layers that pulls in progress need: garbage collection must leave them.
        self._in_flight: Counter[str] = Counter()
        self._download_slots = asyncio.Semaphore(config.image.pull_concurrency)
        # One thread per layer being unpacked: they live as long as the download.
        self._unpackers = ThreadPoolExecutor(config.image.pull_concurrency,
                                             thread_name_prefix="unpack")
        # Layers containers are built on; set by the daemon once containers exist.
        self.layers_in_use: Callable[[], frozenset[str]] = frozenset
        self.pinned = PinnedImages(config.image.pinned_images)
        # The containers mounting an image as an image volume; set by the daemon.
        self.image_volume_users: Callable[[str], list[str]] = lambda image_id: []

    async def start(self) -> None:
        await asyncio.to_thread(self.store.load)

    async def close(self) -> None:
        await self.client.aclose()
        self._unpackers.shutdown(wait=False)

    # --- pull ---------------------------------------------------------------------------

    async def pull(self, reference: str, creds: Credentials | None = None) -> ImageRecord:
        ref = parse_reference(reference)
        started = time.monotonic()
        resolved = await self.client.resolve(ref, creds)
        config_bytes = await self.client.fetch_blob_bytes(resolved, resolved.manifest.config)
        diff_ids = _diff_ids(config_bytes, len(resolved.manifest.layers), ref)
        to_fetch = sum(desc.size for desc, diff_id in zip(resolved.manifest.layers, diff_ids,
                                                          strict=True)
                       if not self.store.has_layer(diff_id))

        self._in_flight.update(diff_ids)
        try:
            record = await self._store_image(ref, resolved, config_bytes, diff_ids)
        except BaseException:
            # Layers this pull committed but no image uses would linger until the next
            # start; drop them now (layers other pulls are fetching stay pinned).
            await self.collect_garbage(pinned=Counter(diff_ids))
            raise
        finally:
            self._in_flight.subtract(diff_ids)
            self._in_flight += Counter()  # drop zero counts
        seconds = time.monotonic() - started
        record_pull(to_fetch + len(config_bytes), seconds)
        log.info("pulled %s as %s in %.2fs", ref, record.id, seconds)
        return record

    async def _store_image(
        self, ref: Reference, resolved: Resolved, config_bytes: bytes, diff_ids: list[str]
    ) -> ImageRecord:
        # A TaskGroup cancels the other layers when one fails and waits for them, so
        # nothing is still being committed when the caller cleans up.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._ensure_layer(resolved, desc, diff_id))
                    for desc, diff_id in zip(resolved.manifest.layers, diff_ids, strict=True)
                ]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the first failure is the one to report
        sizes = [t.result() for t in tasks]
        record = ImageRecord(
            id=resolved.manifest.config.digest,
            manifest_digest=resolved.manifest_digest,
            layers=diff_ids,
            size=sum(sizes),
            repo_tags=[f"{ref.name}:{ref.tag}"] if ref.tag else [],
            repo_digests=[f"{ref.name}@{resolved.repo_digest}"],
        )

        def commit() -> ImageRecord:
            self.store.write_blob(record.id, config_bytes)
            self.store.write_blob(resolved.manifest_digest, resolved.manifest_bytes)
            if resolved.index_bytes is not None:
                self.store.write_blob(resolved.repo_digest, resolved.index_bytes)
            crash_point("pull-before-image")
            return self.store.put_image(record)

        async with self._gc_lock:
            return await asyncio.to_thread(commit)

    async def collect_garbage(self, pinned: Counter[str] | None = None) -> None:
        """Drop layers and blobs no image uses, except those pulls are working on."""
        keep = frozenset(self._in_flight - (pinned or Counter())) | self.layers_in_use()
        async with self._gc_lock:
            await asyncio.to_thread(self.store.collect_garbage, keep)

    async def _ensure_layer(self, resolved: Resolved, desc: Descriptor, diff_id: str) -> int:
        """Download and unpack one layer unless it is already stored; its unpacked size."""
        async with self._layer_locks.hold(diff_id), self._download_slots:
            if not self.store.has_layer(diff_id):
                await self._unpack_layer(resolved, desc, diff_id)
        return self.store.layer_record(diff_id).size

    async def _unpack_layer(self, resolved: Resolved, desc: Descriptor, diff_id: str) -> None:
        """Download the layer while unpacking it (cripy.image.pipeline), verify, commit."""
        def open_sink() -> LayerSink:
            # One mkdir: no thread, so no window to leak it.
            return LayerSink(self.store.staging_dir(), desc.media_type,
                             label=f"layer {desc.digest}", size=desc.size,
                             max_bytes=self.config.image.max_layer_bytes,
                             allow_devices=self.config.image.allow_device_nodes,
                             executor=self._unpackers)

        sink = await self.client.fetch_blob(resolved, desc, open_sink)  # digest verified
        try:
            result = sink.result()
            if result.diff_id != diff_id:
                raise IntegrityError(
                    f"layer {desc.digest} unpacks to {result.diff_id}, "
                    f"but the image config says {diff_id}"
                )
            record = LayerRecord(
                diff_id=diff_id,
                blob_digest=desc.digest,
                media_type=desc.media_type,
                size=result.size,
                inodes=result.inodes,
            )
            await in_thread_to_completion(self.store.commit_layer, sink.stage, record)
            crash_point("pull-after-layer")
        finally:
            await in_thread_to_completion(remove_tree, sink.stage)

    # --- queries ------------------------------------------------------------------------

    def lookup(self, text: str) -> ImageRecord | None:
        """Find an image by ID, unique ID prefix, tag or repo digest."""
        if not text:
            raise InvalidArgumentError("image reference is empty")
        if text.startswith("sha256:"):
            try:
                return self.store.get(f"sha256:{digest_hex(text)}")
            except ValueError as exc:
                raise InvalidArgumentError(f"invalid image ID {text!r}") from exc
        if len(text) == 64 and _HEX_PREFIX.match(text):
            return self.store.get(f"sha256:{text}")
        try:
            ref: Reference | None = parse_reference(text)
        except InvalidArgumentError:
            ref = None
        if ref is not None:
            found = (
                self.store.find_by_repo_digest(f"{ref.name}@{ref.digest}")
                if ref.digest
                else self.store.find_by_tag(f"{ref.name}:{ref.tag}")
            )
            if found is not None:
                return found
        if _HEX_PREFIX.match(text):
            matches = self.store.find_by_id_prefix(text)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgumentError(f"image ID prefix {text!r} is ambiguous")
        if ref is None:
            parse_reference(text)  # raises the reference's own error
        return None

    def list(self, filter_ref: str = "") -> list[ImageRecord]:
        if filter_ref:
            found = self.lookup(filter_ref)
            return [found] if found else []
        return sorted(self.store.list_images(), key=lambda r: r.id)

    def image_config(self, record: ImageRecord) -> dict[str, Any]:
        config = self._configs.get(record.id)
        if config is None:
            config = self._configs[record.id] = json.loads(self.store.read_blob(record.id))
        return config

    def is_pinned(self, record: ImageRecord) -> bool:
        """Whether the kubelet's image GC must leave this image (`[image] pinned_images`)."""
        return record.pinned or self.pinned.matches(record.repo_tags + record.repo_digests)

    def check_runtime_handler(self, name: str) -> None:
        """ImageSpec.runtime_handler must name a configured handler ("" is the default).

        Every handler shares one image store, so the image is the same for all of them.
        """
        select(self.config.runtime.handlers, self.config.runtime.default_handler, name)

    def image_user(self, record: ImageRecord) -> ImageUser:
        return user_from_config(self.image_config(record))

    async def remove(self, text: str) -> None:
        """Remove an image; removing one that is not there succeeds, as the CRI asks."""
        record = self.lookup(text)
        if record is None:
            return
        users = self.image_volume_users(record.id)
        if users:
            raise FailedPreconditionError(
                f"image {text!r} ({record.id}) is mounted as an image volume by container "
                f"{', '.join(users)}: remove the container first")
        await asyncio.to_thread(self.store.delete_image, record.id)
        self._configs.pop(record.id, None)
        await self.collect_garbage()
        log.info("removed image %s", record.id)

    async def usage(self) -> tuple[int, int]:
        return await asyncio.to_thread(self.store.usage)

    @property
    def mountpoint(self) -> Path:
        return self.store.base


def user_from_config(config: dict[str, Any]) -> ImageUser:
    """The config's User ("uid", "uid:gid", "name" or "name:group") as uid or username."""
    user = str((config.get("config") or {}).get("User") or "")
    name = user.split(":", 1)[0]
    if name.isdigit():
        return ImageUser(uid=int(name), username="")
    return ImageUser(uid=None, username=name)


def _diff_ids(config_bytes: bytes, layer_count: int, ref: Reference) -> list[str]:
    try:
        config = json.loads(config_bytes)
        diff_ids = config["rootfs"]["diff_ids"]
        if not isinstance(diff_ids, list):
            raise TypeError("diff_ids is not a list")
        for d in diff_ids:
            digest_hex(d)
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"image config of {ref} is malformed: {exc}") from exc
    if len(diff_ids) != layer_count:
        raise IntegrityError(
            f"image {ref} has {layer_count} layers but its config lists {len(diff_ids)}"
        )
    return [str(d) for d in diff_ids]


async def in_thread_to_completion(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking `func` in a thread; if cancelled, let it finish before re-raising.

    A thread cannot be stopped, and cleanup that races a thread still writing would
    leave half a layer behind.
    """
    return await to_completion(asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs)))


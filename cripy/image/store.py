"""The on-disk image store: content-addressed blobs, unpacked layers and image records.

Layout under `<root>/image`:

    blobs/sha256/<hex>        manifests, indexes and configs, named by their digest
    layers/<hex>/diff/        one unpacked layer (overlayfs lower form), named by its diff ID
    layers/<hex>/layer.json   what the layer came from and how big it is
    images/<hex>.json         one image record, named by its config digest (the image ID)
    tmp/                      staging; anything here is unfinished and removed on start

Everything becomes visible by a rename only once it is complete, and an image record is
written last, so a pull cut short leaves nothing that looks like an image. Layers and
blobs that no record names are removed by `collect_garbage()`.

The store's methods do blocking I/O; async callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cripy.crashpoints import crash_point
from cripy.fsutil import atomic_write, atomic_write_json, disk_usage, fsync_dir, remove_tree

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    diff_id: str
    blob_digest: str
    media_type: str
    size: int  # bytes of file content unpacked
    inodes: int


@dataclass
class ImageRecord:
    id: str  # the config digest
    manifest_digest: str
    layers: list[str]  # diff IDs, bottom first
    size: int
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)
    pinned: bool = False


def digest_hex(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64 or not all(
        c in "0123456789abcdef" for c in hexpart
    ):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hexpart


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.base = root / "image"
        self.blobs = self.base / "blobs" / "sha256"
        self.layers = self.base / "layers"
        self.images = self.base / "images"
        self.tmp = self.base / "tmp"
        self._records: dict[str, ImageRecord] = {}
        self._lock = threading.Lock()

    # --- start-up ---------------------------------------------------------------------

    def load(self) -> None:
        """Read the records and drop what an interrupted pull left in tmp/.

        Layers and blobs nobody uses are left for `collect_garbage()`, which needs to know
        the layers containers use.
        """
        for d in (self.blobs, self.layers, self.images):
            d.mkdir(parents=True, exist_ok=True)
        remove_tree(self.tmp)
        self.tmp.mkdir(mode=0o700)
        for path in sorted(self.images.glob("*.json")):
            try:
                record = ImageRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("dropping unreadable image record %s: %s", path, exc)
                path.unlink()
                continue
            if all(self.has_layer(d) for d in record.layers):
                self._records[record.id] = record
            else:
                log.warning("dropping image %s: a layer is missing", record.id)
                path.unlink()

    # --- blobs and layers ---------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest_hex(digest)

    def write_blob(self, digest: str, data: bytes) -> None:
        path = self.blob_path(digest)
        if not path.exists():
            atomic_write(path, data, mode=0o644)

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def layer_dir(self, diff_id: str) -> Path:
        """The directory holding a layer; its content is in `diff/`."""
        return self.layers / digest_hex(diff_id)

    def has_layer(self, diff_id: str) -> bool:
        return (self.layer_dir(diff_id) / "layer.json").exists()

    def layer_record(self, diff_id: str) -> LayerRecord:
        return LayerRecord(**json.loads((self.layer_dir(diff_id) / "layer.json").read_text()))

    def staging_dir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.tmp))

    def commit_layer(self, staged: Path, record: LayerRecord) -> None:
        """Make a staged layer (with its content in `staged/diff`) visible under its diff ID.

        A layer that another pull committed first wins; the staged copy is dropped.
        """
        atomic_write_json(staged / "layer.json", asdict(record))
        crash_point("pull-layer-staged")
        try:
            os.rename(staged, self.layer_dir(record.diff_id))
        except OSError:
            if not self.has_layer(record.diff_id):
                raise
            remove_tree(staged)

    # --- image records ------------------------------------------------------------------

    def put_image(self, record: ImageRecord) -> ImageRecord:
        """Store `record`, merged into an existing one with the same ID.

        Its tags move away from any other image that held them.
        """
        with self._lock:
            existing = self._records.get(record.id)
            if existing is not None:
                record.repo_tags = _merged(existing.repo_tags, record.repo_tags)
                record.repo_digests = _merged(existing.repo_digests, record.repo_digests)
                record.pinned = existing.pinned or record.pinned
            for other in self._records.values():
                if other.id != record.id and set(other.repo_tags) & set(record.repo_tags):
                    other.repo_tags = [t for t in other.repo_tags if t not in record.repo_tags]
                    self._write(other)
            self._write(record)
            self._records[record.id] = record
            return record

    def _write(self, record: ImageRecord) -> None:
        atomic_write_json(self.images / f"{digest_hex(record.id)}.json", asdict(record))

    def delete_image(self, image_id: str) -> None:
        with self._lock:
            self._records.pop(image_id, None)
            with contextlib.suppress(FileNotFoundError):
                (self.images / f"{digest_hex(image_id)}.json").unlink()
            fsync_dir(self.images)

    def list_images(self) -> list[ImageRecord]:
        with self._lock:
            return list(self._records.values())

    def get(self, image_id: str) -> ImageRecord | None:
        with self._lock:
            return self._records.get(image_id)

    def find_by_tag(self, tag: str) -> ImageRecord | None:
        with self._lock:
            return next((r for r in self._records.values() if tag in r.repo_tags), None)

    def find_by_repo_digest(self, repo_digest: str) -> ImageRecord | None:
        with self._lock:
            return next(
                (r for r in self._records.values() if repo_digest in r.repo_digests), None
            )

    def find_by_id_prefix(self, prefix: str) -> list[ImageRecord]:
        with self._lock:
            return [r for r in self._records.values() if digest_hex(r.id).startswith(prefix)]

    # --- garbage and usage --------------------------------------------------------------

    def collect_garbage(self, layers_in_use: frozenset[str] = frozenset()) -> None:
        """Delete layers and blobs that no image record (nor `layers_in_use`) refers to."""
        with self._lock:
            keep_layers = {digest_hex(d) for r in self._records.values() for d in r.layers}
            keep_layers |= {digest_hex(d) for d in layers_in_use}
            keep_blobs = set()
            for r in self._records.values():
                keep_blobs |= self._blobs_of(r)
        for path in self.layers.iterdir():
            if path.name not in keep_layers:
                log.info("removing unused layer %s", path.name)
                remove_tree(path)
        for path in self.blobs.iterdir():
            if path.name not in keep_blobs:
                remove_tree(path)

    def _blobs_of(self, record: ImageRecord) -> set[str]:
        names = {digest_hex(record.id), digest_hex(record.manifest_digest)}
        for repo_digest in record.repo_digests:
            names.add(digest_hex(repo_digest.rpartition("@")[2]))
        return names

    def usage(self) -> tuple[int, int]:
        """(bytes, inodes) the image store occupies on disk."""
        return disk_usage(self.base)


def _merged(old: list[str], new: list[str]) -> list[str]:
    return old + [x for x in new if x not in old]

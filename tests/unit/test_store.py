from __future__ import annotations

import hashlib
from pathlib import Path

from cripy.image.store import ImageRecord, ImageStore, LayerRecord


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def add_layer(store: ImageStore, name: str) -> str:
    diff_id = digest(name)
    staged = store.staging_dir()
    (staged / "diff").mkdir()
    (staged / "diff" / name).write_text(name)
    store.commit_layer(staged, LayerRecord(diff_id, digest("blob" + name), "x", 1, 1))
    return diff_id


def image(name: str, layers: list[str], tags: list[str]) -> ImageRecord:
    return ImageRecord(id=digest(name), manifest_digest=digest("m" + name), layers=layers,
                       size=1, repo_tags=tags, repo_digests=[f"r/{name}@{digest('m' + name)}"])


def new_store(tmp_path: Path) -> ImageStore:
    store = ImageStore(tmp_path)
    store.load()
    return store


def test_records_survive_a_restart(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    layer = add_layer(store, "base")
    store.put_image(image("a", [layer], ["r/a:1"]))
    again = new_store(tmp_path)
    assert [r.repo_tags for r in again.list_images()] == [["r/a:1"]]
    assert again.has_layer(layer)


def test_a_tag_moves_to_the_newer_image(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    layer = add_layer(store, "base")
    store.put_image(image("old", [layer], ["r/a:latest", "r/a:1"]))
    store.put_image(image("new", [layer], ["r/a:latest"]))
    assert store.find_by_tag("r/a:latest") == store.get(digest("new"))
    old = store.get(digest("old"))
    assert old is not None and old.repo_tags == ["r/a:1"]
    assert new_store(tmp_path).get(digest("old")) == old


def test_pulling_again_merges_tags(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    layer = add_layer(store, "base")
    store.put_image(image("a", [layer], ["r/a:1"]))
    merged = store.put_image(image("a", [layer], ["r/a:2"]))
    assert merged.repo_tags == ["r/a:1", "r/a:2"]


def test_garbage_collection_keeps_shared_layers(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    base, top = add_layer(store, "base"), add_layer(store, "top")
    store.put_image(image("a", [base], ["r/a:1"]))
    store.put_image(image("b", [base, top], ["r/b:1"]))
    store.delete_image(digest("b"))
    store.collect_garbage()
    assert store.has_layer(base) and not store.has_layer(top)
    store.delete_image(digest("a"))
    store.collect_garbage()
    assert list(store.layers.iterdir()) == []


def test_unfinished_work_is_dropped_on_load(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    orphan = add_layer(store, "orphan")  # a layer whose image record was never written
    staged = store.staging_dir()
    (staged / "half-written").write_text("x")
    store.blob_path(digest("stray")).write_text("x")
    again = new_store(tmp_path)
    assert list(again.tmp.iterdir()) == []
    again.collect_garbage()
    assert not again.has_layer(orphan)
    assert list(again.blobs.iterdir()) == []


def test_an_image_whose_layer_is_gone_is_dropped(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    layer = add_layer(store, "base")
    store.put_image(image("a", [layer], ["r/a:1"]))
    (store.layer_dir(layer) / "layer.json").unlink()
    assert new_store(tmp_path).list_images() == []

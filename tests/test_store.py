"""Checkpoint store: content-addressed keys, manifest written last, verified reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.store import (
    CheckpointNotFound,
    CorruptCheckpoint,
    LocalStore,
    StoreError,
    checkpoint_key,
    open_store,
    result_key,
)


def _folder(tmp_path: Path, content: bytes = b"weights" * 1000, name: str = "src") -> Path:
    src = tmp_path / name
    (src / "sub").mkdir(parents=True)
    (src / "model-00001-of-00002.safetensors").write_bytes(content)
    (src / "model-00002-of-00002.safetensors").write_bytes(content[::-1])
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "extra.json").write_text("{}")
    return src


def test_keys_are_content_addressed_and_order_sensitive():
    a = {"method": "ft", "params": {"lr": 1e-4}}
    b = {"method": "wanda", "params": {"sparsity": 0.5}}
    assert checkpoint_key("d1", [a, b]) == checkpoint_key("d1", [dict(a), dict(b)])
    assert checkpoint_key("d1", [a, b]) != checkpoint_key("d1", [b, a])
    assert checkpoint_key("d1", [a]) != checkpoint_key("d2", [a])
    # parameter dict order does not matter, values do
    assert checkpoint_key("d", [{"params": {"x": 1, "y": 2}, "method": "m"}]) == checkpoint_key(
        "d", [{"method": "m", "params": {"y": 2, "x": 1}}]
    )
    assert result_key("k", "edit", {"o": 1}) != result_key("k", "edit", {"o": 2})


def test_a_non_default_step_precision_is_part_of_step_keys(monkeypatch):
    a = {"method": "ft", "params": {"lr": 1e-4}}
    monkeypatch.delenv("LMCOMPOSE_STEP_DTYPE", raising=False)
    default = checkpoint_key("d1", [a])
    monkeypatch.setenv("LMCOMPOSE_STEP_DTYPE", "float32")
    assert checkpoint_key("d1", [a]) == default  # the default keeps today's keys
    monkeypatch.setenv("LMCOMPOSE_STEP_DTYPE", "bfloat16")
    assert checkpoint_key("d1", [a]) != default  # bfloat16 steps never stand in for float32 ones
    assert checkpoint_key("d1", []) == checkpoint_key("d1", [])  # the base key follows its content only
    monkeypatch.delenv("LMCOMPOSE_STEP_DTYPE")
    assert checkpoint_key("d1", [a]) == default


def test_round_trip_with_manifest(tmp_path):
    store = LocalStore(tmp_path / "store")
    src = _folder(tmp_path)
    key = checkpoint_key("base", [])
    assert not store.has_checkpoint(key)
    manifest = store.put_checkpoint(key, src, {"note": "x"})
    assert set(manifest["files"]) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "config.json",
        "sub/extra.json",
    }
    folder, read = store.get_checkpoint(key)
    assert (folder / "sub" / "extra.json").read_text() == "{}"
    assert read["meta"] == {"note": "x"}
    assert store.checkpoint_meta(key) == {"note": "x"}
    # nothing left in staging
    assert not any((store.root / ".staging").iterdir())


def test_truncated_file_is_rejected_and_named(tmp_path):
    store = LocalStore(tmp_path / "store")
    key = checkpoint_key("base", [])
    store.put_checkpoint(key, _folder(tmp_path), {})
    shard = store.root / key / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(CorruptCheckpoint, match="model-00001-of-00002.safetensors"):
        store.get_checkpoint(key)


def test_same_size_corruption_is_detected_by_digest(tmp_path):
    store = LocalStore(tmp_path / "store")
    key = checkpoint_key("base", [])
    store.put_checkpoint(key, _folder(tmp_path), {})
    shard = store.root / key / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        store.get_checkpoint(key)


def test_checkpoint_without_manifest_is_invisible_and_replaced(tmp_path):
    """A writer killed before the manifest leaves a folder that readers ignore and the next writer replaces."""
    store = LocalStore(tmp_path / "store")
    key = checkpoint_key("base", ["x"])
    leftover = store.root / key
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    assert not store.has_checkpoint(key)
    with pytest.raises(CheckpointNotFound):
        store.get_checkpoint(key)
    store.put_checkpoint(key, _folder(tmp_path), {"ok": True})
    folder, manifest = store.get_checkpoint(key)
    assert manifest["meta"] == {"ok": True}
    assert (folder / "model.safetensors").exists() is False


def test_second_writer_of_same_key_keeps_committed_copy(tmp_path):
    store = LocalStore(tmp_path / "store")
    key = checkpoint_key("base", ["y"])
    first = store.put_checkpoint(key, _folder(tmp_path), {"writer": 1})
    second = store.put_checkpoint(key, _folder(tmp_path, name="src2"), {"writer": 2})
    assert second["meta"] == {"writer": 1} == first["meta"]
    store.get_checkpoint(key)


def test_json_documents_are_atomic(tmp_path):
    store = LocalStore(tmp_path)
    store.put_json("results/a.json", {"v": 1})
    assert store.has_json("results/a.json")
    assert store.get_json("results/a.json") == {"v": 1}
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["a.json"]
    with pytest.raises(KeyError):
        store.get_json("results/missing.json")


def test_empty_checkpoint_and_bad_keys_are_refused(tmp_path):
    store = LocalStore(tmp_path / "store")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="empty"):
        store.put_checkpoint("ckpt/e", empty, {})
    with pytest.raises(StoreError, match="invalid store key"):
        store.put_json("../escape.json", {})


def test_open_store_uris(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(tmp_path.as_uri()).root == tmp_path.resolve()
    with pytest.raises(StoreError, match="scheme"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError):
        open_store("")


def test_verification_cache_is_invalidated_by_any_rewrite(tmp_path):
    """Reads skip re-hashing unchanged files, but a rewritten file (same size) is caught again."""
    store = LocalStore(tmp_path / "store")
    key = checkpoint_key("base", ["z"])
    store.put_checkpoint(key, _folder(tmp_path), {})
    store.get_checkpoint(key)  # full verification, remembered
    assert (store.root / key / ".verified.json").is_file()
    store.get_checkpoint(key)  # served from the stamp
    shard = store.root / key / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0x01
    os.utime(shard, ns=(0, 0))  # even an old mtime differs from the remembered one
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="model-00001-of-00002.safetensors"):
        store.get_checkpoint(key)


def test_folder_in_staging_is_moved_and_still_verified_on_read(tmp_path):
    store = LocalStore(tmp_path / "store")
    staged = store.staging_dir()
    (staged / "model.safetensors").write_bytes(b"abc" * 100)
    key = checkpoint_key("base", ["moved"])
    manifest = store.put_checkpoint(key, staged, {})
    assert not (staged / "model.safetensors").exists()  # moved, not copied
    folder, _ = store.get_checkpoint(key)
    assert (folder / "model.safetensors").read_bytes() == b"abc" * 100
    assert manifest["files"]["model.safetensors"]["size"] == 300

"""Reliability of the store: hash-on-read, quarantine and recompute, one runner per step, stale staging.

Each case failed on the code before the reliability issue (see docs/s3.md "Failure behaviour").
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from shared.lease import compute_once, lease_key
from shared.store import CorruptCheckpoint, LocalStore, checkpoint_key
from tests.test_store import _folder
from tests.test_store_s3 import Backend, S3Backend, backend  # noqa: F401 - the two-backend fixture


def _flip_keeping_stat(path: Path, offset: int = 10) -> None:
    """Bit rot as a copy tool that keeps timestamps leaves it: same size, same mtime."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_same_size_same_mtime_corruption_is_caught_on_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    key = checkpoint_key("base", [{"method": "rot"}])
    store.put_checkpoint(key, _folder(tmp_path), {})
    folder, _ = store.get_checkpoint(key)  # verified once (and remembered)
    _flip_keeping_stat(folder / "model-00001-of-00002.safetensors")
    with pytest.raises(CorruptCheckpoint, match=r"model-00001-of-00002\.safetensors does not match its sha256.*quarantined"):
        store.get_checkpoint(key)


def test_stat_policy_is_an_explicit_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.store import StoreError

    monkeypatch.setenv("LMCOMPOSE_VERIFY", "stat")
    store = LocalStore(tmp_path / "store")
    key = checkpoint_key("base", [{"method": "rot-stat"}])
    store.put_checkpoint(key, _folder(tmp_path), {})
    folder, _ = store.get_checkpoint(key)
    _flip_keeping_stat(folder / "config.json", offset=2)
    store.get_checkpoint(key)  # trusted by its stat: the documented trade-off of this policy
    monkeypatch.setenv("LMCOMPOSE_VERIFY", "sometimes")
    with pytest.raises(StoreError, match="allowed values are 'always' and 'stat'"):
        store.get_checkpoint(key)


def test_rotten_s3_cache_file_is_downloaded_again(s3_env, s3_uri: str, tmp_path: Path) -> None:
    from shared.store_s3 import S3Store

    store = S3Store(s3_uri, cache_dir=tmp_path / "cache")
    key = checkpoint_key("base", [{"method": "cache-rot"}])
    store.put_checkpoint(key, _folder(tmp_path), {})
    folder, _ = store.get_checkpoint(key)
    good = (folder / "model-00002-of-00002.safetensors").read_bytes()
    _flip_keeping_stat(folder / "model-00002-of-00002.safetensors")
    folder, _ = store.get_checkpoint(key)  # the bucket's copy is fine: the cache heals, nothing is quarantined
    assert (folder / "model-00002-of-00002.safetensors").read_bytes() == good
    assert store.has_checkpoint(key)


def test_corrupt_checkpoint_is_quarantined_so_it_is_recomputed(backend: Backend, tmp_path: Path) -> None:  # noqa: F811
    store = backend.store
    key = checkpoint_key("base", [{"method": "quarantine"}])
    store.put_checkpoint(key, _folder(tmp_path), {"first": True})
    data = bytearray((b"weights" * 1000)[::-1])
    data[3] ^= 0xFF
    backend.write_raw(key, "model-00002-of-00002.safetensors", bytes(data))
    reader = backend.fresh()
    with pytest.raises(CorruptCheckpoint, match=r"quarantined to .*re-run to recompute it"):
        reader.get_checkpoint(key)
    # no longer committed: `plan --store` shows the step as not done, and the next writer recomputes it
    assert not reader.has_checkpoint(key) and not store.has_checkpoint(key)
    store.put_checkpoint(key, _folder(tmp_path, name="again"), {"second": True})
    folder, manifest = backend.fresh().get_checkpoint(key)
    assert manifest["meta"] == {"second": True}
    assert (folder / "model-00002-of-00002.safetensors").read_bytes() == (b"weights" * 1000)[::-1]
    if isinstance(backend, S3Backend):
        quarantined = [k for k in backend.client.list_objects_v2(Bucket="lm-compose-test", Prefix=store.prefix + "/quarantine/")
                       .get("Contents", [])]
        assert len(quarantined) == 1
    else:
        (record,) = (store.root / "quarantine").iterdir()
        assert "does not match its sha256" in (record / "QUARANTINED.txt").read_text()


def test_one_runner_per_step(backend: Backend) -> None:  # noqa: F811
    """Two runners of one step at once: one computes, the other waits and reuses its result."""
    store = backend.store
    key = checkpoint_key("base", [{"method": "lease"}])
    computed = []
    result: dict[str, bool] = {}

    def compute() -> None:
        computed.append(threading.current_thread().name)
        time.sleep(1.5)
        store.put_json("results/lease.json", {"ok": True})

    def runner(name: str) -> None:
        result[name] = compute_once(backend.fresh(), key, lambda: store.has_json("results/lease.json"), compute,
                                    ttl_s=10, poll_s=0.2)

    threads = [threading.Thread(target=runner, args=(f"r{i}",), name=f"r{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(computed) == 1
    assert sorted(result.values()) == [False, True]
    assert store.lease_holder(lease_key(key)) is None  # released


def test_dead_holders_lease_expires_and_is_taken_over(backend: Backend) -> None:  # noqa: F811
    store = backend.store
    key = checkpoint_key("base", [{"method": "dead-holder"}])
    assert store.acquire_lease(lease_key(key), "killed-runner", ttl_s=1.0)  # never renewed, never released
    assert not store.acquire_lease(lease_key(key), "other", ttl_s=1.0)
    started = time.monotonic()
    done: list[int] = []
    assert compute_once(backend.fresh(), key, lambda: bool(done), lambda: done.append(1), ttl_s=5, poll_s=0.2)
    assert 0.5 < time.monotonic() - started < 10


def test_killed_writers_staging_folder_is_swept(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    staging = store.root / ".staging"
    old = staging / "write-killed"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "model.safetensors").write_bytes(b"half")
    fresh = staging / "write-running"
    fresh.mkdir()
    (fresh / "model.safetensors").write_bytes(b"in progress")
    past = time.time() - 2 * 86400
    for path in (old / "sub" / "model.safetensors", old / "sub", old):
        os.utime(path, (past, past))
    assert store.sweep_staging() == ["write-killed"]
    assert not old.exists() and fresh.exists()
    # opening a store and writing sweeps too
    for path in [fresh / "model.safetensors", fresh]:
        os.utime(path, (past, past))
    LocalStore(tmp_path / "store").scratch_parent()
    assert not fresh.exists()


def test_lease_of_a_killed_local_process_is_taken_over_at_once(tmp_path: Path) -> None:
    """A local run killed with -9 left its lease: the re-run does not wait out the TTL."""
    import socket
    import subprocess
    import sys

    store = LocalStore(tmp_path / "store")
    key = checkpoint_key("base", [{"method": "killed-local"}])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert store.acquire_lease(lease_key(key), f"{socket.gethostname()}:{dead.pid}:x", ttl_s=600)
    started = time.monotonic()
    done: list[int] = []
    assert compute_once(store, key, lambda: bool(done), lambda: done.append(1), ttl_s=600, poll_s=0.2)
    assert time.monotonic() - started < 5


def test_a_changed_digit_in_a_stored_result_is_not_trusted(backend: Backend) -> None:  # noqa: F811
    """Results are sealed with their digest: a flipped byte makes the document missing (so it is recomputed)."""
    store = backend.store
    store.put_json("results/r.json", {"criteria": {"edit_success": 0.7}})
    assert backend.fresh().get_json("results/r.json") == {"criteria": {"edit_success": 0.7}}
    raw = '{"_sha256": "%s", "criteria": {"edit_success": 0.9}}'
    from shared.store import canonical_json
    import hashlib

    digest = hashlib.sha256(canonical_json({"criteria": {"edit_success": 0.7}}).encode()).hexdigest()
    backend.write_raw("results", "r.json", (raw % digest).encode())  # 0.7 -> 0.9, digest of 0.7
    reader = backend.fresh()
    assert not reader.has_json("results/r.json")
    with pytest.raises(KeyError):
        reader.get_json("results/r.json")


def test_a_changed_parameter_in_a_manifest_uncommits_the_checkpoint(backend: Backend, tmp_path: Path) -> None:  # noqa: F811
    store = backend.store
    key = checkpoint_key("base", [{"method": "sealed-manifest"}])
    store.put_checkpoint(key, _folder(tmp_path), {"steps": [{"method": "wanda", "params": {"sparsity": 0.5}}]})
    if isinstance(backend, S3Backend):
        name = f"{store.prefix}/{key}/manifest.json"
        text = backend.client.get_object(Bucket="lm-compose-test", Key=name)["Body"].read().decode()
    else:
        text = (store.root / key / "manifest.json").read_text()
    backend.write_raw(key, "manifest.json", text.replace('"sparsity": 0.5', '"sparsity": 0.7').encode())
    reader = backend.fresh()
    assert not reader.has_checkpoint(key)  # the producing step recomputes it; nothing reads the changed value


def test_corrupt_parent_is_recomputed_by_the_step_that_needs_it(tmp_path: Path) -> None:
    """Quarantine and recompute in one run: the step reading a rotten parent makes the parent again first."""
    from shared.model_tasks import apply_to_model, prepare_base_model

    store_uri = str(tmp_path / "store")
    base, _ = prepare_base_model("builtin:tiny-random", store_uri)
    wanda_params = {"sparsity": 0.5, "num_calibration_samples": 4, "calibration_seq_len": 32}
    pruned, meta = apply_to_model(base, "wanda", wanda_params)
    store = LocalStore(tmp_path / "store")
    shard = next((store.root / pruned.key).glob("*.safetensors"))
    good = shard.read_bytes()
    _flip_keeping_stat(shard, offset=len(good) // 2)
    # the next step reads the parent: verification fails, the parent is quarantined and made again
    edited, _ = apply_to_model(pruned, "ft", {"steps": 1, "layers": [0]}, {"num_edits": 2})
    assert store.has_checkpoint(edited.key)
    assert next((store.root / pruned.key).glob("*.safetensors")).read_bytes() == good  # deterministic: same bytes
    assert len(list((store.root / "quarantine").iterdir())) == 1

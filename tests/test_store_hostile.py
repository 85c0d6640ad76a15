"""Stored data written by someone else must not reach outside the store, and a silent server must not hang us.

These are the security and liveness cases of the reliability issue: a
manifest in a bucket (or a local store) that lists absolute or ``..`` names,
and an endpoint that accepts TCP connections but never answers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shared.store import (
    CorruptCheckpoint,
    UnsafePath,
    checkpoint_key,
    contained_path,
    safe_relative_name,
    sha256_file,
)
from tests.test_store import _folder
from tests.test_store_s3 import Backend, S3Backend, backend  # noqa: F401 - the two-backend fixture

REPO = Path(__file__).resolve().parents[1]

HOSTILE_NAMES = [
    "/tmp/lmcompose-pwned",
    "../../lmcompose-pwned",
    "sub/../../lmcompose-pwned",
    "./config.json",
    "a//b",
    "C:/windows/x",
    "back\\slash",
    "nul\x00byte",
    "manifest.json",
    "",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_unsafe_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(UnsafePath):
        safe_relative_name(name)
    with pytest.raises(UnsafePath):
        contained_path(tmp_path, name)


def test_plain_names_pass_and_symlinks_out_are_refused(tmp_path: Path) -> None:
    assert contained_path(tmp_path, "sub/model-00001-of-00002.safetensors") == tmp_path / "sub/model-00001-of-00002.safetensors"
    (tmp_path / "out").symlink_to("/tmp")
    with pytest.raises(UnsafePath, match="resolves outside"):
        contained_path(tmp_path, "out/x")


@pytest.mark.parametrize("target", ["absolute", "dotdot"])
def test_hostile_manifest_writes_nothing_outside(backend: Backend, tmp_path: Path, target: str) -> None:  # noqa: F811
    """A manifest listing a path outside the reader's folder is refused before anything is downloaded."""
    store = backend.store
    key = checkpoint_key("base", [{"method": f"hostile-{target}"}])
    store.put_checkpoint(key, _folder(tmp_path), {})
    victim = tmp_path / "victim" / "bashrc"
    payload = b"echo owned\n"
    (tmp_path / "payload").write_bytes(payload)
    name = str(victim) if target == "absolute" else "../../../../../../../../.." + str(victim)
    manifest = {
        "format": "lm-compose-checkpoint/1",
        "key": key,
        "created": 0,
        "files": {name: {"size": len(payload), "sha256": sha256_file(tmp_path / "payload")}},
        "meta": {},
    }
    if isinstance(backend, S3Backend) and target == "absolute":  # the object an unchecked reader would fetch
        backend.write_raw(key, name, payload)
    backend.write_raw(key, "manifest.json", json.dumps(manifest).encode())
    reader = backend.fresh()
    assert not reader.has_checkpoint(key)
    with pytest.raises(CorruptCheckpoint, match="manifest entry"):
        reader.get_checkpoint(key)
    assert not victim.exists()
    assert not victim.parent.exists()


class SilentServer:
    """A TCP server that accepts connections and never sends a byte (a hung proxy, a wrong port)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.mark.slow
def test_silent_endpoint_fails_fast_with_the_endpoint_named(tmp_path: Path) -> None:
    """`lmcompose plan --store s3://...` against a server that never answers: a clear error in well under a minute."""
    server = SilentServer()
    endpoint = f"http://127.0.0.1:{server.port}"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test-secret-value",
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
        "LMCOMPOSE_CACHE": str(tmp_path / "cache"),
    }
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "plan", "pipelines/experiments/demo.yaml", "--store", "s3://bucket/prefix"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
    finally:
        server.close()
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 45, f"took {elapsed:.0f} s"
    last = proc.stderr.strip().splitlines()[-1]
    assert endpoint in last and "did not answer" in last, proc.stderr[-2000:]
    assert "test-secret-value" not in proc.stderr + proc.stdout


SECRET_URIS = ["s3://AKIAEXAMPLE:wJalrSECRETKEY@bucket/prefix", "s3://bucket/prefix?secret=wJalrSECRETKEY",
               "file://user:wJalrSECRETKEY@/tmp/store"]


@pytest.mark.parametrize("uri", SECRET_URIS)
def test_credentials_in_store_uris_are_refused_everywhere_and_never_echoed(uri: str, tmp_path: Path, capsys) -> None:
    """compile, plan and the spec refuse a URI with credentials, and no output repeats the secret."""
    import yaml

    from pipelines.cli import main
    from shared.store import StoreError, open_store

    with pytest.raises(StoreError) as err:
        open_store(uri)
    assert "wJalrSECRETKEY" not in str(err.value)
    spec = tmp_path / "spec.yaml"
    raw = yaml.safe_load((REPO / "pipelines/experiments/demo.yaml").read_text())
    spec.write_text(yaml.safe_dump(raw))
    for argv in (["compile", str(spec), "-o", str(tmp_path / "out"), "--store", uri],
                 ["plan", str(spec), "--store", uri]):
        assert main(argv) == 2
        out = capsys.readouterr()
        assert "must not carry credentials" in out.err or "must be plain" in out.err, out.err
        assert "wJalrSECRETKEY" not in out.out + out.err
    assert not any((tmp_path / "out").rglob("*.yaml")) if (tmp_path / "out").exists() else True
    spec.write_text(yaml.safe_dump({**raw, "store": uri}))
    assert main(["plan", str(spec)]) == 2
    out = capsys.readouterr()
    assert "store:" in out.err and "wJalrSECRETKEY" not in out.out + out.err

"""Fault injection: kill -9 at random points, flipped bytes in random store files, an S3 server stopped mid-run.

Each fault is followed by one re-run of the same small run (``tests/fault_run.py``,
the library entry points the pipeline's components call) which must finish
with results identical to an undisturbed run's -- and afterwards every
checkpoint and every result document in the store must verify, so nothing
was trusted that was not verified.  The outcome of a CI run is summarized in
docs/fault-injection.md.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2]

pytestmark = pytest.mark.slow


def _trace(stderr: str) -> str:
    """The traceback and warnings of a failed run, without its progress bars."""
    keep = [line for line in stderr.splitlines() if "it/s]" not in line and "%|" not in line]
    return "\n".join(keep[-60:])


def _run(store_uri: str, out: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.fault_run", store_uri, str(out)], cwd=REPO,
                          env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout)


def _verify_everything(store_uri: str, strict: bool = True) -> tuple[int, int]:
    """Read every checkpoint (files hashed) and every document (digest checked): (verified, quarantined now).

    ``strict=False`` tolerates corruption the last run had no reason to read
    (a resumed run does not re-read finished steps): such a checkpoint is
    quarantined by this read, exactly as a later run's read would.
    """
    from shared.store import CorruptCheckpoint, open_store

    store = open_store(store_uri)
    root = Path(store.root)  # local stores only
    verified = quarantined = 0
    keys = [f"ckpt/{m.parent.name}" for m in root.glob("ckpt/*/manifest.json")]
    keys += [f"cache/{m.parent.parent.name}/{m.parent.name}" for m in root.glob("cache/*/*/manifest.json")]
    for key in keys:
        if not store.has_checkpoint(key):  # manifest itself damaged: not committed, recomputed when needed
            assert not strict, f"{key} has a damaged manifest"
            quarantined += 1
            continue
        try:
            store.get_checkpoint(key)
            verified += 1
        except CorruptCheckpoint:
            assert not strict, f"{key} does not verify"
            quarantined += 1
    for doc in [*root.glob("results/*.json"), *root.glob("alias/*.json")]:
        key = doc.relative_to(root).as_posix()
        if store.has_json(key):
            verified += 1
        else:
            assert not strict, f"{key} does not verify"
            quarantined += 1
    return verified, quarantined


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An undisturbed run: its results, its store (copied by the byte-flip cases) and its duration."""
    root = tmp_path_factory.mktemp("reference")
    started = time.monotonic()
    proc = _run(str(root / "store"), root / "out.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"result": json.loads((root / "out.json").read_text()), "store": root / "store",
            "seconds": time.monotonic() - started}


@pytest.mark.parametrize("seed", SEEDS)
def test_kill_9_at_a_random_point_then_rerun(reference: dict, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store = tmp_path / "store"
    delay = rng.uniform(2.0, reference["seconds"] * 0.6)
    proc = subprocess.Popen([sys.executable, "-m", "tests.fault_run", str(store), str(tmp_path / "killed.json")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.json").exists()  # it really was killed before the end
    rerun = _run(str(store), tmp_path / "out.json")
    assert rerun.returncode == 0, _trace(rerun.stderr)
    assert json.loads((tmp_path / "out.json").read_text()) == reference["result"]
    verified, _ = _verify_everything(str(store))
    assert verified >= 8
    print(f"FAULT kill -9 seed={seed} after {delay:.1f} s: re-run identical, {verified} objects verified")


@pytest.mark.parametrize("seed", SEEDS)
def test_flipped_bytes_in_random_store_files_then_rerun(reference: dict, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store = tmp_path / "store"
    shutil.copytree(reference["store"], store)
    candidates = sorted(p for p in store.rglob("*") if p.is_file() and not p.name.startswith(".")
                        and p.relative_to(store).parts[0] in ("ckpt", "cache", "results", "alias"))
    flipped = rng.sample(candidates, 4)
    for path in flipped:
        st = path.stat()
        data = bytearray(path.read_bytes())
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the content tells
    names = [str(p.relative_to(store)) for p in flipped]
    # results of untouched models would let the re-run skip reading them: remove them, so that the
    # evaluations read (and verify) every evaluated checkpoint, and corrupt ones are remade in the run
    for doc in (store / "results").glob("*.json"):
        if doc not in flipped:
            doc.unlink()
    rerun = _run(str(store), tmp_path / "out.json")
    assert rerun.returncode == 0, f"flipped {names}\n" + _trace(rerun.stderr)
    assert json.loads((tmp_path / "out.json").read_text()) == reference["result"], names
    # what the re-run did not need to read (finished steps are not re-read) is caught by the next read ...
    _verified, caught = _verify_everything(str(store), strict=False)
    # ... and recomputed by the run after it; then everything verifies
    rerun = _run(str(store), tmp_path / "out2.json")
    assert rerun.returncode == 0, f"flipped {names}, {caught} caught later\n" + _trace(rerun.stderr)
    assert json.loads((tmp_path / "out2.json").read_text()) == reference["result"], names
    verified, quarantined = _verify_everything(str(store))
    assert verified >= 8 and quarantined == 0
    print(f"FAULT flipped bits seed={seed} in {names}: re-run identical; {caught} unread corrupt object(s) "
          f"caught by the next read and recomputed; {verified} objects verified")


def test_s3_server_stopped_mid_run_then_restarted(reference: dict, tmp_path: Path) -> None:
    from tests.s3server import SeaweedS3

    server = SeaweedS3(tmp_path / "weed", bucket="faults").start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(server.env(), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   LMCOMPOSE_CACHE=str(tmp_path / "cache"), LMCOMPOSE_S3_MAX_ATTEMPTS="3")
        uri = "s3://faults/run"
        proc = subprocess.Popen([sys.executable, "-m", "tests.fault_run", uri, str(tmp_path / "broken.json")],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(reference["seconds"] * 0.5)
        port = server.s3_port
        server.stop()  # mid-run: the run fails with a store error naming the endpoint
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0 and "S3" in err, err[-2000:]
        server = SeaweedS3(tmp_path / "weed", bucket="faults", s3_port=port).start()  # same data, same port
        rerun = _run(uri, tmp_path / "out.json", env)
        assert rerun.returncode == 0, _trace(rerun.stderr)
        assert json.loads((tmp_path / "out.json").read_text()) == reference["result"]
        error = next((line for line in reversed(err.splitlines()) if "StoreError" in line), err.splitlines()[-1])
        print(f"FAULT S3 server stopped after {reference['seconds'] * 0.5:.1f} s: run failed with {error[:200]!r}; "
              "after a restart the re-run was identical")
    finally:
        server.stop()

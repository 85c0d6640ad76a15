"""S3Store throughput vs plain boto3, against a local SeaweedFS server (or any endpoint).

What it measures: the end-to-end cost of the store's guarantees.  S3Store's
upload hashes every byte while streaming it and writes the manifest last; its
download verifies every byte against the manifest.  Plain boto3
``upload_file``/``download_file`` does neither.  The ratio
``boto3 time / S3Store time`` (target >= 0.8) says how much of the raw transfer
speed survives.

    python benchmarks/s3_throughput.py                 # starts its own SeaweedFS, 2 x 256 MiB shards
    python benchmarks/s3_throughput.py --shard-mb 1024 --shards 4
    python benchmarks/s3_throughput.py --external s3://bucket/bench   # uses AWS_* env as S3Store does

Each measurement is repeated ``--repeat`` times; the best time is reported
(the minimum is the least noisy estimate on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from boto3.s3.transfer import TransferConfig  # noqa: E402

from shared.store_s3 import S3Store, default_transfer_config  # noqa: E402


def make_checkpoint(folder: Path, shards: int, shard_mb: int) -> int:
    """Safetensors-like folder: ``shards`` random shards plus a config and an index."""
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 << 20)
    total = 0
    for i in range(1, shards + 1):
        path = folder / f"model-{i:05d}-of-{shards:05d}.safetensors"
        with open(path, "wb") as fh:
            for _ in range(shard_mb // 16):
                fh.write(os.urandom(16) + block[16:])  # distinct per block, cheap to generate
        total += path.stat().st_size
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "model.safetensors.index.json").write_text("{}")
    return total


def run(uri: str, work: Path, shards: int, shard_mb: int, repeat: int) -> int:
    src = work / "src"
    total = make_checkpoint(src, shards, shard_mb)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    probe = S3Store(uri, cache_dir=work / "probe-cache", create_bucket=True)
    client = probe._client  # same endpoint, credentials and retry config as the store
    bucket, prefix = probe.bucket, probe.prefix
    tuned = default_transfer_config()
    base = f"{prefix}/plain" if prefix else "plain"

    def store_up(run_id: str) -> Callable[[], None]:
        store = S3Store(uri, cache_dir=work / "cache-up")  # constructed outside the timed call, like the client
        return lambda: store.put_checkpoint(f"ckpt/bench-{run_id}", src, {"bench": True}) and None

    def store_down(run_id: str) -> Callable[[], None]:
        store = S3Store(uri, cache_dir=work / f"cache-{run_id}")
        return lambda: store.get_checkpoint(f"ckpt/bench-{run_id}") and None

    def boto_up(run_id: str, config: TransferConfig | None) -> Callable[[], None]:
        kwargs = {"Config": config} if config is not None else {}

        def up() -> None:
            for path in files:
                client.upload_file(str(path), bucket, f"{base}-{run_id}/{path.relative_to(src).as_posix()}", **kwargs)

        return up

    def boto_down(run_id: str, config: TransferConfig | None) -> Callable[[], None]:
        kwargs = {"Config": config} if config is not None else {}
        dest = work / f"plain-{run_id}"

        def down() -> None:
            for path in files:
                target = dest / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, f"{base}-{run_id}/{path.relative_to(src).as_posix()}", str(target), **kwargs)

        return down

    cases: list[tuple[str, Callable[[str], Callable[[], None]], Callable[[str], Callable[[], None]]]] = [
        ("boto3 upload_file/download_file (default config)", lambda r: boto_up(r, None), lambda r: boto_down(r, None)),
        ("boto3 upload_file/download_file (S3Store's config)", lambda r: boto_up(r, tuned), lambda r: boto_down(r, tuned)),
        ("S3Store put_checkpoint/get_checkpoint (hash+verify)", store_up, store_down),
    ]
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _u, _d in cases}
    client.put_object(Bucket=bucket, Key=f"{base}-warmup", Body=b"x")  # connection setup is not timed
    # interleaved rounds (A B C, A B C, ...): load from other processes on a shared machine hits every method alike
    for _round in range(repeat):
        for name, make_up, make_down in cases:
            run_id = uuid.uuid4().hex[:12]
            for slot, make in enumerate((make_up, make_down)):
                fn = make(run_id)
                start = time.perf_counter()
                fn()
                times[name][slot].append(time.perf_counter() - start)
            for leftover in work.glob(f"*-{run_id}"):
                shutil.rmtree(leftover)
    rows = [(name, min(ups), min(downs), ups, downs) for name, (ups, downs) in times.items()]

    mb = total / 1e6
    print(f"\ncheckpoint: {len(files)} files, {shards} x {shard_mb} MiB shards = {mb:.0f} MB; best of {repeat}")
    print(f"endpoint: {probe.endpoint_url or 'AWS S3'}  store: {uri}")
    print(f"S3Store transfer config: part {tuned.multipart_chunksize >> 20} MiB, "
          f"threshold {tuned.multipart_threshold >> 20} MiB, concurrency {tuned.max_request_concurrency}\n")
    print(f"| {'method':<52} | upload s | upload MB/s | download s | download MB/s |")
    print(f"|{'-' * 54}|---------:|-----------:|-----------:|-------------:|")
    for name, up, down, _ua, _da in rows:
        print(f"| {name:<52} | {up:8.2f} | {mb / up:10.0f} | {down:10.2f} | {mb / down:12.0f} |")
    store_up, store_down = rows[-1][1], rows[-1][2]
    best_up = min(r[1] for r in rows[:-1])
    best_down = min(r[2] for r in rows[:-1])
    print(f"\nratio (best plain boto3 time / S3Store time; 1.0 = no overhead, target >= 0.8): "
          f"upload {best_up / store_up:.2f}, download {best_down / store_down:.2f}, "
          f"round trip {(best_up + best_down) / (store_up + store_down):.2f}")
    print("all runs (s): " + "; ".join(
        f"{name.split(' (')[0]}: up {[round(t, 2) for t in ua]} down {[round(t, 2) for t in da]}"
        for name, _u, _d, ua, da in rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--shard-mb", type=int, default=256, help="MiB per shard (multiple of 16)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--external", metavar="S3_URI", help="benchmark an existing endpoint instead of a local SeaweedFS")
    parser.add_argument("--workdir", help="where to write the checkpoint and downloads (default: a temp folder)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lmc-s3bench-", dir=args.workdir))
    try:
        if args.external:
            return run(args.external, work, args.shards, args.shard_mb, args.repeat)
        from tests.s3server import SeaweedS3

        with SeaweedS3(work / "server", bucket="lm-compose-bench") as server:
            os.environ.update(server.env())
            return run("s3://lm-compose-bench/bench", work, args.shards, args.shard_mb, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

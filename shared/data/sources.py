"""Where a data field's content comes from: built-in pack, local file, S3 object or lm-eval tasks.

A data field of an experiment spec (``data.forget_corpus`` ...) is one of

* ``builtin`` -- the pack shipped in ``shared/data/builtin/`` (the default);
* a local path to a JSON-lines file of the field's format;
* ``s3://bucket/key`` -- a JSON-lines object in S3-compatible storage.  This is
  how gated data reaches a cluster (the WMDP bio forget corpus is only handed
  out on request): the user uploads it once, and each step downloads it into
  the local cache (``$LMCOMPOSE_CACHE/data``), keyed by the object's ETag, so
  a second step on the same node reads it from disk.  Endpoint and
  credentials come from the environment, as for the checkpoint store;
* ``lm-eval:task[,task...]`` -- only for the 4-choice fields (``utility_mcq``,
  ``forget_mcq``): tasks of lm-evaluation-harness run by name, e.g.
  ``lm-eval:wmdp_bio,wmdp_cyber`` (the criterion is the mean of the tasks'
  accuracies, as the paper averaged WMDP bio and cyber) or ``lm-eval:mmlu``.
  The harness downloads these from the Hugging Face hub, so they belong to
  cluster configurations; the default path never uses them.

Why a download cache keyed by ETag rather than reading S3 on every access:
the content digest of every data input keys the store's cached results, so
the file is read several times per step.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

HARNESS_PREFIX = "lm-eval:"
_TASK_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class SourceError(ValueError):
    """A data source that cannot be used (bad syntax, missing object, no access)."""


def is_s3(source: str) -> bool:
    return source.startswith("s3://")


def is_harness(source: str) -> bool:
    return source.startswith(HARNESS_PREFIX)


def harness_tasks(source: str) -> list[str]:
    """The task names of an ``lm-eval:a,b`` source, validated (letters, digits, ``_ . -``; no repeats)."""
    names = [n.strip() for n in source[len(HARNESS_PREFIX):].split(",")]
    if not names or any(not n for n in names):
        raise SourceError(f"{source!r}: expected lm-eval:task[,task...], e.g. lm-eval:wmdp_bio,wmdp_cyber")
    bad = [n for n in names if not _TASK_NAME.fullmatch(n)]
    if bad:
        raise SourceError(f"{source!r}: invalid lm-eval task name(s) {', '.join(map(repr, bad))}")
    if len(set(names)) != len(names):
        raise SourceError(f"{source!r}: a task is named twice")
    return names


def cache_root() -> Path:
    """Root of the downloaded data (``$LMCOMPOSE_CACHE/data``, default ``~/.cache/lm-compose/data``)."""
    base = os.environ.get("LMCOMPOSE_CACHE") or str(Path.home() / ".cache" / "lm-compose")
    return Path(base).expanduser() / "data"


def fetch_s3(uri: str, cache_dir: Path | None = None) -> Path:
    """Local copy of the S3 object ``uri``, downloaded unless the cached copy has its current ETag.

    The copy lives at ``<cache>/<sha256(uri)[:16]>/<etag>/<file name>``: a new
    version of the object (new ETag) gets a new folder, and a download is
    renamed into place only when complete (see ``S3Store.download_object``).
    """
    from shared.store import CheckpointNotFound, StoreError
    from shared.store_s3 import S3Store, parse_s3_uri

    try:
        bucket, key = parse_s3_uri(uri)
    except StoreError as exc:
        raise SourceError(str(exc)) from None
    if not key or key.endswith("/"):
        raise SourceError(f"{uri!r} names a prefix, not an object (expected s3://bucket/path/file.jsonl)")
    store = S3Store(f"s3://{bucket}")
    try:
        version = store.object_version(key)
        if version is None:
            raise SourceError(f"{uri} does not exist (check the bucket and key)")
        size, etag = version
        folder = (cache_dir or cache_root()) / hashlib.sha256(uri.encode()).hexdigest()[:16]
        dest = folder / re.sub(r"[^A-Za-z0-9]", "_", etag or "none") / Path(key).name
        if dest.is_file() and dest.stat().st_size == size:
            return dest
        store.download_object(key, dest)
    except CheckpointNotFound:
        raise SourceError(f"{uri} does not exist (check the bucket and key)") from None
    except StoreError as exc:
        raise SourceError(f"cannot read {uri}: {exc}") from None
    return dest

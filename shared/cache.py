"""Caches of expensive derived tensors (calibration statistics, covariances) in the store.

Keyed by the *content digest* of the model they were computed on
(:func:`shared.models.model_digest`) plus the computation's configuration --
never by the model's name: the reference code reused MEMIT covariance
statistics of one model state for another (compressed, unlearned) one.  Entries
are ordinary store checkpoints (safetensors + manifest written last), so they
are verified on read and a half-written entry is never used.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shared.store import CorruptCheckpoint, Store, digest_of

log = logging.getLogger(__name__)
_FILE = "tensors.safetensors"


def cache_key(name: str, model_digest: str, config: dict[str, Any]) -> str:
    """Store key of one cache entry."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"cache name {name!r} must be alphanumeric (dashes/underscores allowed)")
    return f"cache/{name}/" + digest_of({"model": model_digest, "config": config})[:40]


def cached_tensors(
    store: Store,
    name: str,
    model_digest: str,
    config: dict[str, Any],
    compute: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Return the tensors cached for (``name``, model content, ``config``), computing and storing them on a miss."""
    from safetensors.torch import load_file, save_file

    key = cache_key(name, model_digest, config)
    if store.has_checkpoint(key):
        try:
            folder, _ = store.get_checkpoint(key)
            log.info("cache hit %s", key)
            return load_file(str(Path(folder) / _FILE))
        except CorruptCheckpoint as exc:  # quarantined by the store: recompute the entry now
            log.warning("cache entry %s was corrupt (%s); recomputing", key, exc)
    log.info("cache miss %s; computing", key)
    tensors = {k: v.detach().contiguous().cpu() for k, v in compute().items()}
    from shared.finite import check_finite_tensors

    check_finite_tensors(tensors, f"cache {name} of model {model_digest[:12]} (config {config})", "nothing cached")
    with tempfile.TemporaryDirectory(dir=store.scratch_parent(), prefix="cache-") as tmp:
        save_file(tensors, str(Path(tmp) / _FILE))
        store.put_checkpoint(key, Path(tmp), {"cache": name, "model_digest": model_digest, "config": config})
    return tensors

"""Content-keyed caches in the store: hit for the same model content, miss after the model changes."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from shared.cache import cache_key, cached_tensors
from shared.models import load_model, model_digest
from shared.store import LocalStore


def _stats(model) -> dict[str, torch.Tensor]:
    """A stand-in statistic: the Gram matrix of the first down-projection's weight."""
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    return {"gram": w.T @ w}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("s3_env")
    from shared.store_s3 import S3Store
    from tests.conftest import BUCKET

    return S3Store(f"s3://{BUCKET}/cache-{uuid.uuid4().hex[:8]}", cache_dir=tmp_path / "dl")


def test_cache_hits_for_same_content_and_misses_after_a_change(store, tiny_dir: Path):
    model, _ = load_model(tiny_dir)
    calls = []

    def compute():
        calls.append(1)
        return _stats(model)

    digest = model_digest(model)
    first = cached_tensors(store, "gram", digest, {"layer": 0}, compute)
    again = cached_tensors(store, "gram", digest, {"layer": 0}, compute)
    assert len(calls) == 1 and torch.equal(first["gram"], again["gram"])

    # a reloaded copy of the same weights has the same content digest: still a hit
    model2, _ = load_model(tiny_dir)
    assert model_digest(model2) == digest
    cached_tensors(store, "gram", model_digest(model2), {"layer": 0}, compute)
    assert len(calls) == 1

    # prune one weight (a new model state with the same name): a miss, and new statistics
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 0.0
    changed = cached_tensors(store, "gram", model_digest(model), {"layer": 0}, compute)
    assert len(calls) == 2
    assert not torch.equal(changed["gram"], first["gram"])
    # a different configuration is a different entry too
    cached_tensors(store, "gram", digest, {"layer": 1}, compute)
    assert len(calls) == 3


def test_cache_names_are_checked():
    with pytest.raises(ValueError, match="alphanumeric"):
        cache_key("../x", "d", {})

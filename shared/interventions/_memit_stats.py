"""MEMIT's key statistics: the second moment ``C = E[k kᵀ]`` of the inputs of MLP down-projections.

MEMIT (Meng et al., 2023) protects what a layer already stores by weighting
its update with the uncentered covariance of the layer's *keys* -- the vectors
entering the MLP's output projection (``down_proj`` in Llama) -- measured on
generic text.  Computing ``C`` needs a forward pass over a text corpus, so it
is cached; and since ``C`` belongs to one exact set of weights (a pruned or
unlearned model has different keys), the cache is keyed by the *content
digest* of the model it was measured on (:func:`shared.models.model_digest`),
never by the model's name.  The reference code keyed its statistics files by
model name, so a compressed or edited model silently reused the base model's
statistics.

Two pieces:

* :func:`key_second_moments` -- the computation: one pass over fixed-length
  windows of a corpus (see :func:`~shared.interventions._calibration.calibration_windows`),
  stopping after the deepest requested layer, accumulating ``Σ k kᵀ`` in float64;
* :func:`model_tensor_cache` -- binds a store to a model's content digest and
  gives the ``cache(name, config, compute)`` callable that
  :meth:`MEMIT.apply <shared.interventions.memit.MEMIT.apply>` takes (the
  executor binds the same thing); :func:`cached_key_second_moments` uses such a
  callable with one entry per layer, so a later run with an overlapping layer
  range reuses what is there and computes the rest in one pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

#: a tensor cache: ``cache(name, config, compute) -> tensors`` (compute is called on a miss only)
TensorCache = Callable[[str, dict[str, Any], Callable[[], dict[str, torch.Tensor]]], dict[str, torch.Tensor]]

#: name of the cache entries (one per layer)
COV_CACHE_NAME = "memit-key-cov"
#: bump when the statistic's definition changes (part of every entry's config)
COV_VERSION = 1


class _StopForward(Exception):
    """Raised by a hook after the deepest layer of interest: the rest of the network is not needed."""


def model_tensor_cache(store: Any, model: Any) -> TensorCache:
    """A ``cache(name, config, compute)`` callable backed by ``store`` and keyed by ``model``'s content.

    The digest is taken *now*, so bind the cache before the model is modified
    (statistics describe the model an intervention starts from).  This is what
    the executor passes as ``cache=`` to interventions with
    ``uses_tensor_cache``.
    """
    from shared.cache import cached_tensors
    from shared.models import model_digest

    digest = model_digest(model)

    def cache(name: str, config: dict[str, Any], compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return cached_tensors(store, name, digest, config, compute)

    cache.model_digest = digest  # type: ignore[attr-defined]
    return cache


def windows_digest(windows: Sequence[Sequence[int]]) -> str:
    """Digest of the exact token windows a statistic is measured on (corpus, tokenizer and cut in one)."""
    return hashlib.sha256(json.dumps([list(w) for w in windows]).encode()).hexdigest()


@torch.no_grad()
def key_second_moments(
    model: Any, windows: Sequence[Sequence[int]], layers: Sequence[int], batch_size: int = 4
) -> tuple[dict[int, torch.Tensor], int]:
    """``E[k kᵀ]`` of the down_proj inputs of ``layers`` over every token of ``windows``.

    Returns ``({layer: C (float32, d_in x d_in)}, token count)``.  Sums are
    accumulated in float64; the forward pass stops after ``max(layers)``.
    Windows are batched by equal length (all but possibly the last have the
    same length), so no padding token ever enters the statistic.
    """
    if not windows:
        raise ValueError("no windows to measure key statistics on")
    blocks = model.model.layers
    layers = sorted(set(layers))
    device = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    hooks = []

    def pre_hook(layer: int) -> Callable[..., None]:
        def fn(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            k = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = (k.T @ k).double()
            sums[layer] = s if layer not in sums else sums[layer] + s

        return fn

    def stop(_module: Any, _args: Any, _output: Any) -> None:
        raise _StopForward

    for i in layers:
        hooks.append(blocks[i].mlp.down_proj.register_forward_pre_hook(pre_hook(i)))
    hooks.append(blocks[layers[-1]].register_forward_hook(stop))
    count = 0
    was_training = model.training
    model.eval()
    try:
        by_len: dict[int, list[Sequence[int]]] = {}
        for w in windows:
            by_len.setdefault(len(w), []).append(w)
        for length, group in sorted(by_len.items()):
            for start in range(0, len(group), batch_size):
                ids = torch.tensor([list(w) for w in group[start : start + batch_size]], dtype=torch.long, device=device)
                try:
                    model.model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
                count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {i: (sums[i] / count).float() for i in layers}, count


def cached_key_second_moments(
    model: Any,
    windows: Sequence[Sequence[int]],
    layers: Sequence[int],
    corpus: str,
    cache: TensorCache | None = None,
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Per-layer ``E[k kᵀ]``, through ``cache`` when given (one entry per layer).

    Each entry's config names the layer, the corpus and the digest of the token
    windows; the cache adds the model's content digest.  On the first miss all
    layers not yet returned are computed in one pass and kept for the
    following lookups, so a full miss costs one forward pass and a partial hit
    recomputes only from the first missing layer on.  Returns the matrices and
    an info dict (tokens, seconds, which layers were computed).
    """
    layers = sorted(set(layers))
    base = {
        "statistic": "mlp.down_proj input second moment E[k k^T]",
        "version": COV_VERSION,
        "corpus": corpus,
        "windows": windows_digest(windows),
        "num_windows": len(windows),
        "num_tokens": sum(len(w) for w in windows),
    }
    computed: dict[int, torch.Tensor] = {}
    info: dict[str, Any] = {"computed_layers": [], "compute_seconds": 0.0, "tokens": base["num_tokens"]}

    def compute(layer: int) -> Callable[[], dict[str, torch.Tensor]]:
        def fn() -> dict[str, torch.Tensor]:
            if layer not in computed:
                todo = [i for i in layers if i >= layer and i not in computed]
                start = time.perf_counter()
                covs, count = key_second_moments(model, windows, todo)
                info["compute_seconds"] += time.perf_counter() - start
                log.info("memit: key statistics of layers %s on %d tokens in %.1fs", todo, count, time.perf_counter() - start)
                computed.update(covs)
            info["computed_layers"].append(layer)
            return {"cov": computed[layer], "count": torch.tensor(base["num_tokens"], dtype=torch.long)}

        return fn

    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        config = {**base, "layer": layer, "module": f"model.layers.{layer}.mlp.down_proj"}
        tensors = compute(layer)() if cache is None else cache(COV_CACHE_NAME, config, compute(layer))
        out[layer] = tensors["cov"].float()
    info["compute_seconds"] = round(info["compute_seconds"], 2)
    info["cache_hit"] = not info["computed_layers"]
    return out, info

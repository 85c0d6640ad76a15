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
#: bump when the statistic's definition changes (part of every entry's config);
#: 2: entries also hold the split-half stability figure (:func:`split_half_stability`)
COV_VERSION = 2
#: relative ridge of the stability figure's solves: ROME's ``cov_ridge`` default
STABILITY_RIDGE = 1e-6


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


class KeySums:
    """Running sums of one layer's keys, split by window parity into two interleaved halves.

    ``sums[h]`` is ``Σ k kᵀ`` (float64) over the windows with index parity
    ``h`` (``counts[h]`` tokens); ``fourth`` is ``Σ ‖k‖⁴`` over all tokens (the
    Ledoit-Wolf intensity needs it); ``probes[h]`` are the keys of the last
    token of each window of half ``h``.  The full statistic is the sum of the
    halves; the split and the probes give :func:`split_half_stability` without
    another pass.
    """

    def __init__(self) -> None:
        self.sums: list[torch.Tensor | None] = [None, None]
        self.counts = [0, 0]
        self.fourth = 0.0
        self.probes: list[list[torch.Tensor]] = [[], []]

    def add(self, keys: torch.Tensor, first_window: int) -> None:
        """Add a batch of windows ``keys`` (b, L, d) whose first window has index ``first_window``."""
        k = keys.detach().float()
        self.fourth += float((k.pow(2).sum(-1).double() ** 2).sum())
        for h in (0, 1):
            rows = [r for r in range(k.shape[0]) if (first_window + r) % 2 == h]
            if not rows:
                continue
            part = k[rows]
            flat = part.reshape(-1, part.shape[-1])
            s = (flat.T @ flat).double()
            self.sums[h] = s if self.sums[h] is None else self.sums[h] + s
            self.counts[h] += flat.shape[0]
            self.probes[h].append(part[:, -1, :].double().cpu())

    @property
    def count(self) -> int:
        return self.counts[0] + self.counts[1]

    def total(self) -> torch.Tensor:
        """``Σ k kᵀ`` over every token (float64)."""
        present = [s for s in self.sums if s is not None]
        return present[0] if len(present) == 1 else present[0] + present[1]

    def second_moment(self) -> torch.Tensor:
        return self.total() / self.count

    def stability(self, ridge: float = STABILITY_RIDGE) -> float:
        """:func:`split_half_stability` of these sums (nan with fewer than two windows)."""
        if self.sums[1] is None:
            return float("nan")
        return split_half_stability(self.sums, self.counts, [torch.cat(p) for p in self.probes], ridge)


def ridge_solve(cov: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(C + ridge·mean(diag C)·I)⁻¹ rhs`` in float64 -- ROME's guarded ``C⁻¹ k``."""
    c = cov.double()
    if ridge:
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.solve(c, rhs.double().to(c.device))


def split_half_stability(
    sums: Sequence[torch.Tensor], counts: Sequence[int], probes: Sequence[torch.Tensor], ridge: float = STABILITY_RIDGE
) -> float:
    """How well ``C⁻¹ k`` is determined: the mean cosine of ``C_A⁻¹ p`` and ``C_B⁻¹ p`` over probe keys ``p``.

    ``C_A`` and ``C_B`` are the second moments of the two interleaved halves of
    the windows (even / odd window index: ``sums`` and ``counts``); the probes
    are the keys of every window's last token -- positions with a long
    context, like an edit's subject token.  A probe's own term in its half
    only rescales ``C⁻¹ p`` (Sherman-Morrison), so using keys of the sample
    does not bias the cosine.  1.0 means both halves give the same edit
    direction.  It compares two independent estimates of half the tokens
    each, so the full estimate is closer to its limit than this says
    (docs/editing.md, "Key statistics").  ``ridge``: ROME's relative ridge.
    """
    p = torch.cat([x.double() for x in probes]).T
    ua = ridge_solve(sums[0] / counts[0], p.to(sums[0].device), ridge)
    ub = ridge_solve(sums[1] / counts[1], p.to(sums[1].device), ridge)
    return float(torch.nn.functional.cosine_similarity(ua, ub, dim=0).mean())


def ledoit_wolf_intensity(second: torch.Tensor, count: int, fourth: float) -> float:
    """Ledoit-Wolf (2004) shrinkage intensity of a second-moment estimate towards ``μI`` (``μ = tr C / d``).

    ``second``: ``S = Σ k kᵀ / n`` over ``count`` samples; ``fourth``: ``Σ ‖k‖⁴``.
    With ``δ² = ‖S − μI‖²_F`` and ``β̄² = Σᵢ ‖kᵢkᵢᵀ − S‖²_F / n² = (Σ‖k‖⁴ − n‖S‖²_F) / n²``
    the intensity is ``min(β̄², δ²) / δ²`` (the closed form of sklearn's
    ``ledoit_wolf`` for an uncentered second moment).  Tokens are treated as
    independent samples.
    """
    s = second.double()
    d = s.shape[0]
    mu = float(s.diagonal().sum()) / d
    frob = float((s * s).sum())
    delta2 = frob - 2 * mu * float(s.diagonal().sum()) + mu * mu * d
    beta2 = max(0.0, (fourth - count * frob) / (count * count))
    if delta2 <= 0:
        return 1.0
    return min(beta2, delta2) / delta2


def shrink(second: torch.Tensor, intensity: float) -> torch.Tensor:
    """``(1 − ρ) S + ρ μ I`` with ``μ = tr S / d``."""
    s = second.double()
    mu = s.diagonal().mean()
    return (1 - intensity) * s + intensity * mu * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)


@torch.no_grad()
def key_moment_sums(
    model: Any, windows: Sequence[Sequence[int]], layers: Sequence[int], batch_size: int = 4,
    on_batch: Callable[[int, dict[int, KeySums]], None] | None = None,
) -> dict[int, KeySums]:
    """One pass over ``windows``: the :class:`KeySums` of the down_proj inputs of ``layers``.

    The forward pass stops after ``max(layers)``.  Windows are batched by equal
    length in their order (all but possibly the last have the same length), so
    no padding token ever enters the statistic.  ``on_batch(windows done,
    sums)`` is called after every batch (the convergence benchmark snapshots
    the sums there).
    """
    if not windows:
        raise ValueError("no windows to measure key statistics on")
    blocks = model.model.layers
    layers = sorted(set(layers))
    device = next(model.parameters()).device
    acc = {i: KeySums() for i in layers}
    hooks = []
    position = [0]

    def pre_hook(layer: int) -> Callable[..., None]:
        def fn(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            acc[layer].add(args[0], position[0])

        return fn

    def stop(_module: Any, _args: Any, _output: Any) -> None:
        raise _StopForward

    for i in layers:
        hooks.append(blocks[i].mlp.down_proj.register_forward_pre_hook(pre_hook(i)))
    hooks.append(blocks[layers[-1]].register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(windows):
            end = start + 1
            while end < len(windows) and end - start < batch_size and len(windows[end]) == len(windows[start]):
                end += 1
            ids = torch.tensor([list(w) for w in windows[start:end]], dtype=torch.long, device=device)
            position[0] = start
            try:
                model.model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            start = end
            if on_batch is not None:
                on_batch(end, acc)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return acc


def key_second_moments(
    model: Any, windows: Sequence[Sequence[int]], layers: Sequence[int], batch_size: int = 4
) -> tuple[dict[int, torch.Tensor], int]:
    """``E[k kᵀ]`` of the down_proj inputs of ``layers`` over every token of ``windows``.

    Returns ``({layer: C (float32, d_in x d_in)}, token count)``; sums in float64
    (:func:`key_moment_sums`).
    """
    acc = key_moment_sums(model, windows, layers, batch_size)
    count = next(iter(acc.values())).count
    return {i: a.second_moment().float() for i, a in acc.items()}, count


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
    an info dict: tokens and windows (the sample count), seconds, which layers
    were computed, and per layer the split-half ``stability`` of ``C⁻¹ k``
    (:func:`split_half_stability`, cached with the matrix; nan for a single window).
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
    computed: dict[int, dict[str, torch.Tensor]] = {}
    info: dict[str, Any] = {
        "computed_layers": [],
        "compute_seconds": 0.0,
        "tokens": base["num_tokens"],
        "windows": base["num_windows"],
        "stability": {},
    }

    def compute(layer: int) -> Callable[[], dict[str, torch.Tensor]]:
        def fn() -> dict[str, torch.Tensor]:
            if layer not in computed:
                todo = [i for i in layers if i >= layer and i not in computed]
                start = time.perf_counter()
                acc = key_moment_sums(model, windows, todo)
                for i, a in acc.items():
                    computed[i] = {
                        "cov": a.second_moment().float(),
                        "count": torch.tensor(a.count, dtype=torch.long),
                        "stability": torch.tensor(a.stability(), dtype=torch.float64),
                        "fourth_moment_sum": torch.tensor(a.fourth, dtype=torch.float64),
                    }
                info["compute_seconds"] += time.perf_counter() - start
                log.info("memit: key statistics of layers %s on %d tokens in %.1fs", todo, base["num_tokens"], time.perf_counter() - start)
            info["computed_layers"].append(layer)
            return computed[layer]

        return fn

    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        config = {**base, "layer": layer, "module": f"model.layers.{layer}.mlp.down_proj"}
        tensors = compute(layer)() if cache is None else cache(COV_CACHE_NAME, config, compute(layer))
        out[layer] = tensors["cov"].float()
        info["stability"][layer] = float(tensors["stability"])
    info["compute_seconds"] = round(info["compute_seconds"], 2)
    info["cache_hit"] = not info["computed_layers"]
    return out, info

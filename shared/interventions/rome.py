"""ROME -- Rank-One Model Editing (Meng et al., NeurIPS 2022).

ROME writes one fact into one MLP output projection as a rank-one update.
With the key ``k*`` (the ``down_proj`` input at the subject's last token), the
value ``v*`` that makes the model produce the new object (found by the same
target optimization as MEMIT's stage 1, at the edited layer itself) and
``C = E[k kᵀ]`` over generic text, the update is the solution of
"minimize ``‖Ŵ K₀ − W K₀‖`` subject to ``Ŵ k* = v*``":

    Ŵ = W + Λ (C⁻¹ k*)ᵀ,   Λ = (v* − W k*) / ((C⁻¹ k*)ᵀ k*),

which inserts the fact *exactly* (``Ŵ k* = v*``) while changing the layer's
output least, in the metric of ``C``, for the keys it usually sees.  It is
the one-layer, one-edit case of MEMIT's closed form in the limit ``λ → 0``
(by Sherman-Morrison ``r kᵀ(λC + k kᵀ)⁻¹ = r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k)``), so
this module reuses MEMIT's machinery (:mod:`shared.interventions.memit`):
edit positions, the evaluator's exact prompts, target optimization, key
statistics and their content-keyed cache.

Several edits are applied **one after another**, as in the reference code
(``apply_rome_to_model`` loops over requests, each computed on the model the
previous one left): each edit's target and key are computed on the model as
updated so far.  Sequential ROME is known to degrade the model after many
edits (hundreds); the studies here use 10.

Differences from the reference code, on purpose -- MEMIT's (fixed evaluator
prompt instead of random context prefixes, KL over the whole essence prompt,
squared relative weight decay) and:

* ``C⁻¹ k*`` is a float64 solve with a tiny relative ridge
  (``cov_ridge`` x mean diagonal) that only guards against a singular
  statistic from a short corpus; the reference inverts ``C`` as is;
* the target value ``v*`` is expressed as the residual-stream target
  ``z = h + δ`` at the edited layer (adding ``δ`` to the MLP output adds it to
  the residual), so ``v* − W k* = z − h`` with the current model's ``h``.

As in the reference's ``compute_v``, the clamp (``clamp_norm_factor`` x) and
the weight decay are relative to the norm of the *MLP output* at the edit
position (MEMIT's and AlphaEdit's ``compute_z`` use the layer's output, the
residual stream), and the optimization stops on the total loss
(``optimize_targets(..., norm_of="mlp")``).  On SmolLM2-135M the MLP output
at layer 5 is ~3.3x shorter than the residual (mean 35 vs 114 on the
built-in edits), so the same factors bind ~3.3x sooner and the decay weighs
~11x more than with the residual's norm.

**Layer.**  ROME edits GPT-2 XL at layer 17 of 48 and GPT-J at 5 of 28 --
the early-middle MLPs where causal tracing locates factual recall.  For
SmolLM2-135M's 30 layers the default is measured on the 10 built-in edits
(see ``docs/editing.md``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from shared.interventions import register
from shared.interventions._memit_stats import TensorCache, cached_key_second_moments
from shared.interventions.base import MAX_LAYER, Category, Intervention
from shared.interventions.memit import (
    STATS_CORPUS,
    EditTargetParams,
    check_edit_layers,
    edit_sites,
    edited_check,
    frozen_for_editing,
    keys_and_values,
    optimize_targets,
    statistics_record,
    stats_windows,
)


class ROMEParams(EditTargetParams):
    """Hyperparameters of ROME (target stage: MEMIT's tuned defaults; layer: measured on SmolLM2-135M)."""

    layer: int = Field(5, ge=0, le=MAX_LAYER, description="the decoder layer whose MLP down_proj is edited (0-based)")
    cov_ridge: float = Field(
        1e-6, ge=0, le=1.0, description="relative ridge added to C before solving C x = k* (numerical guard)"
    )


def rome_update(key: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """ROME's rank-one update ``ΔW = r (C⁻¹k)ᵀ / ((C⁻¹k)ᵀ k)`` for one key ``k`` (d_in) and wanted change ``r`` (d_out).

    ``ΔW k = r`` exactly.  Float64; returns (d_out, d_in).
    """
    c = cov.double()
    if ridge:
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    k = key.double()
    u = torch.linalg.solve(c, k)  # C⁻¹ k
    return torch.outer(resid.double(), u) / torch.dot(u, k)


@register
class ROME(Intervention):
    """Insert facts one at a time as rank-one updates of one MLP down-projection (Meng et al., 2022)."""

    name = "rome"
    category = Category.EDIT
    params_model = ROMEParams
    #: 2: clamp and weight decay relative to the MLP output's norm and the stop rule on the total loss, as
    #: the reference's compute_v (were the residual stream's norm and the NLL alone)
    version = "2"
    sweep_axis = None
    needs_calibration = False
    data_inputs = ("edits", STATS_CORPUS)
    uses_tensor_cache = True

    def apply(
        self, model: Any, tokenizer: Any, params: ROMEParams, data: Any, cache: TensorCache | None = None
    ) -> dict[str, Any]:
        start = time.perf_counter()
        edits = list(data.edits)
        if not edits:
            raise ValueError("rome needs at least one edit")
        layer = params.layer
        check_edit_layers(model, [layer], self.name)
        weight = model.model.layers[layer].mlp.down_proj.weight
        with frozen_for_editing(model):
            t0 = time.perf_counter()
            windows = stats_windows(tokenizer, data.texts(STATS_CORPUS), params)
            covs, stats_info = cached_key_second_moments(model, windows, [layer], STATS_CORPUS, cache)
            stats_seconds = time.perf_counter() - t0
            device = next(model.parameters()).device
            cov = covs[layer].to(device)
            sites = edit_sites(tokenizer, edits, params.kl_template)

            nll_initial, nll_final, steps, delta_ratio, update_norms = [], [], [], [], []
            target_seconds = spread_seconds = 0.0
            for site in sites:  # sequentially, each on the model the previous edits left
                t0 = time.perf_counter()
                tr = optimize_targets(model, tokenizer, [site], layer, params, norm_of="mlp")
                target_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                keys, cur = keys_and_values(model, tokenizer, [site], layer, layer)
                upd = rome_update(keys[0], (tr.targets.to(device) - cur)[0], cov, params.cov_ridge)
                with torch.no_grad():
                    weight.add_(upd.to(weight.dtype))
                spread_seconds += time.perf_counter() - t0
                nll_initial += tr.nll_initial
                nll_final += tr.nll_final
                steps.append(tr.steps)
                delta_ratio.append(float(((tr.targets - tr.original).norm() / tr.original.norm())))
                update_norms.append(float(upd.norm()))
            _, nll_after = edited_check(model, tokenizer, sites, layer)
        seconds = time.perf_counter() - start
        mean = lambda xs: float(sum(xs) / len(xs))  # noqa: E731
        return {
            "edit": {
                "method": self.name,
                "layers": [layer],
                "num_edits": len(edits),
                "modules": [f"model.layers.{layer}.mlp.down_proj.weight"],
                "subject_not_found": sum(not s.subject_found for s in sites),
                "target_loss_initial": round(mean(nll_initial), 5),
                "target_loss_final": round(mean(nll_final), 5),
                "target_steps": round(mean(steps), 2),
                "delta_norm_ratio": round(mean(delta_ratio), 4),
                "edited_target_loss": round(mean(nll_after), 5),
                "update_norms": [round(x, 4) for x in update_norms],
                "relative_update_norm": round(float(sum(update_norms) / weight.detach().norm()), 6),
                "statistics": statistics_record(stats_info, stats_seconds),
                "target_seconds": round(target_seconds, 2),
                "spread_seconds": round(spread_seconds, 2),
            },
            "seconds": round(seconds, 2),
        }

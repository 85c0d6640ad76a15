"""Wanda -- pruning by weight magnitude x input-activation norm (Sun et al., 2023).

Runs llm-compressor's ``WandaPruningModifier`` through ``llmcompressor.oneshot``
on every Linear layer inside the transformer blocks.  Pruning is per output
row: each row of a ``[out, in]`` weight loses exactly ``int(in * sparsity)``
weights (or ``n`` of every ``m`` with ``mask_structure``), so the measured
sparsity matches the requested one up to that rounding (at most
``1 / in_features``: under 0.2 % for SmolLM2's 576 and 1536 columns).  The
kept weights are unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.interventions import register
from shared.interventions._pruning import PruningParams, measured_sparsity, prune
from shared.interventions.base import Category, Intervention

log = logging.getLogger(__name__)

__all__ = ["WandaParams", "WandaPruning", "measured_sparsity"]


class WandaParams(PruningParams):
    """Hyperparameters of Wanda pruning (defaults: built-in SmolLM2-135M on CPU)."""


@register
class WandaPruning(Intervention):
    """Unstructured (or N:M) Wanda pruning of all block Linear layers via llm-compressor."""

    name = "wanda"
    category = Category.COMPRESS
    params_model = WandaParams
    version = "2"  # 2: records the pruning mask in the checkpoint's compression state
    sweep_axis = "sparsity"
    needs_calibration = True
    data_inputs = ("calibration",)

    def apply(self, model: Any, tokenizer: Any, params: WandaParams, data: Any) -> dict[str, Any]:
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        record = prune("wanda", WandaPruningModifier, model, tokenizer, params, data.texts("calibration"))
        log.info("wanda: sparsity %.3f requested, %.4f measured, %.1fs", params.sparsity,
                 record["compression"]["measured_sparsity"], record["seconds"])
        return record

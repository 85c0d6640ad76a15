"""SparseGPT -- one-shot pruning with second-order weight reconstruction (Frantar & Alistarh, 2023).

Runs llm-compressor's ``SparseGPTModifier`` on every Linear layer inside the
transformer blocks.  Unlike Wanda it also *updates* the kept weights (an OBS
step per column block, using the layer-input Hessian from the calibration
windows) to compensate for what was removed, so it is slower (about a minute
for SmolLM2-135M with 32x256 calibration tokens on 2 cores) and usually loses
less.  The mask is chosen per row within blocks of ``block_size`` columns, so
the measured sparsity equals the requested one up to per-row rounding.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from shared.interventions import register
from shared.interventions._pruning import PruningParams, prune
from shared.interventions.base import Category, Intervention

log = logging.getLogger(__name__)


class SparseGPTParams(PruningParams):
    """Hyperparameters of SparseGPT (defaults of the paper and of llm-compressor)."""

    block_size: int = Field(128, ge=1, le=65_536, description="columns pruned and reconstructed together")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, as a fraction of its mean diagonal")


@register
class SparseGPTPruning(Intervention):
    """Unstructured (or N:M) SparseGPT pruning of all block Linear layers via llm-compressor."""

    name = "sparsegpt"
    category = Category.COMPRESS
    params_model = SparseGPTParams
    sweep_axis = "sparsity"
    needs_calibration = True
    data_inputs = ("calibration",)

    def apply(self, model: Any, tokenizer: Any, params: SparseGPTParams, data: Any) -> dict[str, Any]:
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        record = prune(
            "sparsegpt", SparseGPTModifier, model, tokenizer, params, data.texts("calibration"),
            block_size=params.block_size, dampening_frac=params.dampening_frac,
        )
        log.info("sparsegpt: sparsity %.3f requested, %.4f measured, %.1fs", params.sparsity,
                 record["compression"]["measured_sparsity"], record["seconds"])
        return record

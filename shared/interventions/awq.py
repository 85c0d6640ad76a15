"""AWQ -- activation-aware weight quantization (Lin et al., 2024).

Runs llm-compressor's ``AWQModifier`` (per-channel smoothing scales found by a
grid search on the calibration activations, folded into the preceding norm
or projection) followed by a ``QuantizationModifier`` that sets the
round-to-nearest grid of every Linear layer inside the transformer blocks.
llm-compressor quantizes such layers only on the fly during forward; here the
weights are snapped onto the recorded grid so the saved model is dense and
on-grid like GPTQ's.

On a CPU-only machine AWQ needs one workaround (pinned memory), see
:func:`shared.interventions._llmcompressor._no_pinned_memory_without_accelerator`.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, field_validator

from shared.interventions import register
from shared.interventions._llmcompressor import run_oneshot
from shared.interventions._quantization import QuantizationParams, check_group_size, finish_quantization, model_input_widths
from shared.interventions.base import Category, Intervention

log = logging.getLogger(__name__)

#: bit widths the paper evaluated for AWQ
AWQ_BITS = tuple(range(2, 9))


class AWQParams(QuantizationParams):
    """Hyperparameters of AWQ (defaults: 4 bits, groups of 64, llm-compressor's search)."""

    n_grid: int = Field(20, ge=2, le=100, description="points of the smoothing-scale grid search per layer group")
    duo_scaling: bool = Field(True, description="search scales from activations and weights (else activations only)")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in AWQ_BITS:
            raise ValueError(f"bits must be between {AWQ_BITS[0]} and {AWQ_BITS[-1]}, got {v}")
        return v


@register
class AWQQuantization(Intervention):
    """AWQ weight quantization of all block Linear layers via llm-compressor, kept dense on its grid."""

    name = "awq"
    category = Category.COMPRESS
    params_model = AWQParams
    sweep_axis = "bits"
    needs_calibration = True
    data_inputs = ("calibration",)

    def check_model(self, params: AWQParams, input_widths: set[int]) -> None:
        check_group_size(params.group_size, input_widths)

    def apply(self, model: Any, tokenizer: Any, params: AWQParams, data: Any) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        self.check_model(params, model_input_widths(model))
        recipe = [
            AWQModifier(n_grid=params.n_grid, duo_scaling=params.duo_scaling),
            QuantizationModifier(config_groups={"block_linear": params.scheme()}, ignore=["lm_head"]),
        ]
        facts = run_oneshot(model, tokenizer, recipe, params, data.texts("calibration"))
        record = finish_quantization("awq", model, params, facts)
        log.info("awq: %d bits, group %s, %.1fs", params.bits, params.group_size, record["seconds"])
        return record

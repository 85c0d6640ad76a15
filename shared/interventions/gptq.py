"""GPTQ -- one-shot weight quantization with second-order error compensation (Frantar et al., 2023).

Runs llm-compressor's ``GPTQModifier`` on every Linear layer inside the
transformer blocks (the LM head, tied to the embeddings in SmolLM2, stays in
full precision).  Columns are quantized one block at a time and the error of
each column is pushed onto the columns not yet quantized, using the
layer-input Hessian from the calibration windows.  Afterwards the model is a
plain dense model whose block Linear weights lie exactly on their grid.

Column order: activation order ("act-order", llm-compressor's default
``actorder="static"``): columns with the largest Hessian diagonal are
quantized first.  llm-compressor fixes every group's scale from the
*original* weights before the column loop (the reference implementation's
``--static-groups``); the reference pairs static groups with act-order, and
so does llm-compressor by default.  Without act-order (version 1 of this
intervention) the error pushed onto later columns drove weights past their
precomputed group range, where they are clipped: on SmolLM2-135M at 4 bits
(symmetric, group 64, 16 windows) perplexity 45.5 against plain rounding's
40.5; with act-order 38.0 (``benchmarks/gptq_vs_rtn.py``,
``docs/benchmarks/gptq_vs_rtn.json``).
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

#: bit widths the paper evaluated for GPTQ
GPTQ_BITS = (2, 3, 4, 8)


class GPTQParams(QuantizationParams):
    """Hyperparameters of GPTQ (defaults: 4 bits, groups of 64, symmetric, the original algorithm's settings)."""

    symmetric: bool = Field(True, description="symmetric grid (the paper's GPTQ setting); false adds a zero point")

    block_size: int = Field(128, ge=1, le=65_536, description="columns quantized together before the error is propagated")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, as a fraction of its mean diagonal")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in GPTQ_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, GPTQ_BITS))}, got {v}")
        return v


@register
class GPTQQuantization(Intervention):
    """GPTQ weight quantization of all block Linear layers via llm-compressor, kept dense on its grid."""

    name = "gptq"
    version = "2"  # 2: act-order (llm-compressor's default actorder="static"; was no act-order)
    category = Category.COMPRESS
    params_model = GPTQParams
    sweep_axis = "bits"
    needs_calibration = True
    data_inputs = ("calibration",)

    def check_model(self, params: GPTQParams, input_widths: set[int]) -> None:
        check_group_size(params.group_size, input_widths)

    def apply(self, model: Any, tokenizer: Any, params: GPTQParams, data: Any) -> dict[str, Any]:
        from compressed_tensors.quantization import ActivationOrdering
        from llmcompressor.modifiers.quantization import GPTQModifier

        self.check_model(params, model_input_widths(model))
        modifier = GPTQModifier(
            config_groups={"block_linear": params.scheme()},
            ignore=["lm_head"],
            block_size=params.block_size,
            dampening_frac=params.dampening_frac,
            # act-order, llm-compressor's default: its group scales are fixed up front (static
            # groups), and without act-order that loses to plain rounding (see the module docstring)
            actorder=ActivationOrdering.STATIC,
        )
        facts = run_oneshot(model, tokenizer, modifier, params, data.texts("calibration"))
        record = finish_quantization("gptq", model, params, facts)
        log.info("gptq: %d bits, group %s, %.1fs", params.bits, params.group_size, record["seconds"])
        return record

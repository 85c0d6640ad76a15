"""RTN -- round-to-nearest weight quantization, the baseline every quantization paper reports.

Each weight of every Linear layer inside the transformer blocks is rounded to
the nearest point of its group's grid, the scale (and, asymmetric, the zero
point) taken from the group's minimum and maximum -- no calibration data, no
error compensation.  Runs llm-compressor's ``QuantizationModifier`` on its
own (llm-compressor infers its data-free pipeline), with the same scheme
GPTQ and AWQ use (``W4A16``-style: integer weights, activations untouched),
so the three are compared on the same kind of grid.  Like them, the model
stays dense with its weights on the recorded grid; re-compression policies
and the packed export work unchanged.

Why it is here: it isolates what GPTQ's error compensation and AWQ's scaling
add over plain rounding, at almost no cost (well under a second per model on
the CPU for SmolLM2-135M).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, field_validator

from shared.interventions import register
from shared.interventions._llmcompressor import run_data_free
from shared.interventions._quantization import GridParams, check_group_size, finish_quantization, model_input_widths
from shared.interventions.base import Category, Intervention

log = logging.getLogger(__name__)

#: bit widths accepted (compressed-tensors' integer weight grids)
RTN_BITS = tuple(range(2, 9))


class RTNParams(GridParams):
    """Grid of round-to-nearest quantization (defaults: 4 bits, groups of 64, symmetric -- llm-compressor's W4A16)."""

    symmetric: bool = Field(True, description="symmetric grid (llm-compressor's W4A16 scheme); false adds a zero point")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in RTN_BITS:
            raise ValueError(f"bits must be between {RTN_BITS[0]} and {RTN_BITS[-1]}, got {v}")
        return v


@register
class RTNQuantization(Intervention):
    """Round-to-nearest weight quantization of all block Linear layers via llm-compressor, kept dense on its grid."""

    name = "rtn"
    category = Category.COMPRESS
    params_model = RTNParams
    sweep_axis = "bits"

    def check_model(self, params: RTNParams, input_widths: set[int]) -> None:
        check_group_size(params.group_size, input_widths)

    def apply(self, model: Any, tokenizer: Any, params: RTNParams, data: Any) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        self.check_model(params, model_input_widths(model))
        modifier = QuantizationModifier(config_groups={"block_linear": params.scheme()}, ignore=["lm_head"])
        facts = run_data_free(model, tokenizer, modifier)
        record = finish_quantization("rtn", model, params, facts)
        log.info("rtn: %d bits, group %s, %.1fs", params.bits, params.group_size, record["seconds"])
        return record

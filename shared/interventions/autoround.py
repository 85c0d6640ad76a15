"""AutoRound -- sign-gradient tuning of rounding offsets and clipping ranges (Cheng et al., 2024).

Runs llm-compressor's ``AutoRoundModifier`` (which calls the ``auto-round``
library block by block): for each decoder block it learns, with signed
gradient descent on the block's output error over the calibration windows,
a rounding offset per weight and a clipping factor per group, then writes the
rounded weights and the tuned scales.  Same grid as GPTQ, AWQ and RTN (integer
weights per group of ``group_size`` input columns, activations untouched), kept
dense on that grid afterwards, so re-compression policies and the packed
export work unchanged.

Deviation from the library's defaults, and why: ``torch.compile`` is off by
default (``enable_torch_compile``) -- on a CPU-only machine compiling each
block costs more than the tuning it speeds up.

Defaults tuned for the built-in model on two CPU cores: ``iters`` 20 and 16
calibration windows (the paper: 200 iterations, 512 windows of 2048 tokens --
about ten times the time per block here).  Measured
(``benchmarks/interventions.py --samples 16 --only autoround:bits=4,iters=20``,
idle machine): 179 s, held-out perplexity 33.4 against 40.5 for
round-to-nearest and 45.5 for GPTQ on the same grid (4 bits, groups of 64,
symmetric; base 29.6); cluster specs should set ``iters: 200``.  AutoRound tunes in reduced precision; the model is cast back to the
precision it came in before its weights are snapped onto the grid, so a later
step trains the same kind of model as after GPTQ.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field, field_validator

from shared.interventions import register
from shared.interventions._llmcompressor import run_oneshot
from shared.interventions._quantization import QuantizationParams, check_group_size, finish_quantization, model_input_widths
from shared.interventions.base import Category, Intervention

log = logging.getLogger(__name__)

#: bit widths accepted (compressed-tensors' integer weight grids)
AUTOROUND_BITS = tuple(range(2, 9))


class AutoRoundParams(QuantizationParams):
    """Hyperparameters of AutoRound (defaults: 4 bits, groups of 64, symmetric; 20 iterations, 16 windows: tuned here)."""

    num_calibration_samples: int = Field(
        16, ge=1, le=100_000, description="calibration windows (fewer if the corpus is shorter; the paper: 512)"
    )
    symmetric: bool = Field(True, description="symmetric grid (AutoRound's default); false adds a zero point")
    iters: int = Field(20, ge=1, le=100_000, description="sign-gradient steps per decoder block (the paper: 200; 20 on a CPU)")
    lr: float | None = Field(None, gt=0, le=1.0, description="learning rate of the rounding offsets; null = 1 / iters (the paper)")
    batch_size: int = Field(8, ge=1, le=1024, description="calibration windows per tuning step")
    enable_torch_compile: bool = Field(False, description="compile each block for tuning (slower than it saves on a CPU)")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in AUTOROUND_BITS:
            raise ValueError(f"bits must be between {AUTOROUND_BITS[0]} and {AUTOROUND_BITS[-1]}, got {v}")
        return v


def _cast_floating(model: Any, dtype: torch.dtype) -> None:
    """Cast every floating-point parameter and buffer back to ``dtype`` (AutoRound tunes blocks in bf16)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


@register
class AutoRoundQuantization(Intervention):
    """AutoRound weight quantization of all block Linear layers via llm-compressor, kept dense on its grid."""

    name = "autoround"
    category = Category.COMPRESS
    params_model = AutoRoundParams
    sweep_axis = "bits"
    needs_calibration = True
    data_inputs = ("calibration",)

    def check_model(self, params: AutoRoundParams, input_widths: set[int]) -> None:
        check_group_size(params.group_size, input_widths)

    def apply(self, model: Any, tokenizer: Any, params: AutoRoundParams, data: Any) -> dict[str, Any]:
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        self.check_model(params, model_input_widths(model))
        dtype = model.get_input_embeddings().weight.dtype
        modifier = AutoRoundModifier(
            config_groups={"block_linear": params.scheme()},
            ignore=["lm_head"],
            iters=params.iters,
            lr=params.lr,
            batch_size=params.batch_size,
            enable_torch_compile=params.enable_torch_compile,
        )
        facts = run_oneshot(model, tokenizer, modifier, params, data.texts("calibration"))
        _cast_floating(model, dtype)
        record = finish_quantization("autoround", model, params, facts)
        log.info("autoround: %d bits, group %s, %d iters, %.1fs", params.bits, params.group_size, params.iters,
                 record["seconds"])
        return record

"""What the quantizers (GPTQ, AWQ, RTN, AutoRound) share: the grid parameters, the group-size check, the record.

Each quantizes the weights of every Linear layer inside the transformer blocks
to signed integers with one scale (and, asymmetric, one zero point) per output
row and group of ``group_size`` input columns -- GPTQ symmetric and AWQ
asymmetric by default, as in the paper.  The result is kept dense: each weight is replaced by its
dequantized grid value (:func:`shared.compression_state.snap_and_strip_quantized`)
and the scales and zero points go to the checkpoint's compression state, from
which the packed export (:mod:`shared.export`) and re-projection work.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import Field

from shared.compression_state import grid_distance, quantization_args, snap_and_strip_quantized
from shared.interventions._llmcompressor import CalibratedParams
from shared.interventions.base import InterventionParams
from shared.models import block_linear_weights


class GridParams(InterventionParams):
    """Grid of a quantization step (the allowed ``bits`` are set per method); no calibration data."""

    bits: int = Field(4, description="bits per weight")
    group_size: int | None = Field(
        64,
        ge=1,
        le=65_536,
        description="input columns sharing a scale and zero point (the paper: 128; SmolLM2's 576-wide "
        "layers need a divisor such as 64); null = one scale per output row",
    )
    symmetric: bool = Field(False, description="symmetric grid (no zero point) instead of asymmetric")

    def grid(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def scheme(self) -> Any:
        """A compressed-tensors ``QuantizationScheme`` for the block Linear layers."""
        from compressed_tensors.quantization import QuantizationScheme

        return QuantizationScheme(targets=["Linear"], weights=quantization_args(self.bits, self.group_size, self.symmetric))


class QuantizationParams(GridParams, CalibratedParams):
    """Grid and calibration of a quantization step that reads calibration text (GPTQ, AWQ, AutoRound)."""


def check_group_size(group_size: int | None, input_widths: Iterable[int]) -> None:
    """Reject a group size that does not divide every quantized layer's input width.

    Group-wise packing and kernels need whole groups; llm-compressor would
    also refuse, but only after loading the model and the calibration data.
    """
    if not group_size:
        return
    widths = sorted(set(int(w) for w in input_widths))
    bad = [w for w in widths if w % group_size]
    if bad:
        divisors = [g for g in (256, 128, 64, 32, 16) if all(w % g == 0 for w in widths)]
        hint = f"; group sizes that fit this model: {', '.join(map(str, divisors))}" if divisors else ""
        raise ValueError(
            f"group_size {group_size} does not divide the input width(s) {', '.join(map(str, bad))} "
            f"of this model's block Linear layers (widths: {', '.join(map(str, widths))}){hint}"
        )


def model_input_widths(model: Any) -> set[int]:
    return {int(w.shape[1]) for w in block_linear_weights(model).values()}


def finish_quantization(method: str, model: Any, params: GridParams, facts: dict[str, Any]) -> dict[str, Any]:
    """Snap the model onto its grid, strip the quantization wrappers, and build the step's record."""
    tensors = snap_and_strip_quantized(model)
    layers = len([k for k in tensors if k.endswith(".weight_scale")])
    expected = len(block_linear_weights(model))
    if layers != expected:
        raise RuntimeError(f"{method}: {layers} layers were quantized, expected the {expected} block Linear layers")
    distance = grid_distance(model, tensors, quantization_args(params.bits, params.group_size, params.symmetric))
    return {
        "compression": {
            "method": method,
            "kind": "quantization",
            **params.grid(),
            "layers": layers,
            "grid_distance": distance,
            "num_calibration_samples": facts["num_calibration_samples"],
            "calibration_seq_len": facts["calibration_seq_len"],
        },
        "seconds": facts["oneshot_seconds"],
        "state": {"tensors": tensors, "grid": params.grid()},
    }

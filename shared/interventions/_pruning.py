"""What Wanda and SparseGPT share: mask-structure parameters, sparsity measurement, the record.

Both prune every Linear layer inside the transformer blocks (attention and
MLP projections; embeddings and the LM head stay dense, as in the paper)
through an llm-compressor modifier, and both leave a dense model whose pruned
weights are exact zeros.  The mask of the kept weights is recorded in the
checkpoint's compression state so a later step can be re-projected onto it.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from shared.compression_state import pruning_masks
from shared.interventions._llmcompressor import CalibratedParams, block_class_name, run_oneshot
from shared.models import block_linear_weights

_NM = re.compile(r"^(\d+):(\d+)$")


class PruningParams(CalibratedParams):
    """Strength and structure of a pruning step."""

    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of block linear weights set to zero")
    mask_structure: str = Field(
        "unstructured",
        description="'unstructured' or 'N:M' (N zeros in every M consecutive input weights, e.g. '2:4')",
    )

    @field_validator("mask_structure")
    @classmethod
    def _check_structure(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("unstructured", "0:0"):
            return "unstructured"
        m = _NM.match(v)
        if not m or not (0 < int(m.group(1)) < int(m.group(2))):
            raise ValueError("mask_structure must be 'unstructured' or 'N:M' with 0 < N < M")
        return v

    @model_validator(mode="after")
    def _nm_matches_sparsity(self) -> "PruningParams":
        # An N:M mask fixes the sparsity at N/M; a different requested value would
        # be silently ignored by llm-compressor, so it is rejected here.
        if self.mask_structure != "unstructured":
            n, m = (int(x) for x in self.mask_structure.split(":"))
            if abs(self.sparsity - n / m) > 1e-9:
                raise ValueError(f"mask_structure {self.mask_structure} implies sparsity {n / m}, got {self.sparsity}")
        return self

    def llmcompressor_mask(self) -> str:
        """The mask structure in llm-compressor's spelling ('0:0' = unstructured)."""
        return "0:0" if self.mask_structure == "unstructured" else self.mask_structure


def measured_sparsity(model: Any) -> float:
    """Fraction of exact zeros over all block linear weights (what compression is measured on)."""
    zeros = total = 0
    for w in block_linear_weights(model).values():
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def prune(method: str, modifier_class: Any, model: Any, tokenizer: Any, params: PruningParams, texts: list[str],
          **modifier_kwargs: Any) -> dict[str, Any]:
    """Prune ``model`` in place with an llm-compressor sparsity modifier; return the step's record and mask state."""
    modifier = modifier_class(
        sparsity=params.sparsity,
        mask_structure=params.llmcompressor_mask(),
        # the decoder-block class: every Linear inside it is pruned, which is exactly
        # block_linear_weights() -- the LM head (also a Linear) is outside the blocks
        targets=[block_class_name(model)],
        **modifier_kwargs,
    )
    facts = run_oneshot(model, tokenizer, modifier, params, texts)
    return {
        "compression": {
            "method": method,
            "kind": "pruning",
            "sparsity": params.sparsity,
            "mask_structure": params.mask_structure,
            "measured_sparsity": measured_sparsity(model),
            "num_calibration_samples": facts["num_calibration_samples"],
            "calibration_seq_len": facts["calibration_seq_len"],
        },
        "seconds": facts["oneshot_seconds"],
        "state": {"tensors": pruning_masks(model), "grid": None},
    }

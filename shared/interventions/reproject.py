"""Re-projection onto a checkpoint's recorded compression: the cheap re-compression policy.

After an edit or unlearning step changed a compressed model, its weights
have left their quantization grid and its pruned weights are no longer zero.
The paper re-applies the compressor (fresh calibration, new grid and mask).
Re-projection instead restores the *recorded* compression: weights outside
the recorded pruning mask are zeroed again and every quantized layer is
snapped back onto its recorded grid (same scales and zero points).  It needs
no calibration data, takes about a second, keeps the storage format of the
first compression bit-for-bit compatible, and is idempotent.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.compression_state import apply_masks, grid_layers, mask_layers, project_to_grid
from shared.interventions import register
from shared.interventions.base import Category, Intervention, InterventionParams

log = logging.getLogger(__name__)


class ReprojectParams(InterventionParams):
    """No parameters: everything comes from the recorded compression state."""


@register
class Reproject(Intervention):
    """Zero the weights outside the recorded masks and snap quantized layers onto their recorded grids."""

    name = "reproject"
    category = Category.COMPRESS
    params_model = ReprojectParams
    reads_compression_state = True

    def apply(self, model: Any, tokenizer: Any, params: ReprojectParams, data: Any,
              state: tuple[dict[str, Any], Any] | None = None) -> dict[str, Any]:
        tensors, args = state or ({}, None)
        if not tensors:
            raise ValueError(
                "reproject: the parent checkpoint records no compression state (no earlier wanda, "
                "sparsegpt, gptq or awq step) -- there is nothing to re-project onto"
            )
        zeroed = apply_masks(model, tensors) if mask_layers(tensors) else 0
        moved = project_to_grid(model, tensors, args) if grid_layers(tensors) and args is not None else 0.0
        log.info("reproject: %d weights re-zeroed, largest grid move %.3g", zeroed, moved)
        return {"reprojected": {"weights_rezeroed": zeroed, "largest_grid_move": moved}}

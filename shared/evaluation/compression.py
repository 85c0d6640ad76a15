"""Measured compression: sparsity and average bits per weight.

Compressed models stay dense in memory (zeros for pruning, on-grid values for
quantization), so sparsity is *measured* from the weights, while the storage
precision of a quantized model comes from the checkpoint's compression record
(the values alone cannot tell 4-bit from 8-bit storage reliably).

Both are computed over :func:`shared.models.block_linear_weights` -- the
Linear layers inside the transformer blocks, which is what the compressors act
on; embeddings and the LM head are excluded, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from shared.models import block_linear_weights

#: the paper's reference precision of an uncompressed weight
DENSE_BITS = 16.0
#: bits spent per quantization group: a 16-bit scale and a 16-bit zero point
GROUP_OVERHEAD_BITS = 32.0
#: bits charged to a pruned (zero) weight, as in the paper (a 1-bit mask)
PRUNED_BITS = 1.0


def _quantization(compression: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The quantization part of a compression record, or None if the weights are not quantized.

    Accepts the record itself (``{"method": "gptq", "bits": 4, "group_size": 64}``),
    the intervention's whole output (``{"compression": {...}}``), or a record
    with a list of ``steps`` (prune, then quantize), taking the last step that
    set ``bits`` below the dense precision.  A record follows its ``previous``
    compression (quantized, then pruned: still quantized).  A record marked
    ``modified_after`` (a later edit moved the weights off their grid, and no
    re-compression followed) counts as not quantized: the weights would have
    to be stored at full precision.
    """
    if not compression:
        return None
    if "compression" in compression and isinstance(compression["compression"], Mapping):
        return _quantization(compression["compression"])
    if compression.get("modified_after"):
        return None
    steps = compression.get("steps")
    if isinstance(steps, list):
        found = [q for q in (_quantization(s) for s in steps if isinstance(s, Mapping)) if q]
        return found[-1] if found else None
    bits = compression.get("bits")
    if bits is not None and float(bits) < DENSE_BITS:
        return compression
    previous = compression.get("previous")
    return _quantization(previous) if isinstance(previous, Mapping) else None


def measure_compression(model: Any, compression: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Sparsity and average bits per weight of the block Linear weights.

    * ``sparsity`` = (number of exactly-zero weights) / (number of weights).
    * ``avg_bits`` follows the paper (its reference precision is 16 bits):

      - dense, unquantized: ``16``;
      - pruned, unquantized: ``(1 * zeros + 16 * nonzeros) / weights`` -- a pruned
        weight costs one mask bit (12.25 at 25 % sparsity);
      - quantized (``compression`` has ``bits`` < 16): ``bits + 32 / group_size``
        -- a 16-bit scale and a 16-bit zero point per group (4.25 at 4 bits,
        group 128).  Without a group size (per-channel quantization) the 32
        bits are spread over each output row: ``bits + 32 * rows / weights``.
        Zeros of a pruned-then-quantized model are stored at ``bits`` too.
    """
    weights = block_linear_weights(model)
    if not weights:
        raise ValueError("model has no Linear layers inside its transformer blocks")
    total = 0
    zeros = 0
    rows = 0
    with torch.no_grad():
        for w in weights.values():
            total += w.numel()
            zeros += int((w == 0).sum().item())
            rows += w.shape[0] if w.dim() > 1 else 1
    sparsity = zeros / total

    quant = _quantization(compression)
    if quant is not None:
        bits = float(quant["bits"])
        group = quant.get("group_size")
        if group is not None and int(group) > 0:
            avg_bits = bits + GROUP_OVERHEAD_BITS / int(group)
        else:
            avg_bits = bits + GROUP_OVERHEAD_BITS * rows / total
    else:
        avg_bits = (PRUNED_BITS * zeros + DENSE_BITS * (total - zeros)) / total
    return {"sparsity": float(sparsity), "avg_bits": float(avg_bits)}

"""Export a compressed checkpoint in its real packed format (compressed-tensors).

Inside the pipeline compressed models stay dense (on-grid floats, exact
zeros) so later steps can train them.  For deployment -- and to report what
compression really saves on disk -- a quantized checkpoint is written in
compressed-tensors' ``pack-quantized`` format: integer weights packed into
int32 words plus the recorded per-group scales and zero points, with a
``quantization_config`` in ``config.json`` that plain
``transformers.AutoModelForCausalLM.from_pretrained`` understands (it
decompresses through the compressed-tensors integration).

The packed weights are computed from the recorded grid, so a checkpoint whose
weights left that grid (an edit after quantization, without re-compression)
is refused: packing it would silently change the model.

Pruned-only checkpoints are written as ordinary safetensors: compressed-tensors
no longer ships a sparse compressor, so there is no packed sparse format to
target (the zeros still compress well with any general-purpose compressor).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from shared.compression_state import grid_distance, grid_layers, load_state, mask_layers

log = logging.getLogger(__name__)

#: largest tolerated distance from the recorded grid (float rounding of scale * integer)
GRID_TOLERANCE = 1e-5


def folder_bytes(folder: Path | str) -> int:
    """Total size of the weight files in a model folder (what a deployment downloads)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _attach_recorded_quantization(model: Any, tensors: dict[str, torch.Tensor], args: Any) -> int:
    """Give each recorded layer its quantization scheme and the *recorded* scales and zero points."""
    from compressed_tensors.quantization import (
        QuantizationScheme,
        QuantizationStatus,
        initialize_module_for_quantization,
    )

    modules = dict(model.named_modules())
    names = grid_layers(tensors)
    for name in names:
        module = modules[name]
        initialize_module_for_quantization(module, QuantizationScheme(targets=["Linear"], weights=args))
        with torch.no_grad():
            module.weight_scale.data = tensors[name + ".weight_scale"].to(module.weight_scale.dtype).clone()
            module.weight_zero_point.data = tensors[name + ".weight_zero_point"].to(module.weight_zero_point.dtype).clone()
        module.quantization_status = QuantizationStatus.FROZEN
    return len(names)


def export_compressed(checkpoint: Path | str, dest: Path | str) -> dict[str, Any]:
    """Write ``checkpoint`` (a store checkpoint folder) to ``dest`` in its packed format; return facts.

    Returns the format, the on-disk size of the weights before and after, and
    the number of packed layers.
    """
    from compressed_tensors.compressors import ModelCompressor

    from shared.models import load_model

    checkpoint, dest = Path(checkpoint), Path(dest)
    tensors, args = load_state(checkpoint)
    model, tokenizer = load_model(checkpoint)
    dense_bytes = folder_bytes(checkpoint)
    dest.mkdir(parents=True, exist_ok=True)
    if not grid_layers(tensors):
        model.save_pretrained(str(dest))
        tokenizer.save_pretrained(str(dest))
        fmt = "dense-sparse" if mask_layers(tensors) else "dense"
        return {"format": fmt, "dense_bytes": dense_bytes, "bytes": folder_bytes(dest), "packed_layers": 0}
    distance = grid_distance(model, tensors, args)
    if distance > GRID_TOLERANCE:
        raise ValueError(
            f"{checkpoint}: weights are up to {distance:.3g} away from their recorded quantization grid "
            "(a step after the quantization changed them); re-compress the model (recompress: reapply or "
            "reproject) before exporting it"
        )
    packed = _attach_recorded_quantization(model, tensors, args)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(dest))
    compressor.update_config(str(dest))
    tokenizer.save_pretrained(str(dest))
    facts = {"format": "pack-quantized", "dense_bytes": dense_bytes, "bytes": folder_bytes(dest), "packed_layers": packed,
             "bits": int(args.num_bits), "group_size": args.group_size}
    log.info("exported %s: %d -> %d bytes of weights (%s)", checkpoint, dense_bytes, facts["bytes"], facts["format"])
    return facts

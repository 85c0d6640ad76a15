"""The compression state a checkpoint carries: quantization grids and pruning masks.

Compressed models stay dense in memory so that later steps can train them.
What makes them *compressed* is recorded beside the weights, in the
checkpoint folder's ``compression_state.safetensors``:

* for quantized layers, each layer's ``weight_scale`` and ``weight_zero_point``
  (one per output row and group) -- the grid its weights were snapped to;
* for pruned layers, the bit-packed mask of the weights that were kept.

The quantization arguments (bits, group size, symmetry) are in the file's
metadata.  With this state a checkpoint can be checked (are the weights still
on their grid / inside their mask?), re-projected after a later edit
(``recompress: reproject``) and exported in a real packed format.

Grid arithmetic is compressed-tensors' own ``fake_quantize`` (quantize then
dequantize with the recorded scales), so the grid is exactly the one the
packed export and inference kernels use.  Re-projecting an on-grid weight
with its recorded scales changes nothing (idempotent), unlike a fresh
min-max re-quantization, which moves most weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.models import block_linear_weights

#: file name of the state inside a checkpoint folder
STATE_FILE = "compression_state.safetensors"
_SCALE = ".weight_scale"
_ZERO = ".weight_zero_point"
_MASK = ".mask"


def quantization_args(bits: int, group_size: int | None, symmetric: bool) -> Any:
    """compressed-tensors ``QuantizationArgs`` for integer weight quantization (group-wise when ``group_size``)."""
    from compressed_tensors.quantization import QuantizationArgs

    if group_size:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")


def _args_from_meta(meta: Mapping[str, str]) -> Any:
    grid = json.loads(meta["grid"])
    return quantization_args(int(grid["bits"]), grid.get("group_size"), bool(grid["symmetric"]))


def _linear_modules(model: Any) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def snap_and_strip_quantized(model: Any) -> dict[str, torch.Tensor]:
    """Turn layers llm-compressor left quantized into plain Linear layers holding on-grid weights.

    After ``oneshot`` a quantized layer keeps its float weight, its
    ``weight_scale`` / ``weight_zero_point`` parameters and a forward that
    quantizes on the fly.  GPTQ already leaves on-grid values in ``weight``;
    AWQ and round-to-nearest do not.  Either way the weight is replaced by its
    fake-quantized value (a no-op for GPTQ up to float rounding), the scales
    are returned for the state file, and every quantization attribute is
    removed so the model is an ordinary transformers model again.
    """
    from compressed_tensors.quantization import QuantizationMetadata, fake_quantize

    state: dict[str, torch.Tensor] = {}
    for name, module in _linear_modules(model).items():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        with torch.no_grad():
            scale = module.weight_scale.detach().clone()
            zero = module.weight_zero_point.detach().clone()
            module.weight.data = fake_quantize(module.weight.data, scale, zero, scheme.weights)
        state[name + _SCALE] = scale.contiguous()
        state[name + _ZERO] = zero.contiguous()
        QuantizationMetadata.clear_quantization(module)
        if "forward" in vars(module):
            del module.forward  # back to the class's forward
        for attr in ("quantization_status", "quantization_enabled"):
            if hasattr(module, attr):
                delattr(module, attr)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return state


def grid_layers(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the Linear layers whose grid the state records."""
    return sorted(k[: -len(_SCALE)] for k in state if k.endswith(_SCALE))


def mask_layers(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the weights whose pruning mask the state records."""
    return sorted(k[: -len(_MASK)] for k in state if k.endswith(_MASK))


def project_to_grid(model: Any, state: Mapping[str, torch.Tensor], args: Any) -> float:
    """Snap every recorded layer's weight onto its recorded grid; return the largest change.

    Idempotent: a weight already on its grid is returned unchanged (up to
    float rounding), so the return value doubles as the "off-grid" distance.
    """
    from compressed_tensors.quantization import fake_quantize

    modules = _linear_modules(model)
    worst = 0.0
    with torch.no_grad():
        for name in grid_layers(state):
            weight = modules[name].weight
            snapped = fake_quantize(
                weight.data.float(), state[name + _SCALE].float(), state[name + _ZERO], args
            ).to(weight.dtype)
            worst = max(worst, float((snapped - weight.data).abs().max()))
            weight.data.copy_(snapped)
    return worst


def grid_distance(model: Any, state: Mapping[str, torch.Tensor], args: Any) -> float:
    """Largest change that projecting onto the recorded grid would make (0 = on grid); the model is untouched."""
    from compressed_tensors.quantization import fake_quantize

    modules = _linear_modules(model)
    worst = 0.0
    with torch.no_grad():
        for name in grid_layers(state):
            w = modules[name].weight.data.float()
            snapped = fake_quantize(w, state[name + _SCALE].float(), state[name + _ZERO], args)
            worst = max(worst, float((snapped - w).abs().max()))
    return worst


def pruning_masks(model: Any) -> dict[str, torch.Tensor]:
    """Bit-packed masks (1 = kept) of every block Linear weight, for the state file (1 bit per weight)."""
    out = {}
    for name, weight in block_linear_weights(model).items():
        kept = (weight.detach() != 0).cpu().numpy().reshape(-1)
        out[name + _MASK] = torch.from_numpy(np.packbits(kept))
    return out


def apply_masks(model: Any, state: Mapping[str, torch.Tensor]) -> int:
    """Zero every weight outside its recorded mask; return how many weights were changed."""
    weights = block_linear_weights(model)
    changed = 0
    with torch.no_grad():
        for name in mask_layers(state):
            weight = weights[name]
            bits = np.unpackbits(state[name + _MASK].numpy(), count=weight.numel())
            kept = torch.from_numpy(bits.astype(bool)).reshape(weight.shape).to(weight.device)
            changed += int(((weight != 0) & ~kept).sum())
            weight.masked_fill_(~kept, 0.0)
    return changed


def save_state(folder: Path | str, tensors: Mapping[str, torch.Tensor], grid: Mapping[str, Any] | None) -> None:
    """Write the state file into a checkpoint folder (``grid``: bits / group_size / symmetric, if quantized)."""
    from safetensors.torch import save_file

    meta = {"format": "lm-compose-compression-state-v1"}
    if grid is not None:
        meta["grid"] = json.dumps(dict(grid), sort_keys=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(folder) / STATE_FILE), metadata=meta)


def load_state(folder: Path | str) -> tuple[dict[str, torch.Tensor], Any | None]:
    """Read a checkpoint's state file: ``(tensors, quantization args or None)``; empty if there is none."""
    from safetensors import safe_open

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return {}, None
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, (_args_from_meta(meta) if "grid" in meta else None)


def read_grid(folder: Path | str) -> dict[str, Any] | None:
    """The ``grid`` metadata (bits / group_size / symmetric) of a checkpoint's state file, if any."""
    from safetensors import safe_open

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["grid"]) if "grid" in meta else None

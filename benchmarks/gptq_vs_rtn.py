"""GPTQ against round-to-nearest (RTN) at 4 bits on the built-in model: which GPTQ setting loses to plain rounding, and why.

Issue 29 item 5: with act-order off (version 1 of the ``gptq`` intervention)
symmetric 4-bit GPTQ (group 64) read perplexity 45.5 against RTN's 40.5 on the
same grid.  Both use the same grid and the same scales: llm-compressor's
weight observer (``memoryless_minmax``) on the *original* weights, computed
once before GPTQ's column loop (the reference implementation's
``--static-groups``).  GPTQ's error feedback then pushes weights of later
columns past their group's precomputed range, where they are clipped -- the
largest losses are in the ``down_proj`` layers with massive activations.
Each variant below changes one thing:

* ``rtn`` -- plain rounding (no data);
* ``gptq`` -- the intervention as it is now (act-order, llm-compressor's default ``actorder="static"``);
* ``gptq actorder=none`` -- the old default (no act-order, static groups);
* ``gptq actorder=none,dynamic_groups`` (``--all``) -- no act-order, but each group's scale
  taken from its error-updated weights when the loop reaches it (the GPTQ
  paper's reference code without ``--static-groups``; a patch of llm-compressor's
  ``quantize_weight`` made here for the measurement only);
* ``--all`` adds: dampening 0.1, block size 64, all calibration windows (32),
  calibration windows of 128 tokens, group size 32 (RTN beside it), asymmetric (RTN beside it).

Everything else is the project's: calibration windows from the built-in
calibration text (no document overlaps the held-out text), the LM head left
in full precision in both (``ignore=["lm_head"]``; it is tied to the
embeddings), perplexity with :func:`shared.evaluation.perplexity.perplexity`
on the built-in held-out text (float32, windows of 256 tokens).

    python benchmarks/gptq_vs_rtn.py                 # default table (14 min measured on 2 cores shared with other work)
    python benchmarks/gptq_vs_rtn.py --all           # every variant (several times longer)
    python benchmarks/gptq_vs_rtn.py --samples 8     # fewer calibration windows (default 16, as in compression.md)

Writes ``docs/benchmarks/gptq_vs_rtn.json`` (``--json`` to change) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_VARIANTS = ["rtn", "gptq", "gptq:actorder=none"]
EXTRA_VARIANTS = [
    "gptq:actorder=none,dynamic_groups=true",
    "gptq:dampening_frac=0.1",
    "gptq:block_size=64",
    "gptq:num_calibration_samples=32",
    "gptq:calibration_seq_len=128,num_calibration_samples=32",
    "rtn:group_size=32", "gptq:group_size=32",
    "rtn:symmetric=false", "gptq:symmetric=false",
    "gptq:actorder=none,symmetric=false",
]


def quantize_weight_dynamic_groups(weights, hessians, scale, zero_point, global_scale, quant_args,
                                   blocksize: int = 128, percdamp: float = 0.01):
    """llm-compressor's ``quantize_weight`` with the reference GPTQ's group scales (no ``--static-groups``).

    Same dampening, Cholesky factor and block updates as llm-compressor; the
    only change is that a group's scale (and zero point) is recomputed with the
    same min-max rule from the current, error-updated weights when its first
    column is reached -- and written into ``scale`` / ``zero_point`` so the
    recorded grid is the one used.  Group strategy without act-order only.
    """
    import torch
    from compressed_tensors.quantization import QuantizationStrategy, fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.helpers import factorize_hessian

    if quant_args.strategy != QuantizationStrategy.GROUP or quant_args.actorder or global_scale is not None:
        raise ValueError("dynamic groups are measured for the group strategy without act-order only")
    batch, rows, cols = weights.shape
    g = quant_args.group_size
    W = weights.to(torch.float32).clone()
    H = hessians.to(torch.float32).clone()
    fallback = torch.zeros(batch, dtype=torch.bool)
    Hinv = factorize_hessian(W, H, percdamp, fallback)
    channel = copy.copy(quant_args)
    channel.strategy = QuantizationStrategy.CHANNEL
    losses = torch.zeros(batch, rows)
    for b in range(batch):
        Wb, Hb = W[b], Hinv[b]
        s = z = None
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1, H1 = Wb[:, i1:i2].clone(), Hb[i1:i2, i1:i2]
            Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
            for i in range(i2 - i1):
                col = i1 + i
                if col % g == 0:
                    group = torch.cat([W1[:, i:], Wb[:, i2:]], dim=1)[:, :g]
                    s_new, z_new = calculate_qparams(group.amin(1, keepdim=True), group.amax(1, keepdim=True), quant_args)
                    scale[b, :, col // g] = s_new[:, 0].to(scale.dtype)
                    zero_point[b, :, col // g] = z_new[:, 0].to(zero_point.dtype)
                    s, z = scale[b, :, col // g : col // g + 1], zero_point[b, :, col // g : col // g + 1]
                w = W1[:, i]
                q = fake_quantize(w.unsqueeze(1), s, None if quant_args.symmetric else z, channel)[:, 0]
                err = (w - q) / H1[i, i]
                Q1[:, i], E1[:, i] = q, err
                losses[b] += err.square() / 2
                W1[:, i:] -= err.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            Wb[:, i1:i2] = Q1
            Wb[:, i2:] -= E1 @ Hb[i1:i2, i2:]
    return W.to(weights.dtype), losses.sum(1), fallback


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    method, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        k, v = part.split("=")
        params[k] = None if v == "none" else json.loads(v) if v[0].isdigit() or v in ("true", "false") else v
    return method, params


def run_variant(text: str, base: Any, tok: Any, data: Any, samples: int, seq_len: int) -> dict[str, Any]:
    import llmcompressor.modifiers.gptq.base as gptq_base
    from compressed_tensors.quantization import ActivationOrdering
    from llmcompressor.modifiers.quantization import GPTQModifier

    from shared.evaluation.perplexity import perplexity
    from shared.interventions import get_intervention
    from shared.interventions._llmcompressor import run_oneshot
    from shared.interventions._quantization import finish_quantization

    method, params = parse_variant(text)
    model = copy.deepcopy(base)
    impl = get_intervention(method)
    start = time.perf_counter()
    if method == "rtn":
        record = impl.apply(model, tok, impl.parse_params(params), data)
    elif "actorder" not in params and "dynamic_groups" not in params:
        p = impl.parse_params({"num_calibration_samples": samples, "calibration_seq_len": seq_len, **params})
        record = impl.apply(model, tok, p, data)  # the intervention itself
    else:
        actorder = params.pop("actorder", "static")
        dynamic = bool(params.pop("dynamic_groups", False))
        p = impl.parse_params({"num_calibration_samples": samples, "calibration_seq_len": seq_len, **params})
        modifier = GPTQModifier(
            config_groups={"block_linear": p.scheme()}, ignore=["lm_head"], block_size=p.block_size,
            dampening_frac=p.dampening_frac, actorder=ActivationOrdering(actorder) if actorder else None,
        )
        original = gptq_base.quantize_weight
        if dynamic:
            gptq_base.quantize_weight = quantize_weight_dynamic_groups
        try:
            facts = run_oneshot(model, tok, modifier, p, data.texts("calibration"))
        finally:
            gptq_base.quantize_weight = original
        record = finish_quantization("gptq", model, p, facts)
    seconds = time.perf_counter() - start
    c = record["compression"]
    return {
        "variant": text,
        "bits": c["bits"], "group_size": c["group_size"], "symmetric": c["symmetric"],
        "num_calibration_samples": c["num_calibration_samples"], "calibration_seq_len": c["calibration_seq_len"],
        "perplexity": round(perplexity(model, tok, data.texts("perplexity"), max_length=256), 3),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="also the extra variants (dampening, block size, calibration, grids)")
    ap.add_argument("--only", action="append", help="a variant like gptq:actorder=none (repeatable)")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (default 16, as the compression.md table)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")), help="torch threads")
    ap.add_argument("--json", default=str(REPO / "docs" / "benchmarks" / "gptq_vs_rtn.json"))
    args = ap.parse_args()

    import torch

    from shared.data import DataConfig, ExperimentData
    from shared.evaluation.perplexity import perplexity
    from shared.models import load_model, materialize_base, source_identity

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    try:  # llm-compressor logs every layer through loguru
        from loguru import logger

        logger.disable("llmcompressor")
    except ImportError:
        pass
    folder = Path.home() / ".cache" / "lm-compose" / f"bench-{source_identity('builtin:smollm2-135m')}"
    if not (folder / "config.json").is_file():
        materialize_base("builtin:smollm2-135m", folder)
    base, tok = load_model(folder)
    data = ExperimentData(DataConfig())
    variants = args.only or DEFAULT_VARIANTS + (EXTRA_VARIANTS if args.all else [])
    rows = [{"variant": "none", "perplexity": round(perplexity(base, tok, data.texts("perplexity"), max_length=256), 3)}]
    columns = ["variant", "perplexity", "seconds", "num_calibration_samples", "calibration_seq_len"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    print(f"| none | {rows[0]['perplexity']} | | | |", flush=True)
    for v in variants:
        row = run_variant(v, base, tok, data, args.samples, args.seq_len)
        rows.append(row)
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |", flush=True)
    out = {
        "model": "builtin:smollm2-135m (float32)",
        "grid": "4 bits, group 64, symmetric unless the variant says otherwise; LM head full precision",
        "perplexity_text": "built-in held-out text, windows of 256 tokens",
        "threads": args.threads,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

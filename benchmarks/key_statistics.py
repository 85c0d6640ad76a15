"""Convergence of the locate-then-edit editors' key statistics on the built-in model (issue 29, item 3).

MEMIT, ROME and AlphaEdit weight their updates with ``C = E[k kᵀ]`` of the
1536-wide down_proj inputs, estimated from ``stats_tokens`` tokens of the
retain corpus.  ROME's edit direction is ``C⁻¹ k*`` (``k*``: the key at an
edit's subject token).  This script measures how that direction converges with
the token count ``n``:

* the pool is all the text the project ships (the retain, calibration,
  forget and perplexity corpora, the edit records' prompts, the 4-choice
  questions) plus text sampled from the model itself, cut into 256-token
  windows and shuffled (seed 0);
* one pass accumulates the sums of layers 3-7 (MEMIT's and AlphaEdit's
  default layers; ROME's default layer 5 is among them) and snapshots them at
  n = 512, 1024, ... and at the whole pool;
* per n and layer: the mean / minimum cosine of ``C_n⁻¹ k*`` (built-in edits,
  unedited model) against the estimate of the whole pool, for the plain
  estimate (ROME's relative ridge 1e-6) and for Ledoit-Wolf shrinkage
  (tokens as samples, and windows as samples); the cosine of two *disjoint*
  n-token estimates (no nesting with the reference); MEMIT's solve
  ``(λC + KKᵀ)⁻¹K`` (λ = 5000, the first 10 edits) against the reference; and
  the run-time stability figure the editors record
  (:func:`shared.interventions._memit_stats.split_half_stability` on the
  first n tokens), so it can be checked against the real error.

    OMP_NUM_THREADS=1 python benchmarks/key_statistics.py --json docs/benchmarks/key_statistics.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

LAYERS = (3, 4, 5, 6, 7)
ROME_LAYER = 5
RIDGE = 1e-6
LAMBDA = 5000.0
SEQ_LEN = 256


def _shipped_texts() -> dict[str, list[str]]:
    from shared.data import BUILTIN_DIR, BUILTIN_FILES

    out: dict[str, list[str]] = {}
    for field in ("retain_corpus", "calibration", "forget_corpus", "perplexity"):
        out[field] = [json.loads(line)["text"] for line in open(BUILTIN_DIR / BUILTIN_FILES[field], encoding="utf-8") if line.strip()]
    edits = []
    for line in open(BUILTIN_DIR / BUILTIN_FILES["edits"], encoding="utf-8"):
        if line.strip():
            r = json.loads(line)
            reph = r["rephrase"] if isinstance(r["rephrase"], list) else [r["rephrase"]]
            edits.append(" ".join([f"{r['src']} {r['alt']}.", *reph, f"{r['loc']} {r['loc_ans']}."]))
    out["edits"] = edits
    mcq = []
    for field in ("utility_mcq", "forget_mcq"):
        for line in open(BUILTIN_DIR / BUILTIN_FILES[field], encoding="utf-8"):
            if line.strip():
                r = json.loads(line)
                mcq.append(r["question"] + " " + " ".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(r["choices"])))
    out["mcq"] = mcq
    return out


def _generated(model, tok, texts: list[str], tokens: int, path: Path | None, batch: int = 64, new: int = 128) -> list[str]:
    """``tokens`` tokens sampled from the model (top-p 0.95), prompted with the first words of shipped documents."""
    if tokens <= 0:
        return []
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("tokens") == tokens:
            return cached["texts"]
    torch.manual_seed(0)
    prompts = [" ".join(t.split()[:6]) for t in texts]
    random.Random(0).shuffle(prompts)
    tok.padding_side = "left"
    out: list[str] = []
    done = 0
    i = 0
    while done < tokens:
        chunk = [prompts[(i + j) % len(prompts)] for j in range(batch)]
        i += batch
        enc = tok(chunk, return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=True, top_p=0.95, temperature=1.0, max_new_tokens=new,
                                 pad_token_id=tok.eos_token_id)
        for row in ids[:, enc["input_ids"].shape[1]:]:
            out.append(tok.decode(row, skip_special_tokens=True))
        done += batch * new
        print(f"generated {done} tokens", file=sys.stderr, flush=True)
    if path is not None:
        path.write_text(json.dumps({"tokens": tokens, "texts": out}))
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the measurement as JSON")
    parser.add_argument("--generate-tokens", type=int, default=0, help="tokens of model-sampled text added to the pool (slow on a CPU: ~50 tokens/s on one thread)")
    parser.add_argument("--generated-cache", default=None, help="file keeping the sampled text between runs")
    parser.add_argument("--num-edits", type=int, default=50, help="edits whose keys k* are probed")
    parser.add_argument("--max-tokens", type=int, default=0, help="cap the pool (0: everything)")
    parser.add_argument("--model-dir", default=None, help="an already materialized builtin:smollm2-135m folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from shared.data import DataConfig, ExperimentData
    from shared.interventions._calibration import calibration_windows
    from shared.interventions._memit_stats import (
        key_moment_sums,
        ledoit_wolf_intensity,
        ridge_solve,
        shrink,
        split_half_stability,
    )
    from shared.interventions.memit import edit_sites, keys_and_values
    from shared.models import load_model, materialize_base

    started = time.time()
    tmp = None
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="lmcompose-keystats-")
        model_dir = Path(tmp.name)
        materialize_base("builtin:smollm2-135m", model_dir)
    model, tok = load_model(model_dir)
    model.eval()

    sources = _shipped_texts()
    gen_path = Path(args.generated_cache) if args.generated_cache else None
    t0 = time.time()
    sources["generated"] = _generated(model, tok, sources["retain_corpus"] + sources["calibration"], args.generate_tokens, gen_path)
    gen_seconds = time.time() - t0
    windows, per_source = [], {}
    for name, texts in sources.items():
        if not texts:
            continue
        w = calibration_windows(tok, texts, 10**6, SEQ_LEN)
        w = [x for x in w if len(x) == SEQ_LEN]  # equal lengths: every batch is full, parity is by window
        per_source[name] = len(w) * SEQ_LEN
        windows += w
    random.Random(0).shuffle(windows)
    if args.max_tokens:
        windows = windows[: max(2, args.max_tokens // SEQ_LEN)]
    total = len(windows) * SEQ_LEN
    checkpoints = [n for n in (512 * 2**j for j in range(20)) if n < total] + [total]
    print(f"pool: {total} tokens in {len(windows)} windows {per_source}", file=sys.stderr, flush=True)

    # the probe keys: k* of the built-in edits (and MEMIT's 10-edit batch), on the unedited model
    data = ExperimentData(DataConfig(num_edits=args.num_edits))
    sites = edit_sites(tok, list(data.edits), "{} is a")
    kstar = {layer: keys_and_values(model, tok, sites, layer, layer)[0].double().T for layer in LAYERS}  # (d, m)

    snaps: dict[int, dict[int, dict[str, torch.Tensor | float]]] = {}
    prev: dict[tuple[int, int], torch.Tensor] = {}

    def evaluate(layer: int, s: torch.Tensor, n: int, fourth: float, window_frob: float, m: int) -> dict:
        c = s / n
        k = kstar[layer]
        rho = ledoit_wolf_intensity(c, n, fourth)
        # windows as the samples: W_j = (1/L) Σ_{t∈j} k kᵀ, Σ_j ‖W_j‖²_F accumulated per batch
        rho_w = ledoit_wolf_intensity(c, m, window_frob)
        k10 = k[:, :10]
        out = {
            "plain": ridge_solve(c, k, RIDGE),
            "lw": ridge_solve(shrink(c, rho), k, RIDGE),
            "lw_window": ridge_solve(shrink(c, rho_w), k, RIDGE),
            "memit": torch.linalg.solve(LAMBDA * c + k10 @ k10.T, k10),
            "rho": rho,
            "rho_window": rho_w,
        }
        if layer == ROME_LAYER:
            ev = torch.linalg.eigvalsh(c)
            out["condition"] = float(ev[-1] / ev[0].clamp_min(1e-30))
        return out

    frob_w = {layer: 0.0 for layer in LAYERS}
    seen = [0]

    def on_batch(done: int, acc: dict) -> None:
        # per-window ‖W_j‖²_F for the windows-as-samples Ledoit-Wolf (from the batch just added)
        for layer, a in acc.items():
            batch_keys = last_batch[layer]
            for row in batch_keys:
                w = (row.T @ row).double() / row.shape[0]
                frob_w[layer] += float((w * w).sum())
        n = done * SEQ_LEN
        if n not in checkpoints:
            return
        t = time.time()
        snaps[n] = {}
        for layer, a in acc.items():
            s = a.total().clone()
            e = evaluate(layer, s, n, a.fourth, frob_w[layer], done)
            e["stability"] = a.stability()
            if (n // 2, layer) in prev:  # disjoint halves: the first n/2 tokens against the next n/2
                first = prev[(n // 2, layer)]
                u1 = ridge_solve(first / (n // 2), kstar[layer], RIDGE)
                u2 = ridge_solve((s - first) / (n - n // 2), kstar[layer], RIDGE)
                e["disjoint_half"] = _cos(u1, u2)
            snaps[n][layer] = e
            prev[(n, layer)] = s  # keep only what the next checkpoint needs
        for old in [x for x in prev if x[0] < n // 2]:
            del prev[old]
        # the stability figure's own probes vs the edit keys: split-half cosine on k* with the same halves
        print(f"checkpoint {n} tokens ({time.time() - t:.1f}s evaluation, {time.time() - started:.0f}s so far)", file=sys.stderr, flush=True)

    last_batch: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for layer in LAYERS:
        def grab(_m, a, layer=layer):
            last_batch[layer] = list(a[0].detach().float())
        hooks.append(model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(grab))
    t0 = time.time()
    try:
        key_moment_sums(model, windows, LAYERS, batch_size=2, on_batch=on_batch)
    finally:
        for h in hooks:
            h.remove()
    pass_seconds = time.time() - t0

    ref = snaps[total]
    rows = []
    for n in checkpoints:
        for layer in LAYERS:
            e = snaps[n][layer]
            row = {
                "tokens": n,
                "layer": layer,
                "plain_cos": _cos(e["plain"], ref[layer]["plain"]),
                "lw_cos": _cos(e["lw"], ref[layer]["lw"]),
                "lw_vs_plain_ref": _cos(e["lw"], ref[layer]["plain"]),
                "lw_window_cos": _cos(e["lw_window"], ref[layer]["lw_window"]),
                "lw_window_vs_plain_ref": _cos(e["lw_window"], ref[layer]["plain"]),
                "memit_cos": _cos(e["memit"], ref[layer]["memit"]),
            }
            summary = {}
            for key, v in row.items():
                if isinstance(v, torch.Tensor):
                    summary[key] = round(float(v.mean()), 4)
                    summary[key.replace("_cos", "") + "_min" if key.endswith("_cos") else key + "_min"] = round(float(v.min()), 4)
                else:
                    summary[key] = v
            if "disjoint_half" in e:
                summary["disjoint_half_cos"] = round(float(e["disjoint_half"].mean()), 4)
            summary["stability"] = round(e["stability"], 4) if not math.isnan(e["stability"]) else None
            summary["lw_intensity"] = round(e["rho"], 4)
            summary["lw_window_intensity"] = round(e["rho_window"], 4)
            if "condition" in e:
                summary["condition"] = float(f"{e['condition']:.3g}")
            rows.append(summary)

    result = {
        "model": "builtin:smollm2-135m",
        "layers": list(LAYERS),
        "rome_layer": ROME_LAYER,
        "seq_len": SEQ_LEN,
        "pool_tokens": total,
        "pool_sources": per_source,
        "num_edit_keys": len(sites),
        "ridge": RIDGE,
        "memit_lambda": LAMBDA,
        "generate_seconds": round(gen_seconds, 1),
        "pass_seconds": round(pass_seconds, 1),
        "seconds": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    cols = ["tokens", "layer", "plain_cos", "plain_min", "lw_cos", "lw_vs_plain_ref", "lw_window_cos",
            "lw_window_vs_plain_ref", "memit_cos", "disjoint_half_cos", "stability", "lw_intensity", "lw_window_intensity"]
    print(" | ".join(cols))
    for r in rows:
        if r["layer"] == ROME_LAYER:
            print(" | ".join(str(r.get(c, "")) for c in cols))
    print("all layers, mean over layers:")
    for n in checkpoints:
        sel = [r for r in rows if r["tokens"] == n]
        print(n, {c: round(sum(r[c] for r in sel) / len(sel), 4) for c in ("plain_cos", "lw_cos", "lw_vs_plain_ref", "memit_cos")
                  }, "stability", [r["stability"] for r in sel])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    del split_half_stability
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

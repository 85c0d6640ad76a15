"""Time, peak memory and perplexity of each compressor on the built-in model on this machine.

Each setting runs in a fresh Python process, so its peak resident memory
(``ru_maxrss``) is its own: loading SmolLM2-135M (float32), compressing it with
the given calibration budget, snapping it to its grid / mask, and measuring
perplexity on the built-in held-out text (float32, windows of 256 tokens).

    python benchmarks/compressors.py                       # the default table
    python benchmarks/compressors.py --only gptq:bits=8    # one setting
    python benchmarks/compressors.py --json out.json       # also write the rows as JSON

Peak memory includes the Python process and the float32 model (about 0.54 GB
of weights); the interesting number is the difference to the ``none`` row.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULT_SETTINGS = [
    "none",
    "wanda:sparsity=0.25", "wanda:sparsity=0.5",
    "sparsegpt:sparsity=0.25", "sparsegpt:sparsity=0.5",
    "gptq:bits=8", "gptq:bits=4", "gptq:bits=3", "gptq:bits=2",
    "awq:bits=8", "awq:bits=4", "awq:bits=3",
]


def parse_setting(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    params = {}
    for part in filter(None, rest.split(",")):
        k, v = part.split("=")
        params[k] = json.loads(v)
    return method, params


def run_one(setting: str, samples: int, seq_len: int, model_dir: str) -> dict:
    """Child process: compress once and report."""
    sys.path.insert(0, str(REPO))
    import torch

    from shared.data import DataConfig, ExperimentData
    from shared.evaluation.compression import measure_compression
    from shared.evaluation.perplexity import perplexity
    from shared.interventions import get_intervention
    from shared.models import default_threads, load_model

    default_threads()
    model, tok = load_model(Path(model_dir))
    data = ExperimentData(DataConfig())
    method, params = parse_setting(setting)
    record: dict = {}
    seconds = 0.0
    if method != "none":
        impl = get_intervention(method)
        p = impl.parse_params({**params, "num_calibration_samples": samples, "calibration_seq_len": seq_len})
        torch.manual_seed(0)
        start = time.perf_counter()
        record = impl.apply(model, tok, p, data)
        seconds = time.perf_counter() - start
    ppl = perplexity(model, tok, data.texts("perplexity"), max_length=256)
    comp = measure_compression(model, record.get("compression"))
    return {
        "setting": setting,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "perplexity": round(ppl, 3),
        "sparsity": round(comp["sparsity"], 4),
        "avg_bits": round(comp["avg_bits"], 3),
    }


def ensure_model(folder: Path) -> str:
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(REPO))
        from shared.models import materialize_base

        materialize_base("builtin:smollm2-135m", folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="setting like gptq:bits=4 (repeatable; default: the table)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache" / "lm-compose" / "bench-smollm2-f32"))
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args.samples, args.seq_len, args.model_dir)), flush=True)
        return
    model_dir = ensure_model(Path(args.model_dir))
    rows = []
    print("| setting | seconds | peak RSS (GB) | perplexity | sparsity | avg bits |")
    print("|---|---|---|---|---|---|")
    for setting in args.only or DEFAULT_SETTINGS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", setting, "--samples", str(args.samples),
             "--seq-len", str(args.seq_len), "--model-dir", model_dir],
            capture_output=True, text=True,
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"| {setting} | FAILED: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode} |")
            continue
        row = json.loads(line[7:])
        rows.append(row)
        print(f"| {row['setting']} | {row['seconds']} | {row['peak_rss_gb']} | {row['perplexity']} | "
              f"{row['sparsity']} | {row['avg_bits']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Time, peak memory and quality of each intervention on the built-in model on this machine.

Each setting runs in a fresh Python process, so its peak resident memory
(``ru_maxrss``) is its own: loading SmolLM2-135M (float32), applying the
intervention, and measuring perplexity on the built-in held-out text (float32,
windows of 256 tokens) -- plus, for editors, edit success on the edit batch and
edits per second.

    python benchmarks/interventions.py                          # compressors (the default suite)
    python benchmarks/interventions.py --suite edit             # editors, 10 built-in edits
    python benchmarks/interventions.py --suite unlearn          # unlearners: forget / utility accuracy
    python benchmarks/interventions.py --only gptq:bits=8       # one setting
    python benchmarks/interventions.py --json out.json          # also write the rows as JSON

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

SUITES = {
    "compress": [
        "none",
        "wanda:sparsity=0.25", "wanda:sparsity=0.5",
        "sparsegpt:sparsity=0.25", "sparsegpt:sparsity=0.5",
        "gptq:bits=8", "gptq:bits=4", "gptq:bits=3", "gptq:bits=2",
        "awq:bits=8", "awq:bits=4", "awq:bits=3",
        "rtn:bits=8", "rtn:bits=4", "rtn:bits=3",
        "autoround:bits=4", "autoround:bits=3",
    ],
    "edit": ["none", "ft", "lora", "memit", "rome", "alphaedit"],
    "unlearn": ["none", "ga", "gd", "rmu", "npo", "simnpo"],
}


def parse_setting(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    params = {}
    for part in filter(None, rest.split(",")):
        k, v = part.split("=")
        params[k] = json.loads(v)
    return method, params


def run_one(setting: str, samples: int, seq_len: int, model_dir: str, num_edits: int, suite: str) -> dict:
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
    data = ExperimentData(DataConfig(num_edits=num_edits))
    method, params = parse_setting(setting)
    record: dict = {}
    seconds = 0.0
    impl = get_intervention(method) if method != "none" else None
    if impl is not None:
        if impl.needs_calibration:
            params = {"num_calibration_samples": samples, "calibration_seq_len": seq_len, **params}
        p = impl.parse_params(params)
        torch.manual_seed(0)
        start = time.perf_counter()
        record = impl.apply(model, tok, p, data)
        seconds = time.perf_counter() - start
    ppl = perplexity(model, tok, data.texts("perplexity"), max_length=256)
    comp = measure_compression(model, record.get("compression"))
    row = {
        "setting": setting,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "perplexity": round(ppl, 3),
        "sparsity": round(comp["sparsity"], 4),
        "avg_bits": round(comp["avg_bits"], 3),
    }
    if suite == "edit":
        from shared.evaluation.edit import evaluate_edits

        edits = evaluate_edits(model, tok, data.edits)
        row["edits_per_second"] = round(num_edits / seconds, 3) if seconds else None
        row.update({k: round(float(v), 3) for k, v in edits.items()})
    if suite == "unlearn":
        from shared.evaluation import EvalOptions, get_evaluator

        for name in ("forget", "utility"):
            row.update({k: round(float(v), 3) for k, v in get_evaluator(name)(model, tok, data, EvalOptions()).items()})
    return row


def ensure_model(folder: Path) -> str:
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(REPO))
        from shared.models import materialize_base

        materialize_base("builtin:smollm2-135m", folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="compress", help="which default table (default: compress)")
    ap.add_argument("--only", action="append", help="setting like gptq:bits=4 (repeatable; default: the suite)")
    ap.add_argument("--num-edits", type=int, default=10, help="edits in the batch (editors; default 10)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    ap.add_argument("--model-dir", default=None,
                    help="float32 copy of the built-in model (default: a cache folder named by the GGUF and tokenizer version)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args.samples, args.seq_len, args.model_dir, args.num_edits, args.suite)),
              flush=True)
        return
    if args.model_dir is None:
        sys.path.insert(0, str(REPO))
        from shared.models import source_identity

        args.model_dir = str(Path.home() / ".cache" / "lm-compose" / f"bench-{source_identity('builtin:smollm2-135m')}")
    model_dir = ensure_model(Path(args.model_dir))
    rows = []
    columns = ["setting", "seconds", "peak_rss_gb", "perplexity", "sparsity", "avg_bits"]
    if args.suite == "edit":
        columns += ["edits_per_second", "edit_success", "edit_generalization", "edit_locality"]
    if args.suite == "unlearn":
        columns += ["forget_acc", "utility_acc"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for setting in args.only or SUITES[args.suite]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", setting, "--samples", str(args.samples),
             "--seq-len", str(args.seq_len), "--model-dir", model_dir, "--num-edits", str(args.num_edits),
             "--suite", args.suite],
            capture_output=True, text=True,
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"| {setting} | FAILED: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode} |")
            continue
        row = json.loads(line[7:])
        rows.append(row)
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

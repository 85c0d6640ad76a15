"""Time and peak memory of every intervention and evaluator on a GPU, through the library entry points.

Run by ``benchmarks/gpu_check.sh`` (docs/gpu.md).  What it does, in order, each
step through the functions the components call (``shared.model_tasks``:
``prepare_base_model``, ``apply_to_model``, ``evaluate_model``) against a
local-folder store, with ``LMCOMPOSE_DEVICE`` / ``LMCOMPOSE_STEP_DTYPE`` set so
that every model is loaded on the device in bfloat16:

1. random-weight Llama models built from a config (no download; times and
   memory depend on shapes, not on values): SmolLM2-135M's shape, and the
   layers of Llama-3-8B (hidden 4096, MLP 14336, 32/8 heads, vocabulary 128256)
   at two layer counts;
2. at SmolLM2's shape: each of the ten interventions once on the base model,
   every evaluator once (one load, as the ``evaluate`` component does), and one
   two-step composition (``ft`` after ``wanda``);
3. at the 8B shape: each intervention and the evaluators at both layer counts;
   a straight line through the two points gives the cost per decoder layer and
   the fixed part, extrapolated to the 32-layer model.

Every step records wall seconds (load + compute + save, as a task spends them),
the compute seconds the library records, and the peak GPU memory
(``torch.cuda.max_memory_allocated``).  A step that fails is recorded with its
error and the run goes on; a step that would start after ``--budget-s`` is
recorded as skipped.  ``results.json`` is rewritten after every step, so a run
cut short still leaves what it measured.

Outputs (under ``--out``): ``results.json`` (every row), ``cost_table.json``
(a :class:`shared.estimate.CostTable` for ``lmcompose plan --estimate --cost
FILE``), ``summary.md`` (the tables docs/gpu.md records).

``--cpu`` is the dry run: the same code on the CPU with tiny shapes and quick
parameters (a few minutes on two cores); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("ft", "lora", "memit", "ga", "gd", "rmu", "wanda", "sparsegpt", "gptq", "awq")
EVALUATORS = ("edit", "utility", "forget", "perplexity", "compression")
COMPOSITION = ("wanda", "ft")  # ft applied to the wanda-pruned model
TARGET_LAYERS = 32  # Llama-3-8B

#: model shapes (transformers LlamaConfig fields); the vocabulary of SmolLM2's is its tokenizer's
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                      max_position_embeddings=8192, rope_theta=500000.0),
}
#: --cpu: the same structure, tiny (the dry run checks the code path, not the figures)
CPU_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(SHAPES["smollm2-135m"], hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2),
    "llama3-8b": dict(SHAPES["llama3-8b"], hidden_size=64, intermediate_size=192, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=49152),
}
GPU_LAYERS_8B = (5, 10)  # rmu's default layer (8) fits in 10; both counts hold 5 edited layers
CPU_LAYERS_8B = (3, 5)

#: --cpu: quick parameters (the GPU run uses every method's defaults, what a study runs)
CPU_PARAMS: dict[str, dict[str, Any]] = {
    "ft": {"steps": 2}, "lora": {"steps": 2}, "memit": {"v_steps": 2, "stats_tokens": 256, "stats_seq_len": 32},
    "ga": {"steps": 2, "seq_len": 32}, "gd": {"steps": 2, "seq_len": 32},
    "rmu": {"num_batches": 2, "seq_len": 32},
    "wanda": {"num_calibration_samples": 4, "calibration_seq_len": 32},
    "sparsegpt": {"num_calibration_samples": 4, "calibration_seq_len": 32},
    "gptq": {"num_calibration_samples": 4, "calibration_seq_len": 32},
    "awq": {"num_calibration_samples": 4, "calibration_seq_len": 32, "n_grid": 4},
}
DATA = {"num_edits": 10}
CPU_DATA = {"num_edits": 4}
EVAL_OPTIONS = {"dtype": "bfloat16", "batch_size": 16, "max_length": 256}
CPU_EVAL_OPTIONS = {"dtype": "bfloat16", "batch_size": 4, "max_length": 32, "limit": 8}


def fit_layers(method: str, params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The method's parameters with its layer choices moved inside a model of ``num_layers`` layers.

    A layer list keeps its length (so both layer counts of the 8B shape edit as
    many layers and the line through them measures depth only); out-of-range
    lists become the last layers of the model; rmu's layer becomes the last one.
    """
    from shared.interventions import get_intervention

    full = get_intervention(method).parse_params(params).model_dump(mode="json")
    out = dict(params)
    layers = full.get("layers")
    if isinstance(layers, list) and layers and max(layers) >= num_layers:
        n = min(len(layers), num_layers)
        out["layers"] = list(range(num_layers - n, num_layers))
    if method == "rmu" and full["layer"] >= num_layers:
        out["layer"] = max(2, num_layers - 1)
    return out


class Recorder:
    """Rows of results.json, written after every step; the budget guard."""

    def __init__(self, out: Path, meta: dict[str, Any], budget_s: float) -> None:
        self.out, self.meta, self.budget_s = out, meta, budget_s
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()

    def over_budget(self) -> bool:
        return time.time() - self.started > self.budget_s

    def run(self, row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.over_budget():
            row.update(status="skipped", error=f"budget of {self.budget_s:.0f} s spent")
            return self._add(row)
        cuda = torch.cuda.is_available() and os.environ.get("LMCOMPOSE_DEVICE", "cpu").startswith("cuda")
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            row.update(fn())
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                       traceback=traceback.format_exc()[-4000:])
        row["wall_s"] = round(time.time() - t0, 3)
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
        return self._add(row)

    def _add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        status = row.get("status")
        extra = f"{row.get('wall_s', 0):.1f} s" + (f", {row['peak_gpu_mib']:.0f} MiB" if row.get("peak_gpu_mib") else "")
        print(f"[{time.time() - self.started:6.0f} s] {row['shape']:>12} L={row['layers']:<3} {row['kind']:>10} "
              f"{row['name']:<16} {status:>7}  {extra}" + (f"  {row.get('error', '')[:200]}" if status != "ok" else ""),
              flush=True)
        self.save()
        return row

    def save(self) -> None:
        doc = {**self.meta, "elapsed_s": round(time.time() - self.started, 1), "rows": self.rows}
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.out / "results.json")


def build_model(folder: Path, shape: dict[str, Any], num_layers: int, tokenizer: Any, device: str) -> None:
    """A random-weight Llama of ``shape`` with ``num_layers`` layers, saved (bf16 safetensors) at ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shared.models import save_model

    config = LlamaConfig(**{**shape, "num_hidden_layers": num_layers},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    save_model(model, tokenizer, folder)
    del model


def load_tokenizer(folder: str | None) -> Any:
    """SmolLM2's tokenizer: from ``folder`` (carried to the device) or from the built-in GGUF."""
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from shared.models import _load_builtin_tokenizer

    return _load_builtin_tokenizer()


def _drop_checkpoint(store_uri: str, key: str) -> None:
    """Free the disk a large checkpoint holds (the 8B-shape runs write several GB per step)."""
    folder = Path(store_uri) / key
    if folder.is_dir() and Path(store_uri) in folder.parents:
        shutil.rmtree(folder, ignore_errors=True)


class Shape:
    """One model (a shape at a layer count) in its own store: built, prepared, then stepped and evaluated."""

    def __init__(self, rec: Recorder, args: argparse.Namespace, name: str, num_layers: int, work: Path) -> None:
        self.rec, self.args, self.name, self.num_layers = rec, args, name, num_layers
        tag = f"{name}-L{num_layers}"
        self.folder, self.store_uri = work / "models" / tag, str(work / "stores" / tag)
        self.common = {"shape": name, "layers": num_layers}
        self.params_for = CPU_PARAMS if args.cpu else {}
        self.data = CPU_DATA if args.cpu else DATA
        self.options = CPU_EVAL_OPTIONS if args.cpu else EVAL_OPTIONS
        self.base: Any = None
        self.kept: dict[str, Any] = {}

    def prepare(self, tokenizer: Any) -> bool:
        """Build the random model and put it into the store (``prepare_base``); False if either failed."""
        from shared.model_tasks import prepare_base_model

        shape = (CPU_SHAPES if self.args.cpu else SHAPES)[self.name]
        self.rec.run({**self.common, "kind": "build", "name": "random-init"},
                     lambda: build_model(self.folder, shape, self.num_layers, tokenizer, self.args.device) or {})

        def prepare() -> dict[str, Any]:
            self.base, meta = prepare_base_model(str(self.folder), self.store_uri)
            return {"size_bytes": meta.get("size_bytes")}

        self.rec.run({**self.common, "kind": "prepare", "name": "prepare_base"}, prepare)
        shutil.rmtree(self.folder, ignore_errors=True)  # the store holds it now
        return self.base is not None

    def step(self, method: str, parent: Any = None, keep: bool = False, drop: bool = False,
             kind: str = "intervention", label: str | None = None) -> None:
        """``apply_to_model`` once; ``keep`` remembers the result (for a composition), ``drop`` frees its disk."""
        from shared.model_tasks import apply_to_model
        from shared.store import open_store

        def go() -> dict[str, Any]:
            params = fit_layers(method, self.params_for.get(method, {}), self.num_layers)
            ref, _meta = apply_to_model(parent or self.base, method, params, dict(self.data))
            record = open_store(self.store_uri).checkpoint_meta(ref.key)["records"][-1]
            if keep:
                self.kept[method] = ref
            elif drop:
                _drop_checkpoint(self.store_uri, ref.key)
            return {"compute_s": round(float(record["seconds"]), 3), "params": params}

        self.rec.run({**self.common, "kind": kind, "name": label or method}, go)

    def evaluate(self) -> None:
        """Every evaluator on the base model in one ``evaluate_model`` call (one load), each one's seconds."""
        from shared.execution import evaluation_config
        from shared.model_tasks import data_for, evaluate_model
        from shared.store import open_store, result_key

        def go() -> dict[str, Any]:
            results = evaluate_model(self.base, list(EVALUATORS), self.data, self.options)
            store, data = open_store(self.store_uri), data_for(self.data)
            seconds = {e: round(float(store.get_json(result_key(self.base.key, e, evaluation_config(e, data, self.options)))["seconds"]), 3)
                       for e in EVALUATORS}
            return {"evaluator_s": seconds, "criteria": results}

        self.rec.run({**self.common, "kind": "evaluate", "name": "+".join(EVALUATORS)}, go)

    def composition(self) -> None:
        first, second = COMPOSITION
        if first in self.kept:
            self.step(second, parent=self.kept[first], kind="composition", label=" > ".join(COMPOSITION))


def run_all(rec: Recorder, args: argparse.Namespace, tokenizer: Any, work: Path, layers_8b: tuple[int, ...]) -> None:
    """SmolLM2's shape (steps, evaluators, composition), then the 8B shape at both layer counts side by
    side -- each method at both counts before the next method, so a run cut short by the budget
    still has both points of every method it reached."""
    small_layers = (CPU_SHAPES if args.cpu else SHAPES)["smollm2-135m"]["num_hidden_layers"]
    small = Shape(rec, args, "smollm2-135m", small_layers, work)
    if small.prepare(tokenizer):
        for method in METHODS:
            small.step(method, keep=method == COMPOSITION[0])
        small.evaluate()
        small.composition()
    if args.skip_8b:
        return
    big = [Shape(rec, args, "llama3-8b", n, work) for n in layers_8b]
    big = [b for b in big if b.prepare(tokenizer)]
    for method in METHODS:
        for b in big:
            b.step(method, drop=True)
    for b in big:
        b.evaluate()


# -- figures: per layer, extrapolated, as a CostTable ------------------------------------------------


def _line(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(fixed, per_layer) of the line through two (layers, value) points."""
    if len(points) < 2 or points[0][0] == points[1][0]:
        return None
    (l1, v1), (l2, v2) = sorted(points)[:2]
    per_layer = (v2 - v1) / (l2 - l1)
    return v1 - per_layer * l1, per_layer


def extrapolate(rows: list[dict[str, Any]], target_layers: int = TARGET_LAYERS) -> dict[str, dict[str, Any]]:
    """Per item measured at the 8B shape: fixed + per-layer parts and the value at ``target_layers``."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        if row["shape"] != "llama3-8b" or row.get("status") != "ok":
            continue
        values: dict[str, float] = {}
        if row["kind"] == "intervention":
            values = {f"step/{row['name']}/compute_s": row["compute_s"], f"step/{row['name']}/wall_s": row["wall_s"]}
            if row.get("peak_gpu_mib") is not None:
                values[f"step/{row['name']}/peak_gpu_mib"] = row["peak_gpu_mib"]
        elif row["kind"] == "evaluate":
            values = {f"evaluator/{e}/compute_s": s for e, s in row["evaluator_s"].items()}
            values["evaluate/load_s"] = row["wall_s"] - sum(row["evaluator_s"].values())
            if row.get("peak_gpu_mib") is not None:
                values["evaluate/peak_gpu_mib"] = row["peak_gpu_mib"]
        elif row["kind"] == "prepare":
            values = {"prepare_base/wall_s": row["wall_s"]}
        for name, value in values.items():
            series.setdefault(name, []).append((row["layers"], float(value)))
    out = {}
    for name, points in sorted(series.items()):
        line = _line(points)
        if line is None:
            continue
        fixed, per_layer = line
        out[name] = {"points": sorted(points), "fixed": round(fixed, 3), "per_layer": round(per_layer, 4),
                     f"at_{target_layers}_layers": round(max(0.0, fixed + per_layer * target_layers), 2)}
    return out


def cost_table(meta: dict[str, Any], extrapolated: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A CostTable document: measured (extrapolated) figures where there are any, the estimates elsewhere."""
    from dataclasses import asdict

    from shared.estimate import LLAMA3_8B_A100

    key = f"at_{TARGET_LAYERS}_layers"
    doc = asdict(LLAMA3_8B_A100)
    where = f"measured by benchmarks/gpu_check.sh on {meta['device']} ({meta['date']}, commit {meta['commit']}), " \
            f"random Llama-3-8B-shaped layers at {meta['layers_8b']} layers, extrapolated to {TARGET_LAYERS}"
    sources = {}
    estimated = "estimate (docs/cost-model.md), not measured"
    for method in list(doc["step_s"]):
        figure = extrapolated.get(f"step/{method}/compute_s")
        if figure:
            doc["step_s"][method] = figure[key]
        sources[f"step_s.{method}"] = where if figure else estimated
    for evaluator in list(doc["evaluator_s"]):
        figure = extrapolated.get(f"evaluator/{evaluator}/compute_s")
        if figure:
            doc["evaluator_s"][evaluator] = figure[key]
        sources[f"evaluator_s.{evaluator}"] = where if figure else estimated
    load = extrapolated.get("evaluate/load_s")
    if load:
        doc["load_s"] = load[key]
        sources["load_s"] = where + " (checkpoint read from local disk onto the GPU; no S3 download)"
    saves = [extrapolated[f"step/{m}/wall_s"][key] - extrapolated[f"step/{m}/compute_s"][key] - (load[key] if load else 0)
             for m in METHODS if f"step/{m}/wall_s" in extrapolated and f"step/{m}/compute_s" in extrapolated]
    if saves:
        doc["save_s"] = round(max(0.0, sorted(saves)[len(saves) // 2]), 2)
        sources["save_s"] = where + " (median over methods of wall - compute - load; local disk, no S3 upload)"
    prep = extrapolated.get("prepare_base/wall_s")
    if prep:
        doc["prepare_base_s"] = prep[key]
        sources["prepare_base_s"] = where + " (a local folder; a hub download is not included)"
    for name in ("load_s", "save_s", "prepare_base_s", "collect_s", "aggregate_s"):
        sources.setdefault(name, estimated)
    doc["name"] = f"llama3-8b-{meta['device_short']}-measured" if not meta["cpu"] else "dry-run-cpu-not-figures"
    doc["sources"] = sources
    return doc


def summary(meta: dict[str, Any], rows: list[dict[str, Any]], extrapolated: dict[str, dict[str, Any]]) -> str:
    lines = [f"# gpu_check: {meta['device']}, {meta['date']}, commit {meta['commit']}", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, dtype bfloat16, "
             f"{'CPU DRY RUN (figures mean nothing)' if meta['cpu'] else 'CUDA'}", "",
             "| shape | layers | kind | name | status | wall s | compute s | peak GPU MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['layers']} | {r['kind']} | {r['name']} | {r.get('status')} | "
                     f"{r.get('wall_s', '')} | {r.get('compute_s', '')} | {r.get('peak_gpu_mib') or ''} |")
    lines += ["", f"Extrapolated to {TARGET_LAYERS} layers (fixed + per layer x {TARGET_LAYERS}):", "",
              "| figure | points (layers, value) | fixed | per layer | at 32 layers |", "|---|---|---|---|---|"]
    for name, f in extrapolated.items():
        lines.append(f"| {name} | {f['points']} | {f['fixed']} | {f['per_layer']} | {f[f'at_{TARGET_LAYERS}_layers']} |")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "Not ok:", ""] + [f"* {r['shape']} L={r['layers']} {r['name']}: {r.get('status')}: "
                                          f"{r.get('error', '')[:300]}" for r in failed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json, cost_table.json, summary.md")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU with tiny shapes")
    parser.add_argument("--work", help="models and stores (default: <out>/work); removed at the end")
    parser.add_argument("--keep-work", action="store_true", help="keep --work (models, stores) at the end")
    parser.add_argument("--tokenizer", help="a folder with SmolLM2's tokenizer (default: from the built-in GGUF)")
    parser.add_argument("--layers-8b", help="two layer counts for the 8B shape (default 5,10; --cpu 3,5)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no step after this many seconds")
    parser.add_argument("--skip-8b", action="store_true", help="SmolLM2's shape only")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    args.device = "cpu" if args.cpu else "cuda"
    os.environ["LMCOMPOSE_DEVICE"] = args.device
    os.environ["LMCOMPOSE_STEP_DTYPE"] = "bfloat16"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the dry run)", file=sys.stderr)
        return 2
    layers_8b = tuple(int(n) for n in args.layers_8b.split(",")) if args.layers_8b else (
        CPU_LAYERS_8B if args.cpu else GPU_LAYERS_8B)
    if len(layers_8b) != 2 or layers_8b[0] == layers_8b[1]:
        parser.error("--layers-8b: two different layer counts, e.g. 5,10")
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or os.environ.get("LMCOMPOSE_COMMIT", "?")
    except (OSError, subprocess.SubprocessError):
        commit = os.environ.get("LMCOMPOSE_COMMIT", "?")
    device = torch.cuda.get_device_name(0) if not args.cpu else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    meta = {"device": device, "device_short": device.split()[-1].lower() if not args.cpu else "cpu",
            "date": datetime.date.today().isoformat(), "commit": commit, "cpu": args.cpu,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "dtype": "bfloat16", "layers_8b": list(layers_8b),
            "target_layers": TARGET_LAYERS, "budget_s": args.budget_s}
    rec = Recorder(out, meta, args.budget_s)
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        run_all(rec, args, tokenizer, work, layers_8b)
    finally:
        extrapolated = extrapolate(rec.rows)
        (out / "extrapolated.json").write_text(json.dumps(extrapolated, indent=1))
        (out / "cost_table.json").write_text(json.dumps(cost_table(meta, extrapolated), indent=1))
        (out / "summary.md").write_text(summary(meta, rec.rows, extrapolated))
        rec.save()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in rec.rows if r.get("status") == "error"]
    print(f"gpu_check: {len(rec.rows)} rows, {len(failed)} failed, {time.time() - rec.started:.0f} s; {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sequential AlphaEdit on the built-in model: does the second batch keep the first batch's edits?

Two disjoint batches of the built-in edits (``--num-edits`` each, batches 0
and 1 of ``edit_seed`` 0) are written one after the other into SmolLM2-135M
with AlphaEdit's defaults.  The first batch is applied once; the second is
applied to a copy of that model in three ways:

* ``with K_p`` -- the default: the keys of the first batch (K_p) join the
  normal equations and the projector P comes from the unedited model, as the
  reference's sequential editing;
* ``without K_p`` -- ``protect_previous_edits: false``: P from the unedited
  model, the first batch's keys not protected;
* ``no lineage`` -- what every AlphaEdit step did before lineage state: no
  K_p and P from the statistics of the model handed in (the edited one).

For each, the first batch's edit success / generalization (greedy token F1,
the edit evaluator) and its mean target NLL on the evaluator's prompt, the
second batch's success, and how far the second update moves the first
batch's keys (``‖ΔW₂ K₁‖ / ‖ΔW₂‖``, summed over the edited layers).

    OMP_NUM_THREADS=1 python benchmarks/alphaedit_sequential.py --json docs/benchmarks/alphaedit_sequential.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = ("with K_p", "without K_p", "no lineage")


def first_batch_scores(model, tok, edits, layers) -> dict[str, float]:
    """The edit evaluator's success / generalization and the mean target NLL of ``edits`` on ``model``."""
    from shared.evaluation.edit import evaluate_edits
    from shared.interventions.memit import edit_sites, edited_check

    scores = evaluate_edits(model, tok, edits, batch_size=16)
    _, nll = edited_check(model, tok, edit_sites(tok, edits, "{} is a"), layers[-1])
    return {
        "success": round(float(scores["edit_success"]), 4),
        "generalization": round(float(scores["edit_generalization"]), 4),
        "locality": round(float(scores["edit_locality"]), 4),
        "target_nll": round(sum(nll) / len(nll), 4),
    }


def run(model_dir: Path, num_edits: int) -> dict:
    import torch

    from shared.data import DataConfig, ExperimentData
    from shared.interventions import get_intervention
    from shared.interventions.memit import edit_sites, keys_and_values
    from shared.lineage_state import Lineage
    from shared.models import load_model

    alpha = get_intervention("alphaedit")
    params = alpha.parse_params(None)
    layers = params.layers
    first = ExperimentData(DataConfig(num_edits=num_edits, num_batches=2, edit_batch=0))
    second = ExperimentData(DataConfig(num_edits=num_edits, num_batches=2, edit_batch=1))
    model, tok = load_model(model_dir)
    out: dict = {"model": "builtin:smollm2-135m", "num_edits": num_edits, "layers": layers,
                 "params": params.model_dump(mode="json"), "rows": []}
    out["base"] = {"first": first_batch_scores(model, tok, first.edits, layers),
                   "second": first_batch_scores(model, tok, second.edits, layers)}
    t0 = time.perf_counter()
    rec1 = alpha.apply(model, tok, params, first)
    entry = rec1.pop("lineage_state")
    out["first_batch"] = {"seconds": round(time.perf_counter() - t0, 1), "record": rec1["edit"],
                          "first": first_batch_scores(model, tok, first.edits, layers)}
    sites1 = edit_sites(tok, first.edits, params.kl_template)
    keys1 = {layer: keys_and_values(model, tok, sites1, layer, layer)[0].double() for layer in layers}
    after_first = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in CONFIGS:
        model.load_state_dict(after_first)
        p = params if name != "without K_p" else alpha.parse_params({"protect_previous_edits": False})
        lineage = Lineage(entry=entry) if name != "no lineage" else None
        before = {layer: model.model.layers[layer].mlp.down_proj.weight.detach().double().clone() for layer in layers}
        t0 = time.perf_counter()
        rec2 = alpha.apply(model, tok, p, second, lineage=lineage)
        rec2.pop("lineage_state")
        seconds = time.perf_counter() - t0
        moved = sum(float(((model.model.layers[layer].mlp.down_proj.weight.detach().double() - before[layer])
                           @ keys1[layer].T).norm()) for layer in layers)
        size = sum(float((model.model.layers[layer].mlp.down_proj.weight.detach().double() - before[layer]).norm())
                   for layer in layers)
        row = {
            "config": name,
            "seconds": round(seconds, 1),
            "first_after_second": first_batch_scores(model, tok, first.edits, layers),
            "second": first_batch_scores(model, tok, second.edits, layers),
            "first_keys_moved": round(moved / size, 4),
            "protected_previous_keys": rec2["edit"]["protected_previous_keys"],
            "nullspace_dim": rec2["edit"]["nullspace_dim"],
            "projector_source": rec2["edit"]["projector_source"][:12],
            "target_steps": rec2["edit"]["target_steps"],
        }
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the result as JSON")
    parser.add_argument("--num-edits", type=int, default=5, help="edits per batch (two batches)")
    parser.add_argument("--model-dir", help="a materialized builtin:smollm2-135m (default: materialize one)")
    args = parser.parse_args(argv)

    import torch

    from shared.models import BUILTIN_SMOLLM2, materialize_base

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "smollm2"
        if not args.model_dir:
            materialize_base(BUILTIN_SMOLLM2, model_dir)
        start = time.perf_counter()
        out = run(model_dir, args.num_edits)
        out["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(out, indent=1, sort_keys=True) + "\n"
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

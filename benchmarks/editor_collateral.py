"""Collateral damage of each editor on the built-in model: utility accuracy and perplexity after editing.

The slow tests bound these (tests/test_interventions.py, test_memit.py,
test_lora.py: the default 10-edit batch, edit_seed 0, float32); this script
measures the values the bounds are checked against and that docs/editing.md
quotes.

    python benchmarks/editor_collateral.py --json docs/benchmarks/editor_collateral.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EDITORS = ("ft", "memit", "lora")


def _quality(model, tok) -> dict[str, float]:
    from shared.data import ExperimentData
    from shared.evaluation import EvalOptions, get_evaluator

    data, options = ExperimentData(), EvalOptions()
    out = {**get_evaluator("utility")(model, tok, data, options), **get_evaluator("perplexity")(model, tok, data, options)}
    return {k: round(float(v), 4) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--num-edits", type=int, default=10)
    args = parser.parse_args(argv)

    from shared.data import DataConfig, ExperimentData
    from shared.evaluation import evaluate_edits
    from shared.interventions import get_intervention
    from shared.models import load_model, materialize_base

    rows = []
    with tempfile.TemporaryDirectory(prefix="lmcompose-collateral-") as tmp:
        materialize_base("builtin:smollm2-135m", Path(tmp))
        model, tok = load_model(Path(tmp))
        rows.append({"editor": "none", **_quality(model, tok)})
        data = ExperimentData(DataConfig(num_edits=args.num_edits))
        for name in EDITORS:
            model, tok = load_model(Path(tmp))
            method = get_intervention(name)
            started = time.time()
            method.apply(model, tok, method.parse_params(None), data)
            seconds = time.time() - started
            edits = evaluate_edits(model, tok, data.edits, batch_size=16)
            rows.append({"editor": name, "edits": args.num_edits, "seconds": round(seconds, 1),
                         **{k: round(float(v), 3) for k, v in edits.items()}, **_quality(model, tok)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(rows, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Base-model figures of the built-in edit pack: what the unedited model scores on every record.

A useful edit pack has locality questions the base model answers (otherwise
damage to unrelated knowledge cannot show) and counterfactual answers it does
not already give (otherwise "success" is free).  This measures both over the
whole pack with the project's own prompt and metric (``shared.evaluation.edit``),
float32 on the CPU, and writes the figures quoted in docs/data.md.

    python benchmarks/edit_pack.py --json docs/benchmarks/edit_pack.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures as JSON")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from shared.data import load_field
    from shared.evaluation import evaluate_edits
    from shared.item_scores import item_scores_of
    from shared.models import load_model, materialize_base

    edits = load_field("edits")
    with tempfile.TemporaryDirectory(prefix="lmcompose-edit-pack-") as tmp:
        materialize_base("builtin:smollm2-135m", Path(tmp))  # local GGUF -> float32 safetensors, no network
        model, tok = load_model(Path(tmp))
        started = time.time()
        res = evaluate_edits(model, tok, edits, batch_size=args.batch_size)
        seconds = time.time() - started
    items = item_scores_of(res)
    out = {
        "records": len(edits),
        "unique_subjects": len({e.subject.lower() for e in edits}),
        "unique_locality_questions": len({e.loc for e in edits}),
        "base_locality": round(res["edit_locality"], 4),
        "base_success": round(res["edit_success"], 4),
        "base_generalization": round(res["edit_generalization"], 4),
        "records_locality_below_0.5": sum(v < 0.5 for v in items["edit_locality"].values),
        "records_success_above_0": sum(v > 0 for v in items["edit_success"].values),
        "dtype": "float32",
        "seconds": round(seconds, 1),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

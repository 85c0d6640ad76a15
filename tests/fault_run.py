"""A small run for the fault-injection suite: what the pipeline's tasks do, in one process, through the same entry points.

    python -m tests.fault_run STORE_URI OUT.json

prepare_base (tiny random model) -> wanda -> ft -> evaluate, plus an
evaluation of the pruned model and a MEMIT step (its covariance statistics
go through the store's tensor cache), each through
:mod:`shared.model_tasks` -- the functions the KFP components call.  Writes
the model keys and every criterion to OUT.json when it finishes.  The
fault-injection tests kill it, corrupt its store or stop its S3 server, run it
again, and compare OUT.json with an undisturbed run's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WANDA = {"sparsity": 0.5, "num_calibration_samples": 4, "calibration_seq_len": 32}
FT = {"steps": 2, "layers": [0, 1]}
MEMIT = {"layers": [1], "v_steps": 3, "stats_tokens": 256, "stats_seq_len": 32}
EDITS = {"num_edits": 4}
EVAL = {"batch_size": 4, "max_length": 32, "dtype": "float32", "limit": 8}
EVALUATORS = ["edit", "perplexity", "compression", "utility"]


def run(store_uri: str) -> dict:
    from shared.model_tasks import apply_to_model, evaluate_model, prepare_base_model

    base, _ = prepare_base_model("builtin:tiny-random", store_uri)
    pruned, _ = apply_to_model(base, "wanda", WANDA)
    edited, _ = apply_to_model(pruned, "ft", FT, EDITS)
    memit, _ = apply_to_model(pruned, "memit", MEMIT, EDITS)
    out = {"keys": {"base": base.key, "wanda": pruned.key, "wanda>ft": edited.key, "wanda>memit": memit.key},
           "criteria": {}}
    for name, ref in (("wanda", pruned), ("wanda>ft", edited), ("wanda>memit", memit)):
        out["criteria"][name] = evaluate_model(ref, EVALUATORS, EDITS, EVAL)
    return out


def main(argv: list[str]) -> int:
    store_uri, out_path = argv
    result = run(store_uri)
    Path(out_path).write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""KFP tasks, checkpoint loads and simulated makespan of each paper study, per-criterion vs per-model evaluation.

    .venv/bin/python benchmarks/study_costs.py            # Markdown table (docs/cost-model.md quotes it)

"per-criterion" is the task graph of the interface before Model artifacts
(one evaluation task per model and criterion, each loading the checkpoint,
all waiting for the run's last intervention); "per-model" is what the
builder compiles now (one ``evaluate`` task per model, fed by its model).
Both are simulated with :mod:`shared.estimate` on the Llama-3-8B / A100 cost
table; the task counts equal those of the compiled pipelines (tests check).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.estimate import estimate  # noqa: E402
from shared.planner import build_plan  # noqa: E402
from shared.spec import load_spec  # noqa: E402


#: the shard counts the paper specs set when the table in docs/cost-model.md was measured; the specs now say
#: ``shards: auto`` (33, 4 and 3 runs: docs/cost-model.md, "Workflow size"), which changes only the number of
#: base-model lookups (one per run) -- a few tasks, no GPU time
TABLE_SHARDS = {"llama3_edit_x_compress": 40, "llama3_edit_x_unlearn": 12, "llama3_unlearn_x_compress": 12}


def main() -> int:
    print("| study | design | KFP tasks | checkpoint loads | GPU-hours | critical path (h) | 8 GPUs: makespan / bound (h) | 64 GPUs: makespan / bound (h) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for path in sorted((ROOT / "pipelines" / "experiments" / "paper").glob("*.yaml")):
        spec = load_spec(path, fetch_remote=False)
        plan = build_plan(spec)
        shards = spec.cluster_config().shards
        if shards == "auto":
            shards = TABLE_SHARDS[path.stem]
        for design, label in (("per_criterion", "before: per criterion"), ("per_model", "after: per model")):
            r = estimate(plan, (8, 64), design=design, shards=shards)
            cells = [f"{r['makespan_h'][n]:.1f} / {r['lower_bound_h'][n]:.1f}" for n in (8, 64)]
            print(f"| {path.stem} | {label} | {r['tasks']} | {r['checkpoint_downloads']} | {r['gpu_hours']:.0f} | "
                  f"{r['critical_path_h']:.1f} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

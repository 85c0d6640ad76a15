"""Does the edit metric's generation budget move any figure? Old budget vs the filled one, same generations.

Issue 29, item 1: the evaluator used to generate exactly as many tokens as
the target has, so a space-only token spent the budget before token-F1
dropped it, and clipped to the target's length *including* the target's own
space-only tokens.  The evaluator now continues a generation until it fills
the target after the ignored tokens are dropped, and clips to the kept
target.  Greedy decoding is deterministic and the continuation extends the
same sequence, so the old generation is the first ``len(target)`` tokens of
the new one: both metrics are computed here from one generation per prompt.

    python benchmarks/edit_budget.py                      # base model, the whole built-in edit pack
    python benchmarks/edit_budget.py --ft-batches 3       # also 3 FT-edited models (10 edits each)

Prints, per model and criterion, the mean under each metric and how many
items changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def old_token_f1(generated: list[int], target: list[int], ignore: set[int]) -> float:
    """The metric before issue 29: clip the kept generation to len(target) (ignored tokens included)."""
    kept = [t for t in generated if t not in ignore]
    gen = set(kept[: len(target)])
    tgt = set(target) - ignore
    common = gen & tgt
    if not common:
        return 0.0
    p, r = len(common) / len(gen), len(common) / len(tgt)
    return 2 * p * r / (p + r)


def compare(model: Any, tok: Any, records: list[Any], batch_size: int = 16) -> dict[str, dict[str, float]]:
    from shared.evaluation import edit as E

    jobs, prompts, targets = [], [], []
    for r, rec in enumerate(records):
        pairs = [("success", rec.src, rec.alt)] + [("generalization", q, rec.alt) for q in rec.rephrase]
        pairs.append(("locality", rec.loc, rec.loc_ans))
        for kind, q, a in pairs:
            p, t = E.encode_edit_example(tok, q, a)
            jobs.append((r, kind))
            prompts.append(p)
            targets.append(t)
    budgets = [len(t) for t in targets]
    eos = model.generation_config.eos_token_id or tok.eos_token_id
    first = E.greedy_generate(model, prompts, budgets, E._pad_token_id(tok), eos, batch_size=batch_size)
    filled = E._fill_generations(model, tok, prompts, targets, first, budgets, eos, batch_size)
    ignore = E.ignored_token_ids(tok, {t for s in filled + targets for t in s})
    out: dict[str, dict[str, float]] = {}
    for kind in ("success", "generalization", "locality"):
        per_old: dict[int, list[float]] = {}
        per_new: dict[int, list[float]] = {}
        for (r, k), gen0, gen, tgt in zip(jobs, first, filled, targets, strict=True):
            if k != kind:
                continue
            per_old.setdefault(r, []).append(old_token_f1(gen0, tgt, ignore))
            per_new.setdefault(r, []).append(E.token_f1(gen, tgt, ignore))
        old = [sum(v) / len(v) for v in per_old.values()]
        new = [sum(v) / len(v) for v in per_new.values()]
        out[f"edit_{kind}"] = {"old": sum(old) / len(old), "new": sum(new) / len(new),
                               "items": len(old), "changed": sum(abs(a - b) > 1e-12 for a, b in zip(old, new))}
    out["_extended_generations"] = {"count": sum(len(a) != len(b) for a, b in zip(first, filled)), "of": len(first)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ft-batches", type=int, default=0, help="also FT-edited models on this many edit batches")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()

    import tempfile

    from shared.data import DataConfig, ExperimentData, load_field
    from shared.interventions import get_intervention
    from shared.models import BUILTIN_SMOLLM2, load_model, materialize_base

    folder = Path(tempfile.mkdtemp(prefix="edit-budget-"))
    materialize_base(BUILTIN_SMOLLM2, folder)
    rows = {}
    model, tok = load_model(folder)
    started = time.time()
    rows["base (all records)"] = compare(model, tok, load_field("edits", "builtin"))
    print(f"base: {time.time() - started:.0f} s", file=sys.stderr)
    ft = get_intervention("ft")
    for b in range(args.ft_batches):
        model, tok = load_model(folder)
        data = ExperimentData(DataConfig(num_edits=10, num_batches=args.ft_batches, edit_batch=b))
        ft.apply(model, tok, ft.parse_params({}), data)
        rows[f"ft, batch {b}"] = compare(model, tok, list(data.edits))
    for name, row in rows.items():
        ext = row.pop("_extended_generations")
        print(f"{name}: {ext['count']} of {ext['of']} generations continued past the target's length")
        for crit, v in row.items():
            print(f"  {crit:22s} old {v['old']:.4f}  new {v['new']:.4f}  items changed {v['changed']}/{v['items']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""k-step composability (all k! orders): hand-computed triples, equality with the pair metrics, the spec mode."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.item_scores import ItemScores
from shared.metrics import PAPER_CATEGORIES, pair_table, wins_table
from shared.orders import integrated_order_table, order_table
from shared.uncertainty import ItemRecord, bootstrap_criteria, orders_with_intervals

CRITERIA = ("edit_success", "edit_generalization", "edit_locality", "utility_acc", "forget_acc",
            "perplexity", "sparsity", "avg_bits")


def _row(steps: list[tuple[str, dict]], sweep: tuple[str, str, float] | None, **criteria) -> dict:
    label = " > ".join(m + (f"({','.join(f'{k}={v:g}' for k, v in p.items())})" if p else "") for m, p in steps)
    row = {"model_key": "k-" + label, "n_steps": len(steps), "composition": label or "base",
           "methods": ">".join(m for m, _ in steps), "recompress": "",
           "sweep_method": sweep[0] if sweep else "", "sweep_param": sweep[1] if sweep else "",
           "sweep_value": sweep[2] if sweep else math.nan}
    for k in (1, 2, 3):
        row[f"step{k}_method"] = steps[k - 1][0] if k <= len(steps) else ""
        row[f"step{k}_params"] = json.dumps(steps[k - 1][1], sort_keys=True) if k <= len(steps) else ""
    row.update({c: criteria.get(c, math.nan) for c in CRITERIA})
    return row


def triple_study(values: dict[tuple[str, ...], dict[float, float]], criterion: str = "edit_success") -> pd.DataFrame:
    """memit, rmu, gptq(bits) compositions; ``values[order][bits]`` is the criterion of that order."""
    rows = []
    for order, per_bits in values.items():
        for bits, v in per_bits.items():
            steps = [(m, {"bits": bits} if m == "gptq" else {}) for m in order]
            rows.append(_row(steps, ("gptq", "bits", bits), **{criterion: v}))
    return pd.DataFrame(rows)


ORDERS3 = list(itertools.permutations(("memit", "rmu", "gptq")))


def test_triple_metrics_by_hand() -> None:
    kappa = dict(zip(ORDERS3, (0.9, 0.5, 0.7, 0.2, 0.6, 0.4)))
    table = order_table(triple_study({o: {4.0: v} for o, v in kappa.items()}), PAPER_CATEGORIES, ["edit_success"])
    assert len(table) == 1
    row = table.iloc[0]
    assert row["combo"] == "memit+rmu+gptq" and row["k"] == 3 and row["n_orders"] == 6
    assert row["order_free_error"] == pytest.approx(0.1)  # 1 - max
    assert row["order_sensitivity"] == pytest.approx(0.7)  # max - min
    assert row["best_order"] == "memit>rmu>gptq" and row["worst_order"] == "rmu>gptq>memit"
    assert (row["kappa_best"], row["kappa_worst"]) == (0.9, 0.2)


def test_lower_is_better_criterion_is_mapped_before_max_and_min() -> None:
    kappa = dict(zip(ORDERS3, (0.30, 0.25, 0.50, 0.40, 0.28, 0.35)))  # forget accuracy: lower is better
    row = order_table(triple_study({o: {4.0: v} for o, v in kappa.items()}, "forget_acc"),
                      PAPER_CATEGORIES, ["forget_acc"]).iloc[0]
    assert row["order_free_error"] == pytest.approx(0.25)  # the lowest forget accuracy
    assert row["order_sensitivity"] == pytest.approx(0.25)
    assert row["kappa_best"] == 0.25 and row["kappa_worst"] == 0.50


def test_for_two_steps_the_metrics_equal_the_papers_pair_metrics() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for bits in (3.0, 4.0):
        for order in (("memit", "gptq"), ("gptq", "memit")):
            steps = [(m, {"bits": bits} if m == "gptq" else {}) for m in order]
            rows.append(_row(steps, ("gptq", "bits", bits), edit_success=float(rng.random()),
                             utility_acc=float(rng.random())))
    results = pd.DataFrame(rows)
    pairs = pair_table(results, PAPER_CATEGORIES)
    orders = order_table(results, PAPER_CATEGORIES)
    merged = pairs.merge(orders, on=["sweep_value", "criterion"], suffixes=("_pair", "_orders"))
    assert len(merged) == len(pairs) == 4
    assert np.allclose(merged["order_free_error_pair"], merged["order_free_error_orders"])
    assert np.allclose(merged["order_sensitivity_pair"], merged["order_sensitivity_orders"])


def test_a_missing_order_leaves_the_set_out_with_a_note() -> None:
    values = {o: {4.0: 0.5} for o in ORDERS3[:5]}
    table = order_table(triple_study(values), PAPER_CATEGORIES, ["edit_success"])
    assert table.empty
    assert any("5 of the 6 orders" in n for n in table.attrs["notes"])


def test_integrated_triples_and_wins_against_the_same_partners() -> None:
    values = {}
    for o in ORDERS3:
        values[o] = {3.0: 0.4, 4.0: 0.8}
        values[tuple("ft" if m == "memit" else m for m in o)] = {3.0: 0.2, 4.0: 0.6}
    results = triple_study(values)
    orders = order_table(results, PAPER_CATEGORIES, ["edit_success"])
    assert set(orders["combo"]) == {"memit+rmu+gptq", "ft+rmu+gptq"}
    integ = integrated_order_table(orders)
    # every order equal: OS 0; OFE falls linearly 0.6 -> 0.2 (memit) over bits 3 -> 4: area 0.4
    got = dict(zip(integ["combo"], integ["integrated_order_free_error"]))
    assert got["memit+rmu+gptq"] == pytest.approx(0.4) and got["ft+rmu+gptq"] == pytest.approx(0.6)
    assert (integ["integrated_order_sensitivity"] == 0).all()
    wins = wins_table(integ, ["ft", "memit"])
    assert wins.loc["memit", "# Wins"] == 1 and wins.loc["ft", "# Wins"] == 0  # OFE lower; OS tied
    assert "rmu+gptq edit_success OFE" in wins.columns


def test_bootstrap_of_identical_orders_gives_zero_sensitivity() -> None:
    rng = np.random.default_rng(1)
    items = (rng.random(40) < 0.6).astype(float)
    results = triple_study({o: {4.0: float(items.mean())} for o in ORDERS3})
    records = [ItemRecord(c, 0, k, {"edit_success": ItemScores.of(items)})
               for c, k in zip(results["composition"], results["model_key"])]
    boot = bootstrap_criteria(records, n_boot=200, seed=0)
    row = orders_with_intervals(order_table(results, PAPER_CATEGORIES, ["edit_success"]), boot).iloc[0]
    assert row["order_sensitivity_lo"] == 0 and row["order_sensitivity_hi"] == 0
    assert row["order_free_error_lo"] < row["order_free_error"] < row["order_free_error_hi"]


def test_report_has_a_triples_section_with_plots(tmp_path: Path) -> None:
    from shared.report import build_report

    kappa = dict(zip(ORDERS3, (0.9, 0.5, 0.7, 0.2, 0.6, 0.4)))
    results = triple_study({o: {3.0: v - 0.1, 4.0: v} for o, v in kappa.items()})
    written = build_report(results, tmp_path, categories=PAPER_CATEGORIES)
    md = written["report"].read_text()
    assert "## Composability over all orders (k = 3)" in md
    assert "memit>rmu>gptq (0.900)" in md
    orders = pd.read_csv(written["composability_orders"])
    assert len(orders) == 2 and set(orders["n_orders"]) == {6}
    assert any(k.endswith("__orders.png") for k in written)


def test_subsets_mode_plans_all_pairs_and_triples_with_shared_prefixes() -> None:
    from shared.planner import build_plan
    from shared.spec import ExperimentSpec

    spec = ExperimentSpec.model_validate({
        "name": "triples", "model": "builtin:smollm2-135m",
        "interventions": [{"method": "memit"}, {"method": "rmu"}, {"method": "gptq", "params": {"group_size": 64}}],
        "compositions": {"mode": "subsets", "sizes": [2, 3]},
        "evaluation": {"evaluators": ["edit"]},
    })
    orders = spec.orders()
    assert sum(len(o) == 2 for o in orders) == 6 and sum(len(o) == 3 for o in orders) == 6
    plan = build_plan(spec)
    labels = [c["label"] for c in plan.compositions]
    assert len(labels) == 1 + 3 + 6 + 6  # base, singles, pairs, triples
    # memit > rmu is computed once and shared by memit > rmu > gptq
    assert len({n.id for n in plan.nodes.values()}) < 1 + 3 + 6 * 2 + 6 * 3


@pytest.mark.parametrize("compositions, message", [
    ({"mode": "subsets"}, "compositions.sizes: mode 'subsets' needs the set sizes"),
    ({"mode": "subsets", "sizes": [4]}, "compositions.sizes: 4 is not between 2 and 3"),
    ({"mode": "permutations", "sizes": [2]}, "compositions.sizes: only used with mode 'subsets'"),
    ({"mode": "subsets", "sizes": [3], "groups": [["memit"], ["rmu", "gptq"]]}, "is not between 2 and 2"),
])
def test_subsets_mode_errors_name_the_field(compositions: dict, message: str) -> None:
    from shared.spec import ExperimentSpec

    with pytest.raises(ValueError, match=message):
        ExperimentSpec.model_validate({
            "name": "bad", "model": "builtin:smollm2-135m",
            "interventions": [{"method": "memit"}, {"method": "rmu"}, {"method": "gptq", "params": {"group_size": 64}}],
            "compositions": compositions,
        })


def test_subsets_with_groups_take_one_member_per_group() -> None:
    from shared.spec import ExperimentSpec

    spec = ExperimentSpec.model_validate({
        "name": "g", "model": "builtin:smollm2-135m",
        "interventions": [{"method": "ft"}, {"method": "memit"}, {"method": "rmu"}],
        "compositions": {"mode": "subsets", "sizes": [2], "groups": [["ft", "memit"], ["rmu"]]},
    })
    pairs = [o for o in spec.orders() if len(o) == 2]
    assert sorted(pairs) == sorted([("ft", "rmu"), ("rmu", "ft"), ("memit", "rmu"), ("rmu", "memit")])

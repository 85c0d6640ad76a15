"""Bootstrap intervals: cases with a known answer, the paired design, batches, wins, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.item_scores import ItemScores
from shared.metrics import PAPER_CATEGORIES, integrate_normalized, integrated_table, pair_table
from shared.uncertainty import (
    ItemRecord,
    bootstrap_criteria,
    integrated_draws,
    pair_draws,
    pairs_with_intervals,
    read_item_records,
    resample_indices,
    results_with_intervals,
    write_item_records,
)


def _row(comp: str, steps: list[tuple[str, dict]], sweep: tuple[str, str, float] | None = None, **criteria) -> dict:
    row = {"model_key": f"k-{comp or 'base'}", "n_steps": len(steps), "composition": comp,
           "methods": ">".join(m for m, _ in steps), "recompress": "",
           "sweep_method": sweep[0] if sweep else "", "sweep_param": sweep[1] if sweep else "",
           "sweep_value": sweep[2] if sweep else math.nan}
    for k in (1, 2):
        row[f"step{k}_method"] = steps[k - 1][0] if k <= len(steps) else ""
        row[f"step{k}_params"] = json.dumps(steps[k - 1][1], sort_keys=True) if k <= len(steps) else ""
    for c in ("edit_success", "edit_generalization", "edit_locality", "utility_acc", "forget_acc",
              "perplexity", "sparsity", "avg_bits"):
        row[c] = criteria.get(c, math.nan)
    return row


def _study(items_fs: list[float], items_sf: list[float], sparsities=(0.25,)) -> tuple[pd.DataFrame, list[ItemRecord]]:
    """ft x wanda at the given sparsities: edit_success per record given for both orders."""
    rows, records = [], []
    for s in sparsities:
        for comp, steps in ((f"ft>wanda({s})", [("ft", {}), ("wanda", {"sparsity": s})]),
                            (f"wanda({s})>ft", [("wanda", {"sparsity": s}), ("ft", {})])):
            vals = items_fs if comp.startswith("ft") else items_sf
            rows.append(_row(comp, steps, ("wanda", "sparsity", s), edit_success=float(np.mean(vals))))
            records.append(ItemRecord(comp, 0, rows[-1]["model_key"], {"edit_success": ItemScores.of(vals)}))
    return pd.DataFrame(rows), records


def test_resample_indices_keep_each_stratum_inside_itself() -> None:
    scores = ItemScores.of([0, 0, 1, 1, 1], strata=[0, 0, 1, 1, 1])
    idx = resample_indices(scores, 200, np.random.default_rng(0))
    assert idx.shape == (200, 5)
    assert set(idx[:, :2].ravel()) <= {0, 1} and set(idx[:, 2:].ravel()) <= {2, 3, 4}
    # so the stratified statistic (mean of stratum means) never leaves [0, 1] here and is 0.5 every time
    assert np.allclose(scores.resampled(idx), 0.5)


def test_identical_orders_give_a_sensitivity_interval_of_exactly_zero() -> None:
    rng = np.random.default_rng(1)
    vals = rng.integers(0, 2, size=50).astype(float).tolist()
    results, records = _study(vals, vals)
    boot = bootstrap_criteria(records, n_boot=300, seed=0)
    pairs = pairs_with_intervals(pair_table(results, PAPER_CATEGORIES, ["edit_success"]), boot)
    row = pairs.iloc[0]
    assert row["order_sensitivity"] == 0 and row["order_sensitivity_lo"] == 0 and row["order_sensitivity_hi"] == 0
    assert row["order_difference_lo"] == 0 and row["order_difference_hi"] == 0
    # the order-free error interval is that of 1 - the criterion, around the point value and of a plausible width
    assert row["order_free_error_lo"] <= row["order_free_error"] <= row["order_free_error_hi"]
    p = float(np.mean(vals))
    half = 1.96 * math.sqrt(p * (1 - p) / len(vals))
    width = row["order_free_error_hi"] - row["order_free_error_lo"]
    assert 0.7 * 2 * half < width < 1.3 * 2 * half


def test_a_constant_difference_is_recovered_exactly_by_the_paired_design() -> None:
    """Item-wise difference 0.3 in every record: every paired resample has OS 0.3; unpaired would smear it."""
    rng = np.random.default_rng(2)
    a = rng.uniform(0.0, 0.6, size=40)
    results, records = _study(a.tolist(), (a + 0.3).tolist())
    boot = bootstrap_criteria(records, n_boot=300, seed=0)
    pairs = pairs_with_intervals(pair_table(results, PAPER_CATEGORIES, ["edit_success"]), boot)
    row = pairs.iloc[0]
    assert row["order_sensitivity"] == pytest.approx(0.3)
    assert row["order_sensitivity_lo"] == pytest.approx(0.3) and row["order_sensitivity_hi"] == pytest.approx(0.3)


def test_a_noisy_constructed_difference_lies_within_its_interval_and_zero_does_not() -> None:
    rng = np.random.default_rng(3)
    a = rng.uniform(0.2, 0.6, size=300)
    b = np.clip(a + 0.1 + rng.normal(0, 0.15, size=300), 0, 1)
    true_difference = float(np.mean(b) - np.mean(a))
    results, records = _study(a.tolist(), b.tolist())
    boot = bootstrap_criteria(records, n_boot=500, seed=0)
    row = pairs_with_intervals(pair_table(results, PAPER_CATEGORIES, ["edit_success"]), boot).iloc[0]
    assert row["order_sensitivity_lo"] < true_difference < row["order_sensitivity_hi"]
    assert row["order_sensitivity_lo"] > 0.05
    # signed: first (a) minus second (b) is negative, and its interval excludes 0
    assert row["order_difference_lo"] < -true_difference < row["order_difference_hi"] < 0


def test_no_true_difference_gives_a_signed_interval_around_zero() -> None:
    """Both orders drawn from the same distribution: |difference| has an interval above 0, the signed one spans 0."""
    rng = np.random.default_rng(9)
    a = (rng.random(200) < 0.5).astype(float)
    b = (rng.random(200) < 0.5).astype(float)
    results, records = _study(a.tolist(), b.tolist())
    boot = bootstrap_criteria(records, n_boot=500, seed=0)
    row = pairs_with_intervals(pair_table(results, PAPER_CATEGORIES, ["edit_success"]), boot).iloc[0]
    assert row["order_difference_lo"] < 0 < row["order_difference_hi"]


def test_interval_coverage_of_a_mean_is_near_its_nominal_level() -> None:
    """200 simulated studies of Bernoulli(0.3) items: the 95 % interval covers 0.3 in about 95 % of them."""
    rng = np.random.default_rng(4)
    covered = 0
    for trial in range(200):
        vals = (rng.random(120) < 0.3).astype(float).tolist()
        rows = [_row("ft", [("ft", {})], edit_success=float(np.mean(vals)))]
        boot = bootstrap_criteria([ItemRecord("ft", 0, "k", {"edit_success": ItemScores.of(vals)})], n_boot=400, seed=trial)
        table = results_with_intervals(pd.DataFrame(rows), boot)
        covered += table["edit_success_lo"].iloc[0] <= 0.3 <= table["edit_success_hi"].iloc[0]
    assert 0.88 <= covered / 200 <= 0.99


def test_the_seed_makes_intervals_reproducible() -> None:
    vals = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    rec = [ItemRecord("ft", 0, "k", {"edit_success": ItemScores.of(vals)})]
    one = bootstrap_criteria(rec, n_boot=100, seed=7).get("ft", "edit_success")
    assert np.array_equal(one, bootstrap_criteria(rec, n_boot=100, seed=7).get("ft", "edit_success"))
    assert not np.array_equal(one, bootstrap_criteria(rec, n_boot=100, seed=8).get("ft", "edit_success"))


def test_several_batches_are_resampled_first_and_averaged_like_the_results_table() -> None:
    """Batch 0 scores all 0, batch 1 all 1: items cannot move the mean, only which batches are drawn can."""
    recs = [ItemRecord("ft", 0, "k0", {"edit_success": ItemScores.of([0.0] * 5)}),
            ItemRecord("ft", 1, "k1", {"edit_success": ItemScores.of([1.0] * 5)})]
    draws = bootstrap_criteria(recs, n_boot=2000, seed=0).get("ft", "edit_success")
    assert set(np.round(draws, 9)) == {0.0, 0.5, 1.0}  # (0,0), (0,1)/(1,0), (1,1)
    assert np.mean(draws == 0.5) == pytest.approx(0.5, abs=0.05)


def test_items_of_different_lengths_for_the_same_data_are_refused() -> None:
    recs = [ItemRecord("a", 0, "k", {"utility_acc": ItemScores.of([1, 0])}),
            ItemRecord("b", 0, "k", {"utility_acc": ItemScores.of([1, 0, 1])})]
    with pytest.raises(ValueError, match="has 3 items, other models of the same data have 2"):
        bootstrap_criteria(recs, n_boot=10)


def test_integrated_draws_match_the_point_integration_on_each_resample() -> None:
    rng = np.random.default_rng(5)
    a = rng.uniform(0, 1, 30).tolist()
    b = rng.uniform(0, 1, 30).tolist()
    results, records = _study(a, b, sparsities=(0.25, 0.5, 0.75))
    boot = bootstrap_criteria(records, n_boot=50, seed=0)
    pairs = pair_table(results, PAPER_CATEGORIES, ["edit_success"])
    integ = integrated_table(pairs)
    per_point = pair_draws(pairs, boot)
    got = integrated_draws(integ, pairs, boot)[integ.index[0]]["integrated_order_sensitivity"]
    xs = pairs["sweep_value"].tolist()
    for r in (0, 17, 49):
        expected = integrate_normalized(xs, [per_point[i]["order_sensitivity"][r] for i in pairs.index])
        assert got[r] == pytest.approx(expected)


def test_items_file_round_trip(tmp_path: Path) -> None:
    recs = [ItemRecord("ft", 1, "k", {"perplexity": ItemScores.of([2.0, 3.0], weights=[1, 2], transform="exp")})]
    assert read_item_records(write_item_records(recs, tmp_path / "items.json")) == recs
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not an lm-compose items file"):
        read_item_records(tmp_path / "bad.json")


def test_report_carries_intervals_in_tables_plots_and_wins(tmp_path: Path) -> None:
    """Two editors x one compressor: ft clearly better than memit on every item; intervals reach every table."""
    from shared.report import build_report

    rng = np.random.default_rng(6)
    rows, records = [], []
    n = 60
    for editor, level in (("ft", 0.9), ("memit", 0.3)):
        for s in (0.25, 0.5):
            for comp, steps in ((f"{editor}>wanda({s})", [(editor, {}), ("wanda", {"sparsity": s})]),
                                (f"wanda({s})>{editor}", [("wanda", {"sparsity": s}), (editor, {})])):
                vals = (rng.random(n) < level).astype(float)
                rows.append(_row(comp, steps, ("wanda", "sparsity", s), edit_success=float(vals.mean())))
                records.append(ItemRecord(comp, 0, rows[-1]["model_key"], {"edit_success": ItemScores.of(vals)}))
    written = build_report(pd.DataFrame(rows), tmp_path, categories=PAPER_CATEGORIES, items=records,
                           resamples=200, seed=0, summary_at={"sparsity": 0.25})
    comp = pd.read_csv(written["composability"])
    assert {"order_free_error_lo", "order_free_error_hi", "order_sensitivity_lo", "order_sensitivity_hi"} <= set(comp)
    assert (comp["order_free_error_lo"] <= comp["order_free_error"] + 1e-12).all()
    assert (comp["order_free_error"] <= comp["order_free_error_hi"] + 1e-12).all()
    integ = pd.read_csv(written["composability_integrated"])
    assert integ["integrated_order_free_error_lo"].notna().all()
    res = pd.read_csv(written["results"])
    assert res["edit_success_lo"].notna().all() and res["edit_success_hi"].notna().all()
    shares = pd.read_csv(written["wins_share"])
    ofe = shares[shares["column"].str.endswith("OFE")]
    # ft's order-free error is far below memit's: ft wins (nearly) every resample, memit (nearly) none
    assert (ofe[ofe["method"] == "ft"]["share"] > 0.95).all()
    assert (ofe[ofe["method"] == "memit"]["share"] < 0.05).all()
    wins = pd.read_csv(written["wins"])
    assert {"# Wins_lo", "# Wins_hi"} <= set(wins)
    md = written["report"].read_text()
    assert "percentile intervals from 200 paired bootstrap resamples (seed 0)" in md
    assert " [" in md and "%)" in md
    assert read_item_records(written["items"]) == records


def test_cli_report_rebuilds_the_same_intervals_from_items_json(tmp_path: Path) -> None:
    from pipelines.cli import main
    from shared.report import build_report

    results, records = _study([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], sparsities=(0.25, 0.5))
    first = build_report(results, tmp_path / "a", categories=PAPER_CATEGORIES, items=records, resamples=100, seed=3)
    assert main(["report", "--results", str(first["results"]), "--out", str(tmp_path / "b"),
                 "--resamples", "100", "--seed", "3"]) == 0
    assert (tmp_path / "b" / "composability.csv").read_text() == first["composability"].read_text()
    assert (tmp_path / "b" / "results.csv").read_text() == first["results"].read_text()
    with pytest.raises(SystemExit):
        main(["report", "--results", str(first["results"]), "--confidence", "1.5"])

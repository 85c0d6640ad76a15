"""Composability metrics against hand-computed values (no model, no pipeline)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from shared.criteria import CRITERIA
from shared.metrics import (
    PAIR_COLUMNS,
    PAPER_CATEGORIES,
    WINS_COLUMN,
    count_wins,
    criterion_order_free_error,
    criterion_order_sensitivity,
    integrate_normalized,
    integrated_table,
    order_free_error,
    order_sensitivity,
    pair_table,
    wins_table,
)

# --------------------------------------------------------------------------- builders


def make_row(steps: list[tuple[str, dict]], sweep: tuple[str, str, float] | None = None, **crit: float) -> dict:
    """One results row in the schema of docs/results-schema.md (K = 2)."""
    row: dict = {
        "model_key": "base" if not steps else "|".join(f"{m}{json.dumps(p, sort_keys=True)}" for m, p in steps),
        "n_steps": len(steps),
        "composition": " > ".join(m for m, _ in steps),
        "methods": ">".join(m for m, _ in steps),
        "sweep_method": sweep[0] if sweep else "",
        "sweep_param": sweep[1] if sweep else "",
        "sweep_value": sweep[2] if sweep else math.nan,
    }
    for k in (1, 2):
        if k <= len(steps):
            row[f"step{k}_method"] = steps[k - 1][0]
            row[f"step{k}_params"] = json.dumps(steps[k - 1][1], sort_keys=True)
        else:
            row[f"step{k}_method"] = ""
            row[f"step{k}_params"] = ""
    for name in CRITERIA:
        row[name] = crit.get(name, math.nan)
    return row


def both_orders(a: tuple[str, dict], b: tuple[str, dict], sweep, crit_ab: dict, crit_ba: dict) -> list[dict]:
    return [make_row([a, b], sweep, **crit_ab), make_row([b, a], sweep, **crit_ba)]


def wanda(s: float) -> tuple[str, dict]:
    return ("wanda", {"sparsity": s, "calib": 8})


FT = ("ft", {"lr": 5e-5, "steps": 25})
RMU = ("rmu", {"alpha": 1000})


# --------------------------------------------------------------------------- per-setting


def test_order_free_error_uses_max_not_min() -> None:
    # max(0.8, 0.6) = 0.8 -> 0.2; min would give 0.4
    assert order_free_error(0.8, 0.6) == pytest.approx(0.2)
    assert order_free_error(0.6, 0.8) == pytest.approx(0.2)


def test_order_sensitivity_is_absolute_difference() -> None:
    assert order_sensitivity(0.8, 0.6) == pytest.approx(0.2)
    assert order_sensitivity(0.6, 0.8) == pytest.approx(0.2)
    assert order_sensitivity(0.5, 0.5) == 0.0


def test_lower_is_better_criterion_is_mapped_first() -> None:
    # forget_acc 0.30 / 0.50 -> kappa' 0.70 / 0.50 -> OFE = 1 - 0.70 = 0.30, OS = 0.20
    assert criterion_order_free_error("forget_acc", 0.30, 0.50) == pytest.approx(0.30)
    assert criterion_order_sensitivity("forget_acc", 0.30, 0.50) == pytest.approx(0.20)
    # the same raw numbers on a higher-is-better criterion: OFE = 1 - 0.50
    assert criterion_order_free_error("utility_acc", 0.30, 0.50) == pytest.approx(0.50)


def test_unbounded_criterion_is_rejected() -> None:
    with pytest.raises(ValueError, match="unbounded"):
        criterion_order_free_error("perplexity", 10.0, 12.0)


def test_nan_order_gives_nan_metrics() -> None:
    assert math.isnan(order_free_error(math.nan, 0.5))
    assert math.isnan(order_sensitivity(0.5, math.nan))
    assert math.isnan(criterion_order_free_error("forget_acc", math.nan, 0.4))


# --------------------------------------------------------------------------- integration


def test_integrate_non_uniform_axis_by_hand() -> None:
    # xs 2,3,4,8 -> normalized 0, 1/6, 2/6, 1
    # area = 1/6*(0.1+0.2)/2 + 1/6*(0.2+0.4)/2 + 4/6*(0.4+0.6)/2 = 0.025 + 0.05 + 0.3333...
    expected = 0.025 + 0.05 + (4 / 6) * 0.5
    assert integrate_normalized([2, 3, 4, 8], [0.1, 0.2, 0.4, 0.6]) == pytest.approx(expected)
    # order of the points does not matter
    assert integrate_normalized([8, 2, 4, 3], [0.6, 0.1, 0.4, 0.2]) == pytest.approx(expected)


def test_integrate_constant_is_the_constant() -> None:
    assert integrate_normalized([0.25, 0.5, 0.75], [0.3, 0.3, 0.3]) == pytest.approx(0.3)


def test_integrate_undefined_cases_are_nan() -> None:
    assert math.isnan(integrate_normalized([4], [0.5]))
    assert math.isnan(integrate_normalized([], []))
    assert math.isnan(integrate_normalized([4, 4], [0.5, 0.6]))  # zero-width axis
    assert math.isnan(integrate_normalized([2, 4, 8], [0.5, math.nan, 0.6]))


def test_integrate_subset_on_original_axis() -> None:
    # keep x = 2, 4 of a 2..8 sweep: normalized 0 and 1/3, area = 1/3 * (0.3 + 0.6)/2 = 0.15
    assert integrate_normalized([2, 4], [0.3, 0.6], x_range=(2, 8)) == pytest.approx(0.15)
    assert integrate_normalized([2, 4], [0.3, 0.6]) == pytest.approx(0.45)  # stretched: different


def test_integrate_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        integrate_normalized([1, 2], [0.1])


# --------------------------------------------------------------------------- pair table


def _ft_wanda_results() -> pd.DataFrame:
    rows = [make_row([]), make_row([FT]), make_row([wanda(0.25)], ("wanda", "sparsity", 0.25))]
    values = {0.25: ((0.9, 0.30), (0.7, 0.50)), 0.5: ((0.8, 0.35), (0.5, 0.45)), 0.75: ((0.4, 0.5), (0.2, 0.6))}
    for s, ((e_fw, f_fw), (e_wf, f_wf)) in values.items():
        rows += both_orders(
            FT, wanda(s), ("wanda", "sparsity", s),
            {"edit_success": e_fw, "forget_acc": f_fw, "utility_acc": 0.5},
            {"edit_success": e_wf, "forget_acc": f_wf, "utility_acc": 0.4},
        )
    return pd.DataFrame(rows)


def test_pair_table_values_and_orientation() -> None:
    pairs = pair_table(_ft_wanda_results(), PAPER_CATEGORIES)
    assert list(pairs.columns) == list(PAIR_COLUMNS)
    assert set(pairs["pair"]) == {"ft+wanda"}
    assert set(pairs["first"]) == {"ft"} and set(pairs["second"]) == {"wanda"}
    row = pairs[(pairs["criterion"] == "forget_acc") & (pairs["sweep_value"] == 0.25)].iloc[0]
    assert row["kappa_first_then_second"] == pytest.approx(0.30)  # raw ft > wanda
    assert row["kappa_second_then_first"] == pytest.approx(0.50)  # raw wanda > ft
    assert row["order_free_error"] == pytest.approx(0.30)
    assert row["order_sensitivity"] == pytest.approx(0.20)
    assert row["sweep_param"] == "sparsity"
    assert row["setting"] == "default"
    # criteria never evaluated (NaN in both orders) are left out
    assert set(pairs["criterion"]) == {"edit_success", "utility_acc", "forget_acc"}
    assert len(pairs) == 3 * 3


def test_pair_order_alphabetical_without_categories_and_by_category_with() -> None:
    rows = both_orders(("rmu", {}), ("gptq", {"bits": 4}), ("gptq", "bits", 4.0),
                       {"utility_acc": 0.5}, {"utility_acc": 0.6})
    assert set(pair_table(pd.DataFrame(rows))["pair"]) == {"gptq+rmu"}
    by_cat = pair_table(pd.DataFrame(rows), PAPER_CATEGORIES)
    assert set(by_cat["pair"]) == {"rmu+gptq"}
    # orientation follows the name: rmu > gptq gave 0.5
    assert by_cat["kappa_first_then_second"].iloc[0] == pytest.approx(0.5)


def test_pair_with_missing_order_is_skipped_with_a_note() -> None:
    rows = [make_row([FT, wanda(0.5)], ("wanda", "sparsity", 0.5), edit_success=0.5)]
    pairs = pair_table(pd.DataFrame(rows), PAPER_CATEGORIES)
    assert pairs.empty
    assert any("no opposite-order counterpart" in n for n in pairs.attrs["notes"])


def test_only_base_and_single_rows_give_empty_table() -> None:
    df = pd.DataFrame([make_row([]), make_row([FT], edit_success=0.9)])
    pairs = pair_table(df)
    assert pairs.empty and list(pairs.columns) == list(PAIR_COLUMNS)
    integ = integrated_table(pairs)
    assert integ.empty


def test_params_json_key_order_does_not_split_a_pair() -> None:
    rows = both_orders(FT, wanda(0.5), ("wanda", "sparsity", 0.5), {"edit_success": 0.5}, {"edit_success": 0.4})
    rows[1]["step2_params"] = '{"steps": 25, "lr": 5e-05}'  # same params, other key order and spacing
    pairs = pair_table(pd.DataFrame(rows), PAPER_CATEGORIES)
    assert len(pairs) == 1


def test_two_settings_are_labelled_by_their_differing_params() -> None:
    ft2 = ("ft", {"lr": 1e-4, "steps": 25})
    rows = []
    for ft in (FT, ft2):
        for s in (0.25, 0.5):
            rows += both_orders(ft, wanda(s), ("wanda", "sparsity", s), {"edit_success": 0.5}, {"edit_success": 0.4})
    pairs = pair_table(pd.DataFrame(rows), PAPER_CATEGORIES)
    assert pairs["setting_key"].nunique() == 2
    assert set(pairs["setting"]) == {"ft.lr=5e-05", "ft.lr=0.0001"}
    integ = integrated_table(pairs)
    assert len(integ) == 2 and (integ["n_points"] == 2).all()


def test_nan_in_one_order_gives_nan_metric_but_keeps_row() -> None:
    rows = both_orders(FT, wanda(0.5), ("wanda", "sparsity", 0.5),
                       {"edit_success": 0.5}, {"edit_success": math.nan})
    pairs = pair_table(pd.DataFrame(rows), PAPER_CATEGORIES)
    assert len(pairs) == 1
    assert math.isnan(pairs["order_free_error"].iloc[0])
    assert math.isnan(pairs["order_sensitivity"].iloc[0])


# --------------------------------------------------------------------------- integrated table


def test_integrated_table_by_hand() -> None:
    pairs = pair_table(_ft_wanda_results(), PAPER_CATEGORIES)
    integ = integrated_table(pairs)
    row = integ[integ["criterion"] == "edit_success"].iloc[0]
    # OFE per setting: 1-0.9=0.1, 1-0.8=0.2, 1-0.4=0.6 at x = 0, .5, 1
    assert row["integrated_order_free_error"] == pytest.approx(0.5 * 0.15 + 0.5 * 0.4)
    # OS: 0.2, 0.3, 0.2
    assert row["integrated_order_sensitivity"] == pytest.approx(0.5 * 0.25 + 0.5 * 0.25)
    assert row["n_points"] == 3 and row["floor"] == ""


def test_single_sweep_value_integrated_is_nan() -> None:
    rows = both_orders(FT, wanda(0.5), ("wanda", "sparsity", 0.5), {"edit_success": 0.5}, {"edit_success": 0.4})
    integ = integrated_table(pair_table(pd.DataFrame(rows), PAPER_CATEGORIES))
    assert len(integ) == 1
    assert math.isnan(integ["integrated_order_free_error"].iloc[0])
    assert integ["n_points"].iloc[0] == 1


def test_floor_drops_settings_failing_in_either_order() -> None:
    rows = []
    # utility (raw) per sparsity: (ft>wanda, wanda>ft); 0.75 fails in one order only, 0.5 passes
    util = {0.25: (0.6, 0.6), 0.5: (0.5, 0.45), 0.75: (0.5, 0.2)}
    edit = {0.25: (0.9, 0.7), 0.5: (0.8, 0.5), 0.75: (0.4, 0.2)}
    for s in (0.25, 0.5, 0.75):
        rows += both_orders(FT, wanda(s), ("wanda", "sparsity", s),
                            {"edit_success": edit[s][0], "utility_acc": util[s][0], "perplexity": 10 * s},
                            {"edit_success": edit[s][1], "utility_acc": util[s][1], "perplexity": 10 * s})
    results = pd.DataFrame(rows)
    pairs = pair_table(results, PAPER_CATEGORIES)
    integ = integrated_table(pairs, floor=("utility_acc", 0.45))
    row = integ[integ["criterion"] == "edit_success"].iloc[0]
    assert row["n_points"] == 2 and row["n_points_total"] == 3
    # OFE 0.1 at x=0 and 0.2 at x=0.5 on the ORIGINAL axis: 0.5 * 0.15
    assert row["integrated_order_free_error"] == pytest.approx(0.075)
    assert row["floor"] == "utility_acc>=0.45"
    # a floor that keeps a single point gives NaN
    strict = integrated_table(pairs, floor=("utility_acc", 0.55))
    assert math.isnan(strict[strict["criterion"] == "edit_success"]["integrated_order_free_error"].iloc[0])
    # a floor on an unbounded criterion is looked up in the results table by model key
    ppl = integrated_table(pairs, floor=("perplexity", 4.0), results=results)
    assert (ppl["n_points"] == 2).all()
    with pytest.raises(ValueError, match="results="):
        integrated_table(pairs, floor=("perplexity", 4.0))


def test_floor_treats_nan_as_failing() -> None:
    rows = []
    for s, u in ((0.25, 0.6), (0.5, math.nan), (0.75, 0.6)):
        rows += both_orders(FT, wanda(s), ("wanda", "sparsity", s),
                            {"edit_success": 0.5, "utility_acc": u}, {"edit_success": 0.4, "utility_acc": 0.6})
    integ = integrated_table(pair_table(pd.DataFrame(rows), PAPER_CATEGORIES), floor=("utility_acc", 0.3))
    row = integ[integ["criterion"] == "edit_success"].iloc[0]
    assert row["n_points"] == 2
    # OFE 0.5 at x = 0 and x = 1 -> area 0.5
    assert row["integrated_order_free_error"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- wins


def test_count_wins_strict_minimum_ties_and_nan() -> None:
    wide = pd.DataFrame(
        {
            "a": [0.1, 0.2, 0.3],           # ft wins
            "b": [0.2, 0.2, 0.5],           # tie for lowest: nobody
            "c": [math.nan, 0.4, 0.3],      # memit wins, NaN never wins
            "d": [math.nan, math.nan, 0.9],  # a single value: no opponent, no win
        },
        index=["ft", "lora", "memit"],
    )
    wins = count_wins(wide)
    assert wins.loc["ft", WINS_COLUMN] == 1
    assert wins.loc["lora", WINS_COLUMN] == 0
    assert wins.loc["memit", WINS_COLUMN] == 1
    assert list(wins.columns) == [WINS_COLUMN, "a", "b", "c", "d"]


def test_wins_table_editors_vs_compressors() -> None:
    rows = []
    edits = {"ft": (0.9, 0.5), "lora": (0.7, 0.7), "memit": (0.9, 0.8)}
    for name, (fw, wf) in edits.items():
        rows += both_orders((name, {}), wanda(0.5), ("wanda", "sparsity", 0.5),
                            {"edit_success": fw}, {"edit_success": wf})
    pairs = pair_table(pd.DataFrame(rows), PAPER_CATEGORIES)
    wins = wins_table(pairs, ["ft", "lora", "memit"])
    # OFE: ft 0.1, lora 0.3, memit 0.1 -> tie, no win; OS: ft 0.4, lora 0.0, memit 0.1 -> lora
    assert list(wins.index) == ["ft", "lora", "memit"]
    assert wins.loc["lora", WINS_COLUMN] == 1
    assert wins.loc["ft", WINS_COLUMN] == 0 and wins.loc["memit", WINS_COLUMN] == 0
    assert wins.loc["lora", "wanda edit_success OS"] == pytest.approx(0.0)
    assert wins.loc["ft", "wanda edit_success OFE"] == pytest.approx(0.1)


def test_wins_table_on_integrated_table_and_duplicate_guard() -> None:
    rows = []
    for name, base in (("ft", 0.9), ("memit", 0.8)):
        for s in (0.25, 0.75):
            rows += both_orders((name, {}), wanda(s), ("wanda", "sparsity", s),
                                {"edit_success": base}, {"edit_success": base - 0.1})
    pairs = pair_table(pd.DataFrame(rows), PAPER_CATEGORIES)
    wins = wins_table(integrated_table(pairs), ["ft", "memit"])
    assert wins.loc["ft", WINS_COLUMN] == 1  # lower integrated OFE; OS ties
    assert wins.loc["memit", WINS_COLUMN] == 0
    with pytest.raises(ValueError, match="several values"):
        wins_table(pairs, ["ft", "memit"])  # two sweep values per column
    by_sweep = wins_table(pairs, ["ft", "memit"], column_keys=("opponent", "sweep_value", "criterion"))
    assert by_sweep.loc["ft", WINS_COLUMN] == 2

"""The lmcompose command line: plan, report, compile, and clear errors for bad specs."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "experiments" / "demo.yaml"


def test_plan_prints_tree_and_counts(capsys):
    assert main(["plan", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "wanda(sparsity=0.25)" in out and "wanda(sparsity=0.5)" in out
    assert "compositions:       8" in out
    assert "intervention runs:  9 (naive, each composition from scratch: 13" in out


def test_bad_spec_exits_2_with_one_line_naming_the_field(tmp_path, capsys):
    raw = yaml.safe_load(DEMO.read_text())
    raw["interventions"][1]["sweep"]["sparsity"] = [0.25, 1.5]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: interventions[1].sweep.sparsity[1]:")


def test_missing_spec_file(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compile_writes_yaml(tmp_path, capsys):
    out = tmp_path / "demo.yaml"
    assert main(["compile", str(DEMO), "-o", str(out), "--store", "s3://bucket/demo"]) == 0
    doc = next(yaml.safe_load_all(out.read_text()))
    assert doc["pipelineInfo"]["name"] == "lmcompose-demo"


def _results_table() -> pd.DataFrame:
    rows = []
    params_ft = '{"steps": 30}'
    for label, methods, steps, sv, succ, util in [
        ("base", "", [], math.nan, 0.0, 0.76),
        ("ft", "ft", [("ft", params_ft)], math.nan, 1.0, 0.74),
        ("wanda(sparsity=0.25)", "wanda", [("wanda", '{"sparsity": 0.25}')], 0.25, 0.0, 0.70),
        ("wanda(sparsity=0.5)", "wanda", [("wanda", '{"sparsity": 0.5}')], 0.5, 0.0, 0.50),
        ("ft > wanda(sparsity=0.25)", "ft>wanda", [("ft", params_ft), ("wanda", '{"sparsity": 0.25}')], 0.25, 0.8, 0.68),
        ("ft > wanda(sparsity=0.5)", "ft>wanda", [("ft", params_ft), ("wanda", '{"sparsity": 0.5}')], 0.5, 0.4, 0.45),
        ("wanda(sparsity=0.25) > ft", "wanda>ft", [("wanda", '{"sparsity": 0.25}'), ("ft", params_ft)], 0.25, 1.0, 0.66),
        ("wanda(sparsity=0.5) > ft", "wanda>ft", [("wanda", '{"sparsity": 0.5}'), ("ft", params_ft)], 0.5, 0.9, 0.40),
    ]:
        row = {"model_key": f"ckpt/{len(rows)}", "n_steps": len(steps), "composition": label, "methods": methods}
        for k in (1, 2):
            row[f"step{k}_method"] = steps[k - 1][0] if len(steps) >= k else ""
            row[f"step{k}_params"] = steps[k - 1][1] if len(steps) >= k else ""
        row.update(sweep_method="wanda" if not math.isnan(sv) else "", sweep_param="sparsity" if not math.isnan(sv) else "",
                   sweep_value=sv, edit_success=succ, edit_generalization=succ, edit_locality=0.4, utility_acc=util,
                   forget_acc=0.7, perplexity=30.0, sparsity=0.0 if math.isnan(sv) else sv, avg_bits=16.0)
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_report_runs_standalone_on_a_results_table(tmp_path, capsys, suffix):
    table = tmp_path / f"results{suffix}"
    df = _results_table()
    df.to_csv(table, index=False) if suffix == ".csv" else df.to_parquet(table, index=False)
    assert main(["report", "--results", str(table), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "ft+wanda" in out or "ft + wanda" in out
    report = (tmp_path / "rep" / "report.md").read_text()
    comp = pd.read_csv(tmp_path / "rep" / "composability.csv")
    at = comp[(comp["criterion"] == "edit_success") & (comp["sweep_value"] == 0.5)].iloc[0]
    # edit success 0.4 (ft first) vs 0.9 (wanda first): OFE = 1 - 0.9, OS = 0.5
    assert at["order_free_error"] == pytest.approx(0.1)
    assert at["order_sensitivity"] == pytest.approx(0.5)
    assert "plots/" in report
    for line in report.splitlines():
        if "](plots/" in line:
            target = line.split("](", 1)[1].split(")", 1)[0]
            assert (tmp_path / "rep" / target).is_file()


def test_report_rejects_table_missing_columns(tmp_path, capsys):
    table = tmp_path / "r.csv"
    _results_table().drop(columns=["sweep_value"]).to_csv(table, index=False)
    assert main(["report", "--results", str(table)]) == 2  # one line, no traceback (tests/test_hostile_reports.py)
    assert "sweep_value" in capsys.readouterr().err


def test_report_command_matches_the_pipelines_aggregator(tmp_path):
    """`lmcompose report --results` knows the method categories: same pair names and # Wins as the aggregator."""
    from pipelines.cli import main

    study = Path(__file__).resolve().parents[1] / "docs" / "results" / "edit-x-unlearn"
    title = (study / "report.md").read_text().splitlines()[0].removeprefix("# ")
    items = ["--items", str(study / "items.json")]  # the report carries the bootstrap intervals
    assert main(["report", "--results", str(study / "results.csv"), "--out", str(tmp_path), "--title", title, *items]) == 0
    assert (tmp_path / "report.md").read_text() == (study / "report.md").read_text()
    assert (tmp_path / "wins.csv").read_text() == (study / "wins.csv").read_text()
    assert "# Wins" in (tmp_path / "report.md").read_text() or "Wins" in (tmp_path / "report.md").read_text()

"""The report: files written, Markdown consistent with the plots, robust to partial results."""

from __future__ import annotations

import json
import math
import base64
import re
from pathlib import Path

import pandas as pd
import pytest

from shared.metrics import PAPER_CATEGORIES, WINS_COLUMN
from shared.report import build_report, console_table, load_results, markdown_table, validate_results
from shared.criteria import CRITERIA

FT = ("ft", {"lr": 5e-5, "steps": 25})


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
        has = k <= len(steps)
        row[f"step{k}_method"] = steps[k - 1][0] if has else ""
        row[f"step{k}_params"] = json.dumps(steps[k - 1][1], sort_keys=True) if has else ""
    for name in CRITERIA:
        row[name] = crit.get(name, math.nan)
    return row


def both_orders(a: tuple[str, dict], b: tuple[str, dict], sweep, crit_ab: dict, crit_ba: dict) -> list[dict]:
    return [make_row([a, b], sweep, **crit_ab), make_row([b, a], sweep, **crit_ba)]


def wanda(s: float) -> tuple[str, dict]:
    return ("wanda", {"sparsity": s, "calib": 8})


SPARSITIES = (0.25, 0.5, 0.75)


def synthetic_results() -> pd.DataFrame:
    """Base, singles, three editors x wanda over a sweep, one unlearner x gptq pair, one orphan."""
    rows = [
        make_row([], edit_success=0.1, utility_acc=0.55, forget_acc=0.6, perplexity=12.0, sparsity=0.0, avg_bits=16.0),
        make_row([FT], edit_success=0.95, utility_acc=0.54, perplexity=12.5, sparsity=0.0, avg_bits=16.0),
    ]
    for s in SPARSITIES:
        rows.append(make_row([wanda(s)], ("wanda", "sparsity", s), utility_acc=0.55 - s / 4, perplexity=12 + 10 * s,
                             sparsity=s, avg_bits=16 - 15 * s))
    editors = {"ft": FT, "memit": ("memit", {"layers": [4, 5]}), "lora": ("lora", {"rank": 8})}
    quality = {"ft": 0.9, "memit": 0.85, "lora": 0.7}
    for name, step in editors.items():
        for s in SPARSITIES:
            if name == "lora" and s == 0.75:
                # only one order was evaluated at this sparsity
                rows.append(make_row([step, wanda(s)], ("wanda", "sparsity", s), edit_success=0.3, utility_acc=0.3))
                continue
            q = quality[name]
            rows += both_orders(
                step, wanda(s), ("wanda", "sparsity", s),
                {"edit_success": q - s / 2, "utility_acc": 0.5 - s / 4, "perplexity": 13 + 10 * s,
                 "sparsity": s, "avg_bits": 16 - 15 * s},
                {"edit_success": q - s, "utility_acc": 0.5 - s / 3, "perplexity": 14 + 10 * s,
                 "sparsity": s, "avg_bits": 16 - 15 * s},
            )
    # unlearner x quantizer at a single bit width, utility NaN in one order
    rows += both_orders(
        ("rmu", {"alpha": 1000}), ("gptq", {"bits": 4}), ("gptq", "bits", 4.0),
        {"forget_acc": 0.30, "utility_acc": 0.5, "avg_bits": 4.25},
        {"forget_acc": 0.50, "utility_acc": math.nan, "avg_bits": 4.25},
    )
    return pd.DataFrame(rows)


def test_build_report_writes_everything(tmp_path: Path) -> None:
    results = synthetic_results()
    written = build_report(results, tmp_path, title="Synthetic run", categories=PAPER_CATEGORIES,
                           floor=("utility_acc", 0.3))
    for key in ("results", "composability", "composability_integrated", "wins", "report"):
        assert written[key].is_file(), key
    assert len(pd.read_csv(written["results"])) == len(results)

    plots = sorted((tmp_path / "plots").glob("*.png"))
    # ft, memit, lora x wanda: edit_success + utility_acc each; rmu+gptq: forget_acc + utility_acc
    assert len(plots) == 3 * 2 + 2
    assert all(p.stat().st_size > 1000 for p in plots)
    assert {p.name for p in plots} == {Path(k).name for k in written if k.startswith("plots/")}

    md = written["report"].read_text()
    assert md.startswith("# Synthetic run")
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(refs) == sorted(f"plots/{p.name}" for p in plots)
    assert all((tmp_path / r).is_file() for r in refs)
    assert "(base model)" in md
    assert "## # Wins" in md and "no opposite-order counterpart" in md
    assert "| ft > wanda | wanda > ft |" in md.replace("| criterion ", "")  # order columns named by order
    # measurements of every row are listed
    assert md.count("avg_bits") >= 1 and "4.25" in md

    # the self-contained HTML page the Kubeflow UI shows: every plot inlined, every table rendered
    page = written["report_html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>Synthetic run</title>" in page
    inlined = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(inlined) == len(plots)
    assert sorted(base64.b64decode(d) for d in inlined) == sorted(p.read_bytes() for p in plots)
    assert 'src="plots/' not in page
    assert page.count("<table>") == md.count("\n|---") and "<th>ft &gt; wanda</th>" in page


def test_html_report_inlines_only_plots_inside_the_report_folder(tmp_path: Path) -> None:
    from shared.report import html_report

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "a.png").write_bytes(b"\x89PNG-inside")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG-outside")
    page = html_report("![a](a.png)\n\n![s](../secret.png)\n\n<script>x</script>\n", tmp_path / "report", "t")
    assert base64.b64encode(b"\x89PNG-inside").decode() in page
    assert base64.b64encode(b"\x89PNG-outside").decode() not in page and 'src="../secret.png"' in page
    assert "<script>" not in page  # raw HTML in the Markdown is escaped, not passed through


def test_report_tables_content(tmp_path: Path) -> None:
    written = build_report(synthetic_results(), tmp_path, categories=PAPER_CATEGORIES, floor=("utility_acc", 0.3))
    comp = pd.read_csv(written["composability"])
    rmu = comp[(comp["pair"] == "rmu+gptq") & (comp["criterion"] == "forget_acc")].iloc[0]
    assert rmu["order_free_error"] == pytest.approx(0.30) and rmu["order_sensitivity"] == pytest.approx(0.20)
    # lora+wanda kept only the two sparsities with both orders
    assert sorted(comp[(comp["pair"] == "lora+wanda") & (comp["criterion"] == "edit_success")]["sweep_value"]) == [0.25, 0.5]

    integ = pd.read_csv(written["composability_integrated"], keep_default_na=False, na_values=[""])
    assert set(integ["floor"].fillna("")) == {"", "utility_acc>=0.3"}
    ft_plain = integ[(integ["pair"] == "ft+wanda") & (integ["criterion"] == "edit_success") & (integ["floor"].isna())].iloc[0]
    # OFE = 1 - (0.9 - s/2) = 0.1 + s/2 -> 0.225, 0.35, 0.475 over x 0, .5, 1 -> area 0.35
    assert ft_plain["integrated_order_free_error"] == pytest.approx(0.35)
    ft_floor = integ[(integ["pair"] == "ft+wanda") & (integ["criterion"] == "edit_success") & integ["floor"].notna()].iloc[0]
    # utility 0.5 - s/3 < 0.3 at s = 0.75 in the wanda>ft order: two points remain
    assert ft_floor["n_points"] == 2

    wins = pd.read_csv(written["wins"])
    edit_int = wins[(wins["group"] == "edit") & (wins["basis"] == "integrated")].set_index("method")
    assert set(edit_int.index) == {"ft", "lora", "memit"}
    assert edit_int[WINS_COLUMN].sum() >= 1
    # ft has the lowest edit OFE over the restricted sweep among the editors
    col = "wanda edit_success OFE"
    assert edit_int.loc["ft", col] < edit_int.loc["memit", col]
    assert edit_int.loc["ft", WINS_COLUMN] >= 1


def test_report_with_only_base_and_single_rows(tmp_path: Path) -> None:
    results = pd.DataFrame([make_row([], utility_acc=0.5), make_row([FT], edit_success=0.9)])
    written = build_report(results, tmp_path, categories=PAPER_CATEGORIES)
    md = written["report"].read_text()
    assert "No opposite-order pairs" in md
    assert not list((tmp_path / "plots").glob("*.png"))
    assert pd.read_csv(written["composability"]).empty
    assert "no opposite-order pairs" in console_table(results)


def test_report_without_sweep_has_undefined_integrals(tmp_path: Path) -> None:
    rows = both_orders(FT, wanda(0.5), ("wanda", "sparsity", 0.5), {"edit_success": 0.8}, {"edit_success": 0.6})
    rows += both_orders(("memit", {}), wanda(0.5), ("wanda", "sparsity", 0.5), {"edit_success": 0.7}, {"edit_success": 0.7})
    written = build_report(pd.DataFrame(rows), tmp_path, categories=PAPER_CATEGORIES)
    md = written["report"].read_text()
    assert "integrated values are not defined" in md
    wins = pd.read_csv(written["wins"])
    # only the per-setting basis exists: ft OFE 0.2 vs memit 0.3 -> ft; OS 0.2 vs 0.0 -> memit
    assert set(wins["basis"]) == {"per setting (sparsity=0.5)"}
    assert wins.set_index("method")[WINS_COLUMN].to_dict() == {"ft": 1, "memit": 1}


def test_summary_at_selects_the_compared_sweep_value(tmp_path: Path) -> None:
    written = build_report(synthetic_results(), tmp_path, categories=PAPER_CATEGORIES, summary_at={"sparsity": 0.25})
    wins = pd.read_csv(written["wins"])
    per = wins[(wins["group"] == "edit") & wins["basis"].str.startswith("per setting")].set_index("method")
    assert set(per["basis"]) == {"per setting (sparsity=0.25)"}
    # wanda and gptq never share an opponent here: no compressor column has two competitors, no table
    assert "compress" not in set(wins["group"])
    # at 0.25: OFE ft 0.225, memit 0.275, lora 0.425 -> ft wins; OS all 0.125 -> tie, nobody
    assert per.loc["ft", WINS_COLUMN] == 1
    assert per.loc["memit", WINS_COLUMN] == 0 and per.loc["lora", WINS_COLUMN] == 0


def test_wins_need_categories(tmp_path: Path) -> None:
    written = build_report(synthetic_results(), tmp_path)
    assert pd.read_csv(written["wins"]).empty
    assert "pass a method -> category mapping" in written["report"].read_text()


def test_console_table_lists_both_orders_and_metrics() -> None:
    text = console_table(synthetic_results(), PAPER_CATEGORIES)
    header = text.splitlines()[0]
    for col in ("pair", "sweep", "criterion", "first>second", "second>first", "OFE", "OS"):
        assert col in header
    rmu_line = next(line for line in text.splitlines() if "rmu+gptq" in line and "forget_acc" in line)
    assert "bits=4" in rmu_line and "0.300" in rmu_line and "0.500" in rmu_line and "0.200" in rmu_line
    assert "note:" in text


def test_load_results_roundtrip_csv_and_parquet(tmp_path: Path) -> None:
    results = synthetic_results()
    results.loc[0, "model_key"] = "1e5"  # must stay a string
    csv = tmp_path / "r.csv"
    results.to_csv(csv, index=False)
    loaded = load_results(csv)
    assert loaded.loc[0, "model_key"] == "1e5"
    assert loaded.loc[0, "step1_method"] == ""  # empty cells read back as "" not NaN
    assert len(loaded) == len(results)
    pq = tmp_path / "r.parquet"
    results.to_parquet(pq, index=False)
    assert load_results(pq)["forget_acc"].equals(loaded["forget_acc"])
    with pytest.raises(ValueError, match="unsupported"):
        load_results(tmp_path / "r.json")


def test_load_results_names_missing_columns(tmp_path: Path) -> None:
    bad = synthetic_results().drop(columns=["forget_acc", "step2_params"])
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(ValueError) as err:
        load_results(path)
    assert "forget_acc" in str(err.value) and "step2_params" in str(err.value)
    # a base-only table needs no step columns
    validate_results(pd.DataFrame([make_row([])]).drop(columns=["step1_method", "step1_params",
                                                                  "step2_method", "step2_params"]))


def test_markdown_table_escapes_and_formats() -> None:
    text = markdown_table(pd.DataFrame({"a|b": ["x|y"], "v": [0.12345], "n": [float("nan")]}))
    lines = text.splitlines()
    assert lines[0] == "| a\\|b | v | n |"
    assert lines[2] == "| x\\|y | 0.123 | n/a |"


def test_compressors_compete_for_the_same_opponent(tmp_path: Path) -> None:
    rows = both_orders(FT, wanda(0.5), ("wanda", "sparsity", 0.5), {"edit_success": 0.8}, {"edit_success": 0.6})
    rows += both_orders(FT, ("gptq", {"bits": 4}), ("gptq", "bits", 4.0), {"edit_success": 0.9}, {"edit_success": 0.9})
    written = build_report(pd.DataFrame(rows), tmp_path, categories=PAPER_CATEGORIES)
    wins = pd.read_csv(written["wins"])
    comp = wins[wins["group"] == "compress"].set_index("method")
    assert set(comp["basis"]) == {"per setting (bits=4, sparsity=0.5)"}
    # vs ft: OFE gptq 0.1 < wanda 0.2, OS gptq 0.0 < wanda 0.2 -> gptq wins both columns
    assert comp[WINS_COLUMN].to_dict() == {"gptq": 2, "wanda": 0}
    assert "edit" not in set(wins["group"])  # a single editor has nobody to beat

"""Malformed and hostile report folders: one line on stderr, exit 2, nothing written outside --out.

The reproduction set of issue 28 (items 2-4) for the three report readers,
``lmcompose compare``, ``findings`` and ``report``: each case copies a real
report from ``docs/results`` into ``tmp_path``, damages one thing in it --
a criterion or label that is a path, a number that is a string, infinite,
negative or out of range, an item score that is NaN or 7, a point value
changed after the report was written, a file that is empty, binary, not
JSON or lacks a column, an ``--out`` that cannot be used -- and checks that
the command exits with status 2 and prints exactly one line naming the file
(and, for a table, the row and column), with no traceback (an exception out
of ``main`` fails the test) and no file written outside ``--out``.  The last
cases are the store's: a result document whose ``_sha256`` seal was removed
is not trusted unless ``LMCOMPOSE_ALLOW_UNSEALED=1``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
LONG = "k" * 300  # a name from data as long as the "300-character reference key"


# --------------------------------------------------------------------------- helpers


def _copy(study: str, dst: Path) -> Path:
    shutil.copytree(RESULTS / study, dst, ignore=shutil.ignore_patterns("plots"))
    return dst


def _edit_csv(path: Path, fn: Callable[[list[list[str]]], None]) -> None:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    fn(rows)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def _set(path: Path, column: str, value: str, match: Callable[[dict[str, str]], bool] = lambda r: True,
         every: bool = False) -> None:
    """Set ``column`` of the first (or every) data row matching ``match``."""
    def fn(rows: list[list[str]]) -> None:
        i = rows[0].index(column)
        hits = [r for r in rows[1:] if match(dict(zip(rows[0], r)))]
        assert hits, f"no row of {path} matches"
        for r in hits if every else hits[:1]:
            r[i] = value
    _edit_csv(path, fn)


def _drop_column(path: Path, column: str) -> None:
    def fn(rows: list[list[str]]) -> None:
        i = rows[0].index(column)
        for r in rows:
            del r[i]
    _edit_csv(path, fn)


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], out: Path,
             *expected: str) -> str:
    """Run ``argv``: exit 2, exactly one ``error:`` line containing ``expected``, nothing new outside ``out``."""
    before = _files(tmp_path)
    capsys.readouterr()
    rc = main(argv)  # an exception here (a traceback for the user) fails the test
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, f"exit {rc}, stderr: {err!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    new = _files(tmp_path) - before
    outside = [p for p in new if not p.resolve().is_relative_to(out.resolve())]
    assert not outside, f"written outside --out: {outside}"
    return lines[0]


# --------------------------------------------------------------------------- compare


def _two(tmp_path: Path) -> tuple[Path, Path, Path]:
    a = _copy("two-models/smollm2-135m", tmp_path / "in" / "a")
    b = _copy("two-models/tiny-random", tmp_path / "in" / "b")
    return a, b, tmp_path / "in" / "out"


def _compare_argv(a: Path, b: Path, out: Path, labels: tuple[str, str] = ("a", "b")) -> list[str]:
    return ["compare", f"{labels[0]}={a}", f"{labels[1]}={b}", "--out", str(out)]


def test_compare_of_the_real_reports_writes_only_under_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, out = _two(tmp_path)
    before = _files(tmp_path)
    assert main(_compare_argv(a, b, out)) == 0
    new = _files(tmp_path) - before
    assert new and all(p.is_relative_to(out) for p in new)
    assert (out / "plots" / "edit_success__ofe_vs_size.png").is_file()


@pytest.mark.parametrize("criterion", ["../../escaped", "ABSOLUTE", LONG], ids=["dotdot", "absolute", "300-chars"])
def test_compare_refuses_a_criterion_that_is_not_a_plain_name(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              criterion: str) -> None:
    """Today: ../.. and an absolute path put the plot outside --out; 300 characters: OSError File name too long."""
    a, b, out = _two(tmp_path)
    if criterion == "ABSOLUTE":
        criterion = str(tmp_path / "victim" / "escaped")
    for folder in (a, b):
        _set(folder / "composability.csv", "criterion", criterion, every=True)
    line = _refused(tmp_path, capsys, _compare_argv(a, b, out), out, "composability.csv: row 2, column criterion")
    assert ("longer than 64" in line) if criterion == LONG else ("cannot be part of a file name" in line)
    assert not (tmp_path / "victim").exists() and not list(tmp_path.rglob("escaped*"))


@pytest.mark.parametrize("label", ["../../x", "/tmp/x", LONG], ids=["dotdot", "absolute", "300-chars"])
def test_compare_refuses_a_label_that_is_not_a_plain_name(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          label: str) -> None:
    a, b, out = _two(tmp_path)
    _refused(tmp_path, capsys, _compare_argv(a, b, out, (label, "b")), out, "model label")


@pytest.mark.parametrize("column,value,message", [
    ("order_free_error", "abc", "'abc' is not a number"),
    ("order_free_error", "-3", "out of range"),
    ("order_sensitivity", "7", "out of range"),
    ("order_sensitivity", "inf", "not a finite number"),
], ids=["ofe-abc", "ofe-negative", "os-7", "os-inf"])
def test_compare_refuses_a_metric_that_is_not_a_number_in_0_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              column: str, value: str, message: str) -> None:
    """Today: printed as it is ("abc", -3.000) in the cross-model report, exit 0."""
    a, b, out = _two(tmp_path)
    _set(a / "composability.csv", column, value)
    _refused(tmp_path, capsys, _compare_argv(a, b, out), out, f"{a / 'composability.csv'}: row 2, column {column}",
             message)


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"num_parameters": "many", "source": "x"}', "num_parameters"),
    ('{"num_parameters": -5}', "num_parameters"),
    ("", "not valid JSON"),
], ids=["invalid", "list", "count-string", "count-negative", "empty"])
def test_compare_refuses_a_malformed_model_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                                                message: str) -> None:
    a, b, out = _two(tmp_path)
    (a / "model.json").write_text(content)
    _refused(tmp_path, capsys, _compare_argv(a, b, out), out, "model.json", message)


def test_compare_refuses_a_table_missing_a_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, out = _two(tmp_path)
    _drop_column(a / "composability.csv", "order_free_error")
    _refused(tmp_path, capsys, _compare_argv(a, b, out), out, "composability.csv", "missing column(s) order_free_error")


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (bytes(range(256)) * 8, "binary content"),
    (b"\xff\xfe" + "pair,criterion\n".encode("utf-16-le"), "binary content"),
], ids=["empty", "binary", "utf16"])
def test_compare_refuses_an_empty_or_binary_table(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                                                  message: str) -> None:
    a, b, out = _two(tmp_path)
    (a / "composability.csv").write_bytes(content)
    _refused(tmp_path, capsys, _compare_argv(a, b, out), out, "composability.csv", message)


def test_compare_refuses_an_orders_table_with_a_bad_k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, out = _two(tmp_path)
    (a / "composability_orders.csv").write_text(
        "combo,k,setting,sweep_param,sweep_value,criterion,order_free_error,order_sensitivity\n"
        "memit+rmu+gptq,abc,default,,,edit_success,0.1,0.1\n")
    _refused(tmp_path, capsys, _compare_argv(a, b, out), out, "composability_orders.csv: row 2, column k")


def test_compare_refuses_an_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, out = _two(tmp_path)
    out.write_text("not a folder")
    _refused(tmp_path, capsys, _compare_argv(a, b, out), out, f"--out {out}", "not a folder")
    assert out.read_text() == "not a folder"


def test_compare_refuses_an_out_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, out = _two(tmp_path)
    (tmp_path / "in" / "file").write_text("x")
    out = tmp_path / "in" / "file" / "deeper"
    _refused(tmp_path, capsys, _compare_argv(a, b, out), out, "is a file, not a folder")


# --------------------------------------------------------------------------- findings


def _study(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "results"
    return root, _copy("edit-x-compress", root / "edit-x-compress")


def _findings_argv(root: Path, out: Path) -> list[str]:
    return ["findings", str(root), "--out", str(out), "--resamples", "20"]


def _is_ft(row: dict[str, str]) -> bool:
    return row["composition"] == "ft"


def test_findings_on_a_missing_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Today: exit 0 with seven "not measured"."""
    out = tmp_path / "findings.md"
    _refused(tmp_path, capsys, _findings_argv(tmp_path / "nonexistent", out), out, "nonexistent", "is not a folder")
    assert not out.exists()


def test_findings_on_a_folder_without_any_study_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "findings.md"
    _refused(tmp_path, capsys, _findings_argv(tmp_path / "empty", out), out, "no study report in")


@pytest.mark.parametrize("value,message", [
    ("inf", "not a finite number"),
    ("abc", "'abc' is not a number"),
    ("7", "out of range"),
    ("0.0", "but the per-item scores in"),  # in range, but not what its items give: changed after the evaluation
], ids=["inf-point", "string-number", "accuracy-7", "changed-point"])
def test_findings_refuses_a_tampered_point(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str,
                                           message: str) -> None:
    """Today: inf keeps finding 1's verdict (a point outside its own interval); "abc" becomes NaN; exit 0."""
    root, study = _study(tmp_path)
    _set(study / "results.csv", "edit_success", value, _is_ft)
    out = tmp_path / "findings.md"
    _refused(tmp_path, capsys, _findings_argv(root, out), out, "results.csv: row 3, column edit_success", message)
    assert not out.exists()


@pytest.mark.parametrize("value,message", [
    (float("nan"), "NaN, a finite number is needed"),
    (7, "7 is out of range (must be in [0, 1])"),
    (-1, "out of range"),
    ("1", "'1' is not a number"),
    (True, "True is not a number"),
], ids=["nan-item", "item-7", "item-negative", "item-string", "item-bool"])
def test_findings_refuses_a_bad_item_score(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: object,
                                           message: str) -> None:
    """Today: a NaN item turns "reproduced" into "inconclusive" shown as `(no interval: )`; a 7 is accepted."""
    root, study = _study(tmp_path)
    _edit_json(study / "items.json", lambda d: d["records"][1]["items"]["edit_success"]["values"].__setitem__(0, value))
    out = tmp_path / "findings.md"
    _refused(tmp_path, capsys, _findings_argv(root, out), out,
             "items.json: records[1].items.edit_success.values[0]", message)


@pytest.mark.parametrize("damage,message", [
    (lambda d: d["records"][0].pop("items"), "records[0].items: expected an object of criteria"),
    (lambda d: d["records"][0]["items"].__setitem__("edit_success", [1, 0]), "records[0].items.edit_success: expected"),
    (lambda d: d.__setitem__("records", {"a": 1}), "not an lm-compose items file"),
    (lambda d: d["records"].__setitem__(0, "x"), "records[0]: expected an object"),
    (lambda d: d["records"][0].__setitem__("edit_batch", "0"), "records[0].edit_batch"),
    (lambda d: d["records"][1]["items"]["edit_success"]["values"].pop(), "records[1].items.edit_success: 9 items"),
    (lambda d: d["records"].append(d["records"][0]), "a second record for composition"),
    (lambda d: d["records"][0]["items"]["perplexity"].__setitem__("weights", [1.0]), "weights: expected a list"),
], ids=["no-items", "values-a-list", "records-an-object", "record-a-string", "batch-a-string", "item-count",
        "duplicate-record", "weights-length"])
def test_findings_refuses_a_wrongly_shaped_items_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      damage: Callable[[dict], None], message: str) -> None:
    root, study = _study(tmp_path)
    _edit_json(study / "items.json", damage)
    out = tmp_path / "findings.md"
    _refused(tmp_path, capsys, _findings_argv(root, out), out, "items.json", message)


def test_findings_refuses_an_items_file_that_is_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, study = _study(tmp_path)
    (study / "items.json").write_text("{")
    out = tmp_path / "findings.md"
    _refused(tmp_path, capsys, _findings_argv(root, out), out, "items.json", "not valid JSON")


def test_findings_refuses_a_results_table_missing_a_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Today: exit 0, findings 1-4 "not measured" as if the study had not measured edit success."""
    root, study = _study(tmp_path)
    _drop_column(study / "results.csv", "edit_success")
    out = tmp_path / "findings.md"
    _refused(tmp_path, capsys, _findings_argv(root, out), out, "results.csv",
             "missing required column(s): edit_success")


@pytest.mark.parametrize("content,message", [(b"", "empty file"), (bytes(range(256)) * 8, "binary content")],
                         ids=["empty", "binary"])
def test_findings_refuses_an_empty_or_binary_results_table(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           content: bytes, message: str) -> None:
    root, study = _study(tmp_path)
    (study / "results.csv").write_bytes(content)
    out = tmp_path / "findings.md"
    _refused(tmp_path, capsys, _findings_argv(root, out), out, "results.csv", message)


def test_findings_refuses_an_out_in_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = _study(tmp_path)
    out = tmp_path / "missing" / "findings.md"
    _refused(tmp_path, capsys, _findings_argv(root, out), out, f"folder {out.parent} does not exist")
    assert not out.parent.exists()


def test_findings_refuses_an_out_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = _study(tmp_path)
    _refused(tmp_path, capsys, _findings_argv(root, tmp_path), tmp_path / "none", "is a folder, not a file")


# --------------------------------------------------------------------------- report


def _report_input(tmp_path: Path) -> tuple[Path, Path]:
    study = _copy("edit-x-unlearn", tmp_path / "study")
    return study, tmp_path / "out"


def _report_argv(study: Path, out: Path, *extra: str) -> list[str]:
    return ["report", "--results", str(study / "results.csv"), "--out", str(out), "--resamples", "20", *extra]


def _both_orders(method: str) -> Callable[[dict[str, str]], bool]:
    return lambda row: method in (row["step1_method"], row["step2_method"])


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", LONG, "a b"],
                         ids=["dotdot", "absolute", "300-chars", "space"])
def test_report_refuses_a_method_that_is_not_a_plain_name(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          name: str) -> None:
    """A method names the plot files; 300 characters: today an OSError (File name too long) traceback."""
    study, out = _report_input(tmp_path)
    for column in ("step1_method", "step2_method"):
        _set(study / "results.csv", column, name, lambda r, c=column: r[c] == "gd", every=True)
    line = _refused(tmp_path, capsys, _report_argv(study, out), out, "results.csv: row", "column step1_method")
    assert ("longer than 64" in line) if name == LONG else ("cannot be part of a file name" in line)
    assert not list(tmp_path.rglob("escaped*"))


@pytest.mark.parametrize("column,value,message", [
    ("utility_acc", "7", "out of range (must be in [0, 1])"),
    ("forget_acc", "abc", "'abc' is not a number"),
    ("edit_success", "-inf", "not a finite number"),
    ("perplexity", "0.5", "out of range (must be >= 1)"),
    ("n_steps", "1.5", "not a whole number"),
    ("n_steps", "1000000000", "out of range"),
], ids=["accuracy-7", "string-number", "minus-inf", "perplexity-below-1", "n_steps-fraction", "n_steps-huge"])
def test_report_refuses_a_value_out_of_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str], column: str,
                                                  value: str, message: str) -> None:
    study, out = _report_input(tmp_path)
    _set(study / "results.csv", column, value)
    _refused(tmp_path, capsys, _report_argv(study, out), out, f"results.csv: row 2, column {column}", message)


def test_report_refuses_a_criterion_its_items_do_not_give(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study, out = _report_input(tmp_path)
    _set(study / "results.csv", "utility_acc", "0.5")
    _refused(tmp_path, capsys, _report_argv(study, out), out, "results.csv: row 2, column utility_acc",
             "but the per-item scores in")


def test_report_refuses_a_wrongly_shaped_items_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study, out = _report_input(tmp_path)
    _edit_json(study / "items.json", lambda d: d["records"][0].pop("composition"))
    _refused(tmp_path, capsys, _report_argv(study, out), out, "items.json: records[0].composition: expected a string")


def test_report_refuses_a_missing_items_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study, out = _report_input(tmp_path)
    _refused(tmp_path, capsys, _report_argv(study, out, "--items", str(tmp_path / "none.json")), out,
             "none.json does not exist")


def test_report_refuses_a_table_missing_a_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study, out = _report_input(tmp_path)
    _drop_column(study / "results.csv", "sweep_value")
    _refused(tmp_path, capsys, _report_argv(study, out), out, "results.csv", "missing required column(s): sweep_value")


@pytest.mark.parametrize("content,message", [(b"", "empty file"), (bytes(range(256)) * 8, "binary content"),
                                             (b"a,b\n\"unclosed,1\n", "not a CSV table")],
                         ids=["empty", "binary", "not-a-results-table"])
def test_report_refuses_an_empty_or_binary_table(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                                                 message: str) -> None:
    study, out = _report_input(tmp_path)
    (study / "results.csv").write_bytes(content)
    _refused(tmp_path, capsys, _report_argv(study, out), out, "results.csv", message)


def test_report_refuses_a_missing_results_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _refused(tmp_path, capsys, ["report", "--results", str(tmp_path / "none.csv"), "--out", str(out)], out,
             "none.csv: no such file")


def test_report_refuses_an_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study, out = _report_input(tmp_path)
    out.write_text("not a folder")
    _refused(tmp_path, capsys, _report_argv(study, out), out, f"--out {out}", "not a folder")
    assert out.read_text() == "not a folder"


def test_the_console_script_prints_one_line_not_a_traceback(tmp_path: Path) -> None:
    """The same through the installed entry point, as a user sees it (one process, the three commands' cases)."""
    bad = tmp_path / "results.csv"
    bad.write_bytes(bytes(range(256)) * 8)
    code = (
        "import sys\n"
        "from pipelines.cli import main\n"
        "for argv in ([\"findings\", sys.argv[1] + \"/nonexistent\", \"--out\", sys.argv[1] + \"/f.md\"],\n"
        "             [\"report\", \"--results\", sys.argv[1] + \"/results.csv\", \"--out\", sys.argv[1] + \"/r\"],\n"
        "             [\"compare\", \"a=\" + sys.argv[1], \"b=\" + sys.argv[1], \"--out\", sys.argv[1] + \"/c\"]):\n"
        "    print(main(argv), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = proc.stderr.splitlines()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[1::2] == ["2", "2", "2"] and all(line.startswith("error: ") for line in lines[0::2]), lines


# --------------------------------------------------------------------------- the store's sealed documents


def test_a_result_document_without_its_seal_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Today: a document whose `_sha256` was removed is read as an old unsealed one (a changed value passes)."""
    from shared.store import SEAL, LocalStore, StoreError

    monkeypatch.delenv("LMCOMPOSE_ALLOW_UNSEALED", raising=False)
    store = LocalStore(tmp_path / "store")
    store.put_json("results/r.json", {"criteria": {"edit_success": 0.7}})
    path = tmp_path / "store" / "results" / "r.json"
    doc = json.loads(path.read_text())
    assert SEAL in doc
    path.write_text(json.dumps({"criteria": {"edit_success": 0.9}}))  # changed, and its seal removed
    assert not store.has_json("results/r.json")  # refused: counts as missing, so it is evaluated again
    with pytest.raises(KeyError):
        store.get_json("results/r.json")
    assert not path.exists() and list((tmp_path / "store" / "quarantine").iterdir())  # kept aside, not deleted

    # a legacy store, read on purpose: the documented flag restores the old reading
    path.write_text(json.dumps({"criteria": {"edit_success": 0.9}}))
    monkeypatch.setenv("LMCOMPOSE_ALLOW_UNSEALED", "1")
    assert store.get_json("results/r.json") == {"criteria": {"edit_success": 0.9}}
    monkeypatch.setenv("LMCOMPOSE_ALLOW_UNSEALED", "maybe")
    with pytest.raises(StoreError, match="LMCOMPOSE_ALLOW_UNSEALED"):
        store.get_json("results/r.json")

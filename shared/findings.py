"""The paper's seven findings (its Section 4), each checked on a study report with a bootstrap interval.

Each finding is a *direction* -- a sign, a ranking, "grows with strength" --
not a value a 135M model should match.  So each is checked by one or more
*tests*: a statistic built from the study's criteria (a difference, a mean of
differences) whose sign the paper predicts, with its interval from the same
paired bootstrap as the report (:mod:`shared.uncertainty`: every resample
scores every model on the same draw of edits / questions, so a difference
between two models is measured on the same items).

Verdict of a finding, from its tests' intervals:

* **reproduced** -- every test's interval excludes 0 on the paper's side;
* **not reproduced** -- some test's interval excludes 0 on the other side;
* **inconclusive at this scale** -- otherwise (an interval contains 0);
* **not measured** -- the study's report is missing or has no per-item
  scores, so no interval (and so no verdict) exists.

A report folder is read as ``lmcompose report`` reads it (columns, types and
ranges checked, each criterion checked against the mean of its per-item
scores): a malformed or changed one is refused with one line
(:class:`shared.inputs.InputError`), never judged.

Pure pandas/numpy: ``lmcompose findings`` calls :func:`write_findings`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.inputs import InputError, output_file
from shared.metrics import PAPER_CATEGORIES, pair_table
from shared.uncertainty import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    Bootstrap,
    bootstrap_criteria,
    check_results_match_items,
    pair_draws,
    read_item_records,
)

EDITORS = ("ft", "lora", "memit")
UNLEARNERS = ("ga", "gd", "rmu")
PRUNERS = ("wanda", "sparsegpt")
QUANTIZERS = ("gptq", "awq")


# --------------------------------------------------------------------------- quantities


@dataclass(frozen=True)
class Quantity:
    """A point value with its bootstrap draws (``None`` when the study has no per-item scores)."""

    point: float
    draws: np.ndarray | None

    def __sub__(self, other: "Quantity") -> "Quantity":
        return Quantity(self.point - other.point,
                        None if self.draws is None or other.draws is None else self.draws - other.draws)


def mean_of(quantities: Sequence[Quantity]) -> Quantity:
    """The mean of several quantities, resample by resample."""
    if not quantities:
        raise ValueError("no quantity to average (the study lacks the rows this test needs)")
    draws = None if any(q.draws is None for q in quantities) else np.mean([q.draws for q in quantities], axis=0)
    return Quantity(float(np.mean([q.point for q in quantities])), draws)


class Study:
    """One study report folder (``results.csv``, ``items.json``) with lookups by method and strength."""

    def __init__(self, name: str, folder: Path, resamples: int, seed: int, confidence: float) -> None:
        self.name = name
        self.folder = folder
        from shared.report import load_results  # (matplotlib only when a study is read)

        # read as `lmcompose report` reads it: columns, types and ranges checked; every criterion must be
        # what its per-item scores give (InputError, one line naming the file, row and column, otherwise)
        self.results = load_results(folder / "results.csv")
        items = folder / "items.json"
        records = read_item_records(items) if items.is_file() else None
        if records:
            check_results_match_items(self.results, records, str(folder / "results.csv"), str(items))
        self.boot: Bootstrap | None = (
            bootstrap_criteria(records, resamples, seed, confidence) if records is not None else None
        )
        self.confidence = confidence
        self.pairs = pair_table(self.results, PAPER_CATEGORIES)
        self._pair_draws = pair_draws(self.pairs, self.boot) if self.boot else {}

    # -- rows
    def _row(self, steps: Sequence[str], sweep_value: float | None) -> pd.Series:
        r = self.results
        mask = r["n_steps"] == len(steps)
        for k, method in enumerate(steps, start=1):
            mask &= r[f"step{k}_method"] == method
        if sweep_value is not None:
            mask &= (r["sweep_value"] - sweep_value).abs() < 1e-9
        rows = r[mask]
        if len(rows) != 1:
            raise LookupError(f"{self.name}: {len(rows)} rows for {' > '.join(steps)}"
                              + (f" at {sweep_value:g}" if sweep_value is not None else ""))
        return rows.iloc[0]

    def value(self, steps: Sequence[str], criterion: str, sweep_value: float | None = None) -> Quantity:
        """The criterion of the model made by ``steps`` (in order) at the swept strength ``sweep_value``."""
        row = self._row(steps, sweep_value)
        draws = self.boot.get(str(row["composition"]), criterion) if self.boot else None
        return Quantity(float(row[criterion]), draws)

    def pair_metric(self, a: str, b: str, criterion: str, metric: str, sweep_value: float | None = None) -> Quantity:
        """``order_free_error`` / ``order_sensitivity`` of the pair {a, b} (either naming order)."""
        p = self.pairs
        mask = (((p["first"] == a) & (p["second"] == b)) | ((p["first"] == b) & (p["second"] == a))) & (
            p["criterion"] == criterion)
        if sweep_value is not None:
            mask &= (p["sweep_value"] - sweep_value).abs() < 1e-9
        rows = p[mask]
        if len(rows) != 1:
            raise LookupError(f"{self.name}: {len(rows)} pair rows for {a}+{b} {criterion}"
                              + (f" at {sweep_value:g}" if sweep_value is not None else ""))
        idx = rows.index[0]
        draws = self._pair_draws.get(idx, {}).get(metric) if self.boot else None
        return Quantity(float(rows.iloc[0][metric]), draws)

    # -- what the study holds
    def methods(self, names: Sequence[str]) -> list[str]:
        present = set(self.results["step1_method"]) | set(self.results.get("step2_method", pd.Series(dtype=str)))
        return [m for m in names if m in present]

    def strengths(self, compressor: str) -> list[float]:
        """Swept strengths of ``compressor``, weakest first (more sparsity / fewer bits is stronger)."""
        r = self.results
        values = sorted({float(v) for v in r[(r["n_steps"] == 1) & (r["step1_method"] == compressor)]["sweep_value"]
                         if not math.isnan(float(v))})
        bits = r[(r["step1_method"] == compressor)]["sweep_param"].eq("bits").any()
        return values[::-1] if bits else values


# --------------------------------------------------------------------------- findings


@dataclass
class TestResult:
    description: str
    quantity: Quantity | None
    lo: float = math.nan
    hi: float = math.nan
    error: str = ""

    @property
    def side(self) -> int:
        """+1: interval above 0 (the paper's side); -1: below 0; 0: contains 0 or no interval."""
        if self.quantity is None or math.isnan(self.lo):
            return 0
        return 1 if self.lo > 0 else (-1 if self.hi < 0 else 0)


@dataclass
class Finding:
    number: int
    title: str
    paper: str
    study: str
    tests: list[tuple[str, Callable[[Study], Quantity]]]
    context: list[tuple[str, Callable[[Study], Quantity]]] = field(default_factory=list)


@dataclass
class FindingResult:
    finding: Finding
    verdict: str
    tests: list[TestResult]
    context: list[TestResult]
    note: str = ""


def _strongest(study: Study, compressor: str) -> float:
    return study.strengths(compressor)[-1]


def _weakest(study: Study, compressor: str) -> float:
    return study.strengths(compressor)[0]


def _best_order(study: Study, a: str, b: str, criterion: str, s: float) -> Quantity:
    """max over the two orders (higher-is-better criterion): 1 - order-free error."""
    ofe = study.pair_metric(a, b, criterion, "order_free_error", s)
    return Quantity(1.0 - ofe.point, None if ofe.draws is None else 1.0 - ofe.draws)


def _compressors(study: Study, names: Sequence[str], min_strengths: int = 1) -> list[str]:
    return [c for c in study.methods(names) if len(study.strengths(c)) >= min_strengths]


def f1_drop(study: Study) -> Quantity:
    """edit success alone - best-order edit success at each compressor's strongest strength (mean)."""
    return mean_of([study.value([e], "edit_success") - _best_order(study, e, c, "edit_success", _strongest(study, c))
                    for e in study.methods(EDITORS) for c in _compressors(study, PRUNERS + QUANTIZERS)])


def f1_growth(study: Study) -> Quantity:
    """best-order edit success at the weakest - at the strongest strength (mean over editor x compressor)."""
    return mean_of([_best_order(study, e, c, "edit_success", _weakest(study, c))
                    - _best_order(study, e, c, "edit_success", _strongest(study, c))
                    for e in study.methods(EDITORS) for c in _compressors(study, PRUNERS + QUANTIZERS, 2)])


def _order_gain(study: Study, compressors: Sequence[str], pick: Callable[[Study, str], float]) -> Quantity:
    """success(compress > edit) - success(edit > compress), mean over editors x compressors."""
    return mean_of([study.value([c, e], "edit_success", pick(study, c)) - study.value([e, c], "edit_success", pick(study, c))
                    for e in study.methods(EDITORS) for c in _compressors(study, compressors)])


def f2_strong_pruning(study: Study) -> Quantity:
    return _order_gain(study, PRUNERS, _strongest)


def f2_weak_pruning(study: Study) -> Quantity:
    return _order_gain(study, PRUNERS, _weakest)


def f2_quantization(study: Study) -> Quantity:
    return _order_gain(study, QUANTIZERS, lambda st, c: 4.0 if 4.0 in st.strengths(c) else _strongest(st, c))


def _gptq_minus_awq(criterion: str, metric: str) -> Callable[[Study], Quantity]:
    def run(study: Study) -> Quantity:
        return mean_of([study.pair_metric(e, "gptq", criterion, metric, 4.0) - study.pair_metric(e, "awq", criterion, metric, 4.0)
                        for e in study.methods(EDITORS)])
    run.__doc__ = f"{metric} of {criterion}: GPTQ 4-bit - AWQ 4-bit (mean over editors)"
    return run


def f4_gap(study: Study) -> Quantity:
    """order sensitivity of edit success - that of utility accuracy, mean over every editor x compressor setting."""
    out = []
    for e in study.methods(EDITORS):
        for c in _compressors(study, PRUNERS + QUANTIZERS):
            for s in study.strengths(c):
                out.append(study.pair_metric(e, c, "edit_success", "order_sensitivity", s)
                           - study.pair_metric(e, c, "utility_acc", "order_sensitivity", s))
    return mean_of(out)


def f5_damage(study: Study) -> Quantity:
    """best-order forget accuracy at the strongest strength - forget accuracy of the unlearner alone (mean)."""
    return mean_of([study.pair_metric(u, c, "forget_acc", "order_free_error", _strongest(study, c))
                    - study.value([u], "forget_acc")
                    for u in study.methods(UNLEARNERS) for c in _compressors(study, PRUNERS + QUANTIZERS)])


def f5_order(study: Study) -> Quantity:
    """forget accuracy(compress > unlearn) - (unlearn > compress), mean over unlearners x settings."""
    return mean_of([study.value([c, u], "forget_acc", s) - study.value([u, c], "forget_acc", s)
                    for u in study.methods(UNLEARNERS) for c in _compressors(study, PRUNERS + QUANTIZERS)
                    for s in study.strengths(c)])


def _os_gap(a: str, b: str, criterion: str, partners: Sequence[str], partners_swept: bool) -> Callable[[Study], Quantity]:
    def run(study: Study) -> Quantity:
        out = []
        for p in study.methods(partners):
            for s in (study.strengths(p) if partners_swept else [None]):
                out.append(study.pair_metric(a, p, criterion, "order_sensitivity", s)
                           - study.pair_metric(b, p, criterion, "order_sensitivity", s))
        return mean_of(out)
    return run


def f7_undo(study: Study) -> Quantity:
    """edit success(gd > editor) - (editor > gd), mean over editors: unlearning second undoes the edits."""
    return mean_of([study.value(["gd", e], "edit_success") - study.value([e, "gd"], "edit_success")
                    for e in study.methods(EDITORS)])


def f7_rmu_ofe(study: Study) -> Quantity:
    """edit success order-free error with GD - with RMU (mean over editors)."""
    return mean_of([study.pair_metric(e, "gd", "edit_success", "order_free_error")
                    - study.pair_metric(e, "rmu", "edit_success", "order_free_error") for e in study.methods(EDITORS)])


FINDINGS: list[Finding] = [
    Finding(1, "Compression hinders knowledge editing, more so the stronger it is",
            "Table 2 / Figure 2: edit success of FT after SparseGPT falls .96 -> .33 -> .03 at 25 / 55 / 75 % "
            "sparsity; edits are gone at 2 bits",
            "edit-x-compress",
            [("edit success alone - best order at the strongest strength (mean over editor x compressor)", f1_drop),
             ("best-order edit success: weakest - strongest strength (mean over editor x compressor)", f1_growth)]),
    Finding(2, "Editing after compressing beats the reverse order (pruning, strong settings)",
            "Figure 2 / appendix: SparseGPT 55 %: FT .95 (compress first) vs .33 (edit first); near-tied at 25 %; "
            "GPTQ 4-bit goes the other way in the paper's own numbers (.44 vs .79)",
            "edit-x-compress",
            [("edit success: compress > edit - edit > compress, pruners at their strongest (mean)", f2_strong_pruning)],
            [("same at the pruners' weakest strength (paper: near 0)", f2_weak_pruning),
             ("same for the quantizers at 4 bits (paper: GPTQ negative)", f2_quantization)]),
    Finding(3, "Composability depends on the method: AWQ composes better with editing than GPTQ",
            "Table 2 at 4 bits: edit-success OFE AWQ .01/.07/.00 vs GPTQ .21/.16/.42 (FT/MEMIT/LoRA); "
            "OS .04/.01/.08 vs .36/.03/.37",
            "edit-x-compress",
            [("edit-success OFE: GPTQ - AWQ at 4 bits (mean over editors)",
              _gptq_minus_awq("edit_success", "order_free_error"))],
            [("edit-success OS: GPTQ - AWQ at 4 bits", _gptq_minus_awq("edit_success", "order_sensitivity")),
             ("generalization OFE: GPTQ - AWQ at 4 bits", _gptq_minus_awq("edit_generalization", "order_free_error"))]),
    Finding(4, "A general-purpose metric (MMLU) does not show these composability failures",
            "Table 2: MMLU OS <= .02 in every editor x compressor pair while edit-success OS reaches .36-.37",
            "edit-x-compress",
            [("order sensitivity: edit success - utility accuracy (mean over every editor x compressor setting)", f4_gap)]),
    Finding(5, "Compression hinders unlearning, and unlearning first is the better order",
            "Table 3 / Figure 3: WMDP OFE at 25 % / 4 bits above the unlearners alone (e.g. GD + Wanda .35 vs .26); "
            "RMU > GPTQ-4 .27 vs GPTQ-4 > RMU .45",
            "unlearn-x-compress",
            [("best-order forget accuracy at the strongest strength - unlearner alone (mean; > 0: compression "
              "hinders)", f5_damage),
             ("forget accuracy: compress > unlearn - unlearn > compress (mean over unlearners x settings)", f5_order)]),
    Finding(6, "Unlearners that forget equally well differ in order robustness: RMU much less order-sensitive than GD",
            "Table 3: forget OFE GD .28 = RMU .28, but WMDP OS with pruning GD .17/.22 vs RMU .03/.02",
            "unlearn-x-compress",
            [("forget-accuracy OS: GD - RMU (mean over compressor settings)",
              _os_gap("gd", "rmu", "forget_acc", PRUNERS + QUANTIZERS, True))],
            [("utility OS: GD - RMU (mean over compressor settings)",
              _os_gap("gd", "rmu", "utility_acc", PRUNERS + QUANTIZERS, True))]),
    Finding(7, "Editing and unlearning compose, best with RMU; GD after an edit undoes it",
            "Table 4: edit-success OS with RMU .01/.01/.00 vs GD .67/.40/.56 (FT/MEMIT/LoRA); FT > GD .32 vs GD > FT .99",
            "edit-x-unlearn",
            [("edit-success OS: GD - RMU (mean over editors)", _os_gap("gd", "rmu", "edit_success", EDITORS, False)),
             ("edit success: GD > editor - editor > GD (mean over editors)", f7_undo)],
            [("edit-success OFE: GD - RMU (mean over editors)", f7_rmu_ofe)]),
]


def _run_test(study: Study | None, description: str, fn: Callable[[Study], Quantity]) -> TestResult:
    if study is None:
        return TestResult(description, None, error="study report missing")
    try:
        q = fn(study)
    except (LookupError, ValueError) as exc:
        return TestResult(description, None, error=str(exc))
    if q.draws is None or study.boot is None:
        return TestResult(description, q, error="the study's report has no per-item scores")
    lo, hi = study.boot.interval(q.draws)
    if math.isnan(lo) or not math.isfinite(q.point):
        return TestResult(description, q, error="no interval: a value or a resample of it is not a finite number")
    return TestResult(description, q, lo, hi)


def check_findings(
    results_dir: str | Path,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    findings: Sequence[Finding] = FINDINGS,
) -> list[FindingResult]:
    """Check every finding on the study reports under ``results_dir`` (``<results_dir>/<study>/``)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise InputError(f"findings: {results_dir} is not a folder (expected a folder of study report folders)")
    wanted = list(dict.fromkeys(f.study for f in findings))
    if not any((results_dir / name / "results.csv").is_file() for name in wanted):
        raise InputError(f"findings: no study report in {results_dir} (expected at least one of "
                         + ", ".join(f"{name}/results.csv" for name in wanted) + ")")
    studies: dict[str, Study | None] = {}
    out = []
    for f in findings:
        if f.study not in studies:
            folder = results_dir / f.study
            studies[f.study] = (Study(f.study, folder, resamples, seed, confidence)
                                if (folder / "results.csv").is_file() else None)
        study = studies[f.study]
        tests = [_run_test(study, d, fn) for d, fn in f.tests]
        context = [_run_test(study, d, fn) for d, fn in f.context]
        if any(t.error for t in tests):
            verdict, note = "not measured", "; ".join(dict.fromkeys(t.error for t in tests if t.error))
        elif any(t.side < 0 for t in tests):
            verdict, note = "not reproduced", ""
        elif all(t.side > 0 for t in tests):
            verdict, note = "reproduced", ""
        else:
            verdict, note = "inconclusive at this scale", ""
        out.append(FindingResult(f, verdict, tests, context, note))
    return out


def _cell(t: TestResult) -> str:
    if t.quantity is None:
        return f"n/a ({t.error})"
    if math.isnan(t.lo):
        return f"{t.quantity.point:+.3f} (no interval: {t.error})"  # shown, never judged
    return f"{t.quantity.point:+.3f} [{t.lo:+.3f}, {t.hi:+.3f}]"


def findings_markdown(results: Sequence[FindingResult], results_dir: str, confidence: float, resamples: int,
                      seed: int, command: str) -> str:
    """``docs/findings.md``: one row per finding, then each finding's tests and context."""
    lines = [
        "# The paper's findings, checked on the built-in model",
        "",
        f"Generated by `{command}` from the study reports in `{results_dir}/` (each made by "
        "`lmcompose run pipelines/experiments/<study>.yaml`; see the study's `report.md`). Do not edit by hand.",
        "",
        "Each finding of the paper's Section 4 is a direction (a sign, a ranking), so each is checked by tests: "
        "a statistic whose sign the paper predicts (positive = the paper's side), with its "
        f"{100 * confidence:g} % interval from {resamples} paired bootstrap resamples (seed {seed}) of the "
        "evaluated items -- every model of a study scored on the same resampled edits and questions. "
        "Verdict: **reproduced** when every test's interval lies above 0, **not reproduced** when one lies "
        "below 0, **inconclusive at this scale** when an interval contains 0, **not measured** when the study's "
        "report has no per-item scores (no interval, so no verdict). The paper's evidence is from Llama-3-8B "
        "(v1 of the paper; numbers reconstructed from its public analysis notebook); ours from SmolLM2-135M on the "
        "CPU with the studies' small data.",
        "",
        "| # | the paper's finding | the paper's evidence | our measurement (point [interval]) | study | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        measured = "<br>".join(_cell(t) for t in r.tests)
        lines.append(f"| {r.finding.number} | {r.finding.title} | {r.finding.paper} | {measured} | "
                     f"[{r.finding.study}]({Path(results_dir).name}/{r.finding.study}/report.md) | **{r.verdict}** |")
    lines += ["", "## Tests per finding", ""]
    for r in results:
        lines += [f"### {r.finding.number}. {r.finding.title}", "", f"Verdict: **{r.verdict}**"
                  + (f" ({r.note})" if r.note else "") + ".", ""]
        lines += ["| test | statistic (positive = the paper's side) | role |", "|---|---|---|"]
        lines += [f"| {t.description} | {_cell(t)} | verdict |" for t in r.tests]
        lines += [f"| {t.description} | {_cell(t)} | context |" for t in r.context]
        lines.append("")
    return "\n".join(lines)


def write_findings(results_dir: str | Path, out: str | Path, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = DEFAULT_SEED, confidence: float = DEFAULT_CONFIDENCE,
                   command: str = "lmcompose findings") -> list[FindingResult]:
    output_file(out)
    results = check_findings(results_dir, resamples, seed, confidence)
    Path(out).write_text(findings_markdown(results, str(results_dir), confidence, resamples, seed, command) + "\n",
                         encoding="utf-8")
    return results


__all__ = ["FINDINGS", "Finding", "FindingResult", "Quantity", "Study", "check_findings", "findings_markdown",
           "mean_of", "write_findings"]

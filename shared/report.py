"""The composability report: CSV tables, plots and a Markdown summary of a results table.

Pure library code (pandas + matplotlib with the Agg backend, no KFP, no
torch): the aggregator component calls :func:`build_report` on the collected
results, and the CLI prints :func:`console_table` for a quick look in a
terminal.  Every input the pipeline can legitimately produce -- only the base
model and single interventions, NaN criteria, a composition whose opposite
order failed -- yields a report with a note instead of an exception.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: components and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from shared.criteria import COMPOSABILITY_CRITERIA, CRITERIA  # noqa: E402
from shared.inputs import (  # noqa: E402
    InputError,
    check_names,
    check_numbers,
    file_name,
    output_path,
    read_csv,
)
from shared.uncertainty import (  # noqa: E402
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    HI,
    LO,
    Bootstrap,
    ItemRecord,
    WinsUncertainty,
    bootstrap_criteria,
    check_results_match_items,
    integrated_draws,
    integrated_with_intervals,
    pair_draws,
    pairs_with_intervals,
    results_with_intervals,
    wins_uncertainty,
    write_item_records,
)
from shared.metrics import (  # noqa: E402
    BASE_COLUMNS,
    REQUIRED_COLUMNS,
    WINS_COLUMN,
    canonical_params,
    category_groups,
    integrated_table,
    normalize_results,
    pair_table,
    params_dict,
    wins_table,
)

DEFAULT_TITLE = "lm-compose composability report"

#: columns of the "all evaluated models" table (compression measurements and perplexity)
MEASUREMENT_COLUMNS: tuple[str, ...] = ("perplexity", "sparsity", "avg_bits")
_MEASUREMENT_FORMATS = {"perplexity": lambda v: _fmt(v, 2), "avg_bits": lambda v: _fmt(v, 2)}


# --------------------------------------------------------------------------- loading


def validate_results(results: pd.DataFrame, source: str = "results table") -> None:
    """Raise :class:`~shared.inputs.InputError` (a ValueError) naming every missing column (docs/results-schema.md).

    Step columns are required up to the longest composition (``max(n_steps)``),
    since pairing reads them; a table with only the base model needs none.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if "n_steps" in results.columns and len(results):
        n_max = int(pd.to_numeric(results["n_steps"], errors="coerce").fillna(0).clip(0, MAX_STEPS).max())
        for k in range(1, n_max + 1):
            missing += [c for c in (f"step{k}_method", f"step{k}_params") if c not in results.columns]
    if missing:
        raise InputError(
            f"{source} is missing required column(s): {', '.join(missing)} (see docs/results-schema.md)"
        )


#: most steps a composition of a results table may have (a larger n_steps is refused as malformed)
MAX_STEPS = 64

#: allowed range of each criterion in a results table read from a file (every value finite, or empty)
CRITERION_RANGES: dict[str, tuple[float, float | None]] = {
    **{name: (0.0, 1.0) for name, c in CRITERIA.items() if c.bounded},
    "perplexity": (1.0, None),  # exp(mean NLL over tokens) >= 1
    "sparsity": (0.0, 1.0),
    "avg_bits": (0.0, 64.0),
}


def check_results_values(results: pd.DataFrame, source: str = "results table") -> None:
    """Refuse a results table whose cells are not what the schema allows, naming the first bad cell.

    Criteria (and their ``_lo``/``_hi`` interval columns) are numbers in their
    range -- accuracies and F1 in [0, 1], perplexity >= 1, sparsity in [0, 1],
    average bits in (0, 64] -- and finite, or empty (not evaluated);
    ``n_steps`` and ``num_batches`` whole numbers;
    ``sweep_value`` finite or empty; every ``step<k>_method`` a plain name
    (the report's plot files are named after the methods).
    """
    check_numbers(results, source, "n_steps", lo=0, hi=MAX_STEPS, integer=True, allow_nan=False)
    check_numbers(results, source, "num_batches", lo=1, integer=True, allow_nan=False)
    check_numbers(results, source, "sweep_value")
    for name, (lo, hi) in CRITERION_RANGES.items():
        for column in (name, name + LO, name + HI):
            check_numbers(results, source, column, lo=lo, hi=hi, lo_open=name == "avg_bits")
    for column in results.columns:
        if re.fullmatch(r"step\d+_method", str(column)):
            check_names(results, source, column)


def load_results(path: str | Path) -> pd.DataFrame:
    """Read a results table from CSV or Parquet (chosen by suffix), validate its columns and values.

    String columns are read as strings (a hex model key like ``1e5`` must not
    become a float) and empty cells become ``""`` as in the schema.  A file
    that is missing, empty, not a table, lacks a column or holds a value out
    of the schema (:func:`check_results_values`) raises
    :class:`~shared.inputs.InputError` naming the file, row and column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header = read_csv(path, "results table", nrows=0).columns
        df = read_csv(path, "results table", dtype=_string_dtypes(header))
    elif suffix in (".parquet", ".pq"):
        if not path.is_file():
            raise InputError(f"results table {path}: no such file")
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises its own types for a file that is not Parquet
            first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"results table {path}: not a Parquet table ({first})") from None
    else:
        raise InputError(f"{path}: unsupported results format {suffix!r}; use .csv or .parquet")
    check_results_values(df, str(path))
    validate_results(df, str(path))
    return normalize_results(df)


def _string_dtypes(header: Sequence[str]) -> dict[str, type]:
    str_cols = {"model_key", "composition", "methods", "sweep_method", "sweep_param"}
    return {
        c: str
        for c in header
        if c in str_cols or re.fullmatch(r"step\d+_(method|params)", str(c))
    }


# --------------------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(f):
        return "n/a"
    if abs(f) >= 1000:
        return f"{f:.1f}"
    return f"{f:.{digits}f}"


def _fmt_sweep(value: Any) -> str:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if math.isnan(f) else f"{f:g}"


def markdown_table(df: pd.DataFrame, formats: Mapping[str, Any] | None = None) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency); floats with 3 decimals."""
    formats = dict(formats or {})
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_escape(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = []
        for c, v in zip(cols, row.tolist()):
            fmt = formats.get(c, _fmt)
            cells.append(_md_escape(fmt(v) if not isinstance(v, str) else v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ci_cells(frame: pd.DataFrame, column: str, digits: int = 3) -> list[Any]:
    """``value [lo, hi]`` strings where ``frame`` has the column's interval, else the raw values."""
    if column + LO not in frame.columns:
        return frame[column].tolist()
    cells = []
    for v, lo, hi in zip(frame[column], frame[column + LO], frame[column + HI]):
        text = _fmt(v, digits)
        if not (isinstance(lo, float) and math.isnan(lo)) and text != "n/a":
            text += f" [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"
        cells.append(text)
    return cells


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "x"


def _order_label(a: str, b: str) -> str:
    return f"{a} > {b}"


# --------------------------------------------------------------------------- console


def console_table(
    results: pd.DataFrame,
    categories: Mapping[str, Any] | None = None,
    criteria: Sequence[str] = COMPOSABILITY_CRITERIA,
) -> str:
    """Compact plain-text composability table for a terminal.

    One line per (pair, setting, sweep value, criterion): both orders' raw
    values, order-free error and order sensitivity; notes on unpaired rows
    follow the table.
    """
    pairs = pair_table(results, categories, criteria)
    notes = pairs.attrs.get("notes", [])
    if pairs.empty:
        text = f"no opposite-order pairs among the {len(results)} evaluated model(s); nothing to compose"
    else:
        multi = pairs.groupby("pair")["setting_key"].nunique().max() > 1
        view = pd.DataFrame({
            "pair": pairs["pair"],
            **({"setting": pairs["setting"]} if multi else {}),
            "sweep": [f"{p}={_fmt_sweep(v)}" if p else "-" for p, v in zip(pairs["sweep_param"], pairs["sweep_value"])],
            "criterion": pairs["criterion"],
            "first>second": pairs["kappa_first_then_second"].map(_fmt),
            "second>first": pairs["kappa_second_then_first"].map(_fmt),
            "OFE": pairs["order_free_error"].map(_fmt),
            "OS": pairs["order_sensitivity"].map(_fmt),
        })
        text = view.to_string(index=False)
    if notes:
        text += "\n" + "\n".join(f"note: {n}" for n in notes)
    return text


# --------------------------------------------------------------------------- plots


def _single_step_values(
    results: pd.DataFrame, method: str, params: str, criterion: str, sweep_method: str, sweep_param: str
) -> pd.DataFrame:
    """Rows of ``method`` applied alone with the same params (swept one excepted): sweep_value, value."""
    single = results[(results["n_steps"] == 1) & (results.get("step1_method", "") == method)]
    if single.empty:
        return pd.DataFrame(columns=["sweep_value", "value"])
    want = params_dict(params)
    swept = sweep_param and method == sweep_method
    if swept:
        want.pop(sweep_param, None)
    keep = []
    for _, row in single.iterrows():
        have = params_dict(canonical_params(row["step1_params"]))
        if swept:
            have.pop(sweep_param, None)
        if have == want:
            keep.append((row["sweep_value"], row[criterion]))
    return pd.DataFrame(keep, columns=["sweep_value", "value"]).dropna(subset=["value"])


def plot_pair(
    pairs: pd.DataFrame,
    results: pd.DataFrame,
    pair: str,
    setting_key: str,
    criterion: str,
    path: Path,
) -> Path | None:
    """Plot a criterion against the sweep for both orders, shading the area between them.

    The shaded band is the order sensitivity made visible (the paper's Figures
    2-3); the base model and each intervention alone, where present, are drawn
    for reference.  Returns None (no file) when the criterion has no value.
    """
    sel = pairs[(pairs["pair"] == pair) & (pairs["setting_key"] == setting_key) & (pairs["criterion"] == criterion)]
    sel = sel.sort_values("sweep_value", kind="stable")
    if sel.empty or sel[["kappa_first_then_second", "kappa_second_then_first"]].isna().all().all():
        return None
    first, second = sel["first"].iloc[0], sel["second"].iloc[0]
    sweep_param = sel["sweep_param"].iloc[0]
    has_x = sel["sweep_value"].notna().all()
    xs = sel["sweep_value"].astype(float).tolist() if has_x else list(range(len(sel)))
    y1 = sel["kappa_first_then_second"].astype(float).tolist()
    y2 = sel["kappa_second_then_first"].astype(float).tolist()

    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=100)
    try:
        ax.plot(xs, y1, marker="o", color="tab:blue", label=_order_label(first, second))
        ax.plot(xs, y2, marker="s", color="tab:orange", label=_order_label(second, first))
        ax.fill_between(xs, y1, y2, alpha=0.25, color="tab:gray", label="order sensitivity")
        if criterion + LO in results.columns:  # each order's interval as a band in its colour
            by_comp = results.set_index("composition")
            for column, color in (("composition_first_then_second", "tab:blue"),
                                  ("composition_second_then_first", "tab:orange")):
                comps = sel[column].tolist()
                if all(c in by_comp.index for c in comps):
                    lo = by_comp.loc[comps, criterion + LO].astype(float).tolist()
                    hi = by_comp.loc[comps, criterion + HI].astype(float).tolist()
                    if not any(math.isnan(v) for v in lo + hi):
                        ax.fill_between(xs, lo, hi, alpha=0.12, color=color, linewidth=0,
                                        label="interval" if color == "tab:blue" else None)
        base = results[results["n_steps"] == 0]
        if not base.empty and not math.isnan(float(base[criterion].iloc[0])):
            ax.axhline(float(base[criterion].iloc[0]), color="black", linestyle=":", linewidth=1, label="base model")
        row = results[results["model_key"] == sel["model_key_first_then_second"].iloc[0]]
        if not row.empty:
            r = row.iloc[0]
            sweep_method = r["sweep_method"]
            for k, style in ((1, "--"), (2, "-.")):
                method = r[f"step{k}_method"]
                alone = _single_step_values(results, method, canonical_params(r[f"step{k}_params"]),
                                            criterion, sweep_method, sweep_param)
                if alone.empty:
                    continue
                if sweep_param and method == sweep_method and has_x and alone["sweep_value"].notna().all():
                    alone = alone.sort_values("sweep_value")
                    ax.plot(alone["sweep_value"], alone["value"], linestyle=style, color="tab:green",
                            linewidth=1, label=f"{method} alone")
                else:
                    ax.axhline(float(alone["value"].iloc[0]), linestyle=style, color="tab:red",
                               linewidth=1, label=f"{method} alone")
        crit = CRITERIA[criterion]
        ax.set_xlabel(sweep_param if (sweep_param and has_x) else "(no sweep)")
        ax.set_ylabel(f"{crit.label} ({'higher' if crit.higher_is_better else 'lower'} is better)", fontsize=8)
        setting = sel["setting"].iloc[0]
        ax.set_title(f"{pair}" + ("" if setting == "default" else f" [{setting}]"), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------- wins


def _summary_slice(pairs: pd.DataFrame, summary_at: Mapping[str, float] | None) -> pd.DataFrame:
    """One sweep value per (pair, setting) for per-setting wins, as in the paper's summary tables.

    ``summary_at`` maps a sweep parameter to the value to compare at (the paper
    uses sparsity 0.25 and 4 bits); without it only pairs evaluated at a
    single sweep value take part, since picking one silently would be arbitrary.
    """
    parts = []
    for (_p, _s), grp in pairs.groupby(["pair", "setting_key"], sort=False, dropna=False):
        param = grp["sweep_param"].iloc[0]
        if summary_at and param in summary_at:
            pick = grp[(grp["sweep_value"] - float(summary_at[param])).abs() < 1e-9]
        elif grp["sweep_value"].dropna().nunique() <= 1 and not grp["criterion"].duplicated().any():
            pick = grp
        else:
            continue
        if not pick.empty:
            parts.append(pick)
    return pd.concat(parts) if parts else pairs.iloc[0:0]


def _sweep_label(table: pd.DataFrame) -> str:
    """``sparsity=0.25, bits=4``: the sweep values a per-setting wins table compares at."""
    used = {
        f"{p}={_fmt_sweep(v)}"
        for p, v in zip(table["sweep_param"], table["sweep_value"])
        if p and not (isinstance(v, float) and math.isnan(v))
    }
    return ", ".join(sorted(used))


def _wins_tables(
    pairs: pd.DataFrame,
    integrated: pd.DataFrame,
    categories: Mapping[str, Any] | None,
    summary_at: Mapping[str, float] | None,
    notes: list[str],
    draws: tuple[dict[Any, Any], dict[Any, Any]] | None = None,
    boot: Bootstrap | None = None,
) -> list[tuple[str, str, pd.DataFrame, WinsUncertainty | None]]:
    """(group, basis, table, uncertainty) for every category with at least two methods in the pairs.

    ``draws`` = (pair-table draws, integrated-table draws) of the bootstrap;
    without them the uncertainty is None.
    """
    if pairs.empty:
        return []
    if not categories:
        notes.append("wins not counted: pass a method -> category mapping to form the groups")
        return []
    methods = set(pairs["first"]) | set(pairs["second"])
    out: list[tuple[str, str, pd.DataFrame, WinsUncertainty | None]] = []
    per_setting = _summary_slice(pairs, summary_at)
    for cat, group in category_groups(methods, categories).items():
        if len(group) < 2:
            continue
        bases: list[tuple[str, pd.DataFrame, dict[Any, Any] | None]] = []
        if integrated["integrated_order_free_error"].notna().any() or integrated["integrated_order_sensitivity"].notna().any():
            bases.append(("integrated", integrated, draws[1] if draws else None))
        involved = per_setting[per_setting["first"].isin(group) ^ per_setting["second"].isin(group)]
        if not involved.empty:
            at = _sweep_label(involved)
            bases.append((f"per setting ({at})" if at else "per setting", involved, draws[0] if draws else None))
        for basis, table, table_draws in bases:
            try:
                wins = wins_table(table, group)
            except ValueError as exc:
                notes.append(f"wins for {cat} ({basis}) not counted: {exc}")
                continue
            values = wins.drop(columns=[WINS_COLUMN])
            values = values.loc[:, values.notna().any()]
            if (values.notna().sum() >= 2).any():  # at least one column where two methods compete
                unc = wins_uncertainty(table, table_draws, group, boot) if (table_draws is not None and boot) else None
                if unc is not None:
                    unc.share = unc.share.reindex(columns=values.columns)
                out.append((cat, basis, pd.concat([wins[[WINS_COLUMN]], values], axis=1), unc))
    if summary_at is None and (pairs.groupby(["pair", "setting_key"])["sweep_value"].nunique() > 1).any():
        notes.append("per-setting wins are counted only for pairs evaluated at a single sweep value; "
                     "pass summary_at={sweep_param: value} to compare swept pairs at one value")
    return out


# --------------------------------------------------------------------------- report


def build_report(
    results: pd.DataFrame,
    out_dir: str | Path,
    title: str = DEFAULT_TITLE,
    categories: Mapping[str, Any] | None = None,
    floor: tuple[str, float] | None = None,
    summary_at: Mapping[str, float] | None = None,
    items: Sequence[ItemRecord] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Path]:
    """Write the full report of a results table into ``out_dir`` and return the written paths.

    Files: ``results.csv`` (the input), ``composability.csv`` (per setting),
    ``composability_integrated.csv`` (unrestricted, plus floor-restricted rows
    when ``floor`` is given), ``wins.csv``, ``plots/*.png`` and ``report.md``,
    which embeds the plots by relative path so the folder can be moved or
    served as a KFP Markdown artifact.  Keys of the returned dict: ``results``,
    ``composability``, ``composability_integrated``, ``wins``, ``report``,
    ``plots_dir`` and ``plots/<file>`` for each plot.

    ``items`` (the per-item scores of the evaluations, see
    :mod:`shared.uncertainty`) adds bootstrap intervals at level
    ``confidence`` from ``resamples`` paired resamples drawn with ``seed``:
    ``<column>_lo`` / ``<column>_hi`` columns in every CSV, ``value [lo, hi]``
    in the Markdown, bands in the plots, the share of resamples each method
    wins in ``wins_share.csv``; and ``items.json`` to rebuild them.
    """
    validate_results(results)
    results = normalize_results(results)
    # intervals of an earlier report are recomputed, never carried over
    results = results.drop(columns=[c + sfx for c in CRITERIA for sfx in (LO, HI) if c + sfx in results.columns])
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {"plots_dir": plots_dir}

    pairs = pair_table(results, categories)
    notes: list[str] = list(pairs.attrs.get("notes", []))
    if "num_batches" in results.columns and len(results) and int(results["num_batches"].max()) > 1:
        notes.append(
            f"Every criterion is the mean over {int(results['num_batches'].max())} disjoint edit batches "
            "(results_by_batch.csv holds the single batches); the metrics are computed on the means."
        )
    integrated = integrated_table(pairs)
    if floor:
        restricted = integrated_table(pairs, floor=floor, results=results)
        integrated_all = pd.concat([integrated, restricted], ignore_index=True)
        wins_basis = restricted
    else:
        integrated_all = integrated
        wins_basis = integrated

    if items:  # a criterion its own items do not reproduce was changed after the evaluation: refuse it
        check_results_match_items(results, items)
    boot = bootstrap_criteria(items, resamples, seed, confidence) if items else None
    draws = None
    if boot is not None:
        notes += boot.notes
        notes.append(
            f"Intervals: {100 * confidence:g} % percentile intervals from {resamples} paired bootstrap resamples "
            f"(seed {seed}) of the evaluated items (edit records, questions, documents"
            + ("; edit batches first" if len({r.edit_batch for r in items}) > 1 else "")
            + "); both orders of a pair are resampled together."
        )
        results = results_with_intervals(results, boot)
        # draws keyed by the row labels of the pair and (combined) integrated tables, which keep them
        draws = (pair_draws(pairs, boot), integrated_draws(integrated_all, pairs, boot, floor, results))
        pairs = pairs_with_intervals(pairs, boot)
        integrated_all = integrated_with_intervals(integrated_all, pairs, boot, floor, results)
        wins_basis = integrated_all.iloc[len(integrated):] if floor else integrated_all
    elif items is not None:
        notes.append("no per-item scores in the results (evaluated before they were kept): no intervals")

    wins = _wins_tables(pairs, wins_basis, categories, summary_at, notes, draws, boot)

    written["results"] = out_dir / "results.csv"
    results.to_csv(written["results"], index=False)
    written["composability"] = out_dir / "composability.csv"
    pairs.to_csv(written["composability"], index=False)
    written["composability_integrated"] = out_dir / "composability_integrated.csv"
    integrated_all.to_csv(written["composability_integrated"], index=False)
    written["wins"] = out_dir / "wins.csv"
    if wins:
        frames = []
        for g, b, w, unc in wins:
            frame = w.reset_index().assign(group=g, basis=b)
            if unc is not None:
                frame.insert(2, WINS_COLUMN + LO, unc.wins_lo.reindex(w.index).to_numpy())
                frame.insert(3, WINS_COLUMN + HI, unc.wins_hi.reindex(w.index).to_numpy())
            frames.append(frame)
        wins_csv = pd.concat(frames, ignore_index=True)
        lead = ["group", "basis", "method", WINS_COLUMN] + [c for c in (WINS_COLUMN + LO, WINS_COLUMN + HI)
                                                           if c in wins_csv.columns]
        wins_csv = wins_csv[lead + [c for c in wins_csv.columns if c not in lead]]
    else:
        wins_csv = pd.DataFrame(columns=["group", "basis", "method", WINS_COLUMN])
    wins_csv.to_csv(written["wins"], index=False)
    if boot is not None:
        shares = [
            unc.share.stack().rename("share").reset_index().rename(columns={"level_1": "column"}).assign(group=g, basis=b)
            for g, b, _w, unc in wins if unc is not None
        ]
        share_csv = (pd.concat(shares, ignore_index=True)[["group", "basis", "method", "column", "share"]]
                     if shares else pd.DataFrame(columns=["group", "basis", "method", "column", "share"]))
        written["wins_share"] = out_dir / "wins_share.csv"
        share_csv.to_csv(written["wins_share"], index=False)
        written["items"] = write_item_records(items or [], out_dir / "items.json")

    plots: dict[tuple[str, str, str], Path] = {}
    if not pairs.empty:
        for pair, grp in pairs.groupby("pair", sort=False):
            setting_keys = list(dict.fromkeys(grp["setting_key"]))
            for i, skey in enumerate(setting_keys):
                setting = [f"s{i + 1}"] if len(setting_keys) > 1 else []
                for crit in dict.fromkeys(grp[grp["setting_key"] == skey]["criterion"]):
                    name = file_name(_slug(pair), *setting, crit, suffix=".png", what=f"plot of pair {pair!r}")
                    path = plot_pair(pairs, results, pair, skey, crit, output_path(plots_dir, name))
                    if path is not None:
                        plots[(pair, skey, crit)] = path
                        written[f"plots/{name}"] = path

    order_lines = _order_section(results, categories, boot, out_dir, plots_dir, written, notes)
    md = _markdown(title, results, pairs, integrated_all, wins, plots, notes, floor, out_dir, order_lines)
    written["report"] = out_dir / "report.md"
    written["report"].write_text(md, encoding="utf-8")
    written["report_html"] = out_dir / "report.html"
    written["report_html"].write_text(html_report(md, out_dir, title), encoding="utf-8")
    return written


def plot_orders(orders: pd.DataFrame, combo: str, setting_key: str, criterion: str, results: pd.DataFrame,
                path: Path) -> Path | None:
    """A k-step combo's criterion against the sweep for each of its k! orders; the band spans best to worst."""
    sel = orders[(orders["combo"] == combo) & (orders["setting_key"] == setting_key)
                 & (orders["criterion"] == criterion)].sort_values("sweep_value", kind="stable")
    if sel.empty or sel["kappa_best"].isna().all():
        return None
    has_x = sel["sweep_value"].notna().all()
    xs = sel["sweep_value"].astype(float).tolist() if has_x else list(range(len(sel)))
    by_comp = results.set_index("composition")[criterion]
    members = sel["members"].iloc[0].split("+")

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=100)
    try:
        for i, order in enumerate(itertools.permutations(members)):
            ys = [float(by_comp.get(json.loads(c)[i], math.nan)) for c in sel["compositions"]]
            ax.plot(xs, ys, marker="os^vD<>p"[i % 8], linewidth=1, label=" > ".join(order))
        ax.fill_between(xs, sel["kappa_worst"].astype(float), sel["kappa_best"].astype(float), alpha=0.15,
                        color="tab:gray", label="best to worst order")
        crit = CRITERIA[criterion]
        ax.set_xlabel(sel["sweep_param"].iloc[0] if (sel["sweep_param"].iloc[0] and has_x) else "(no sweep)")
        ax.set_ylabel(f"{crit.label} ({'higher' if crit.higher_is_better else 'lower'} is better)", fontsize=8)
        setting = sel["setting"].iloc[0]
        ax.set_title(combo + ("" if setting == "default" else f" [{setting}]"), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _order_section(
    results: pd.DataFrame,
    categories: Mapping[str, Any] | None,
    boot: Bootstrap | None,
    out_dir: Path,
    plots_dir: Path,
    written: dict[str, Path],
    notes: list[str],
) -> list[str]:
    """Composability of every combo of k >= 3 steps over all its orders: CSVs, plots, Markdown lines."""
    from shared.orders import integrated_order_table, order_table
    from shared.uncertainty import (integrated_order_draws, integrated_orders_with_intervals, order_draws,
                                    orders_with_intervals)

    sizes = sorted({int(n) for n in results["n_steps"] if int(n) >= 3})
    if not sizes:
        return []
    orders = order_table(results, categories, sizes=sizes)
    notes += orders.attrs.get("notes", [])
    lines = [f"## Composability over all orders (k = {', '.join(map(str, sizes))})", "",
             "For k interventions in all k! orders: OFE = 1 - max over orders, OS = max - min over orders "
             "(criterion mapped to higher-is-better; for k = 2 these are the pair metrics above).", ""]
    if orders.empty:
        return lines + ["_No set of k >= 3 interventions was evaluated in all its orders._", ""]
    integrated = integrated_order_table(orders)
    draws = None
    if boot is not None:
        draws = (order_draws(orders, boot), integrated_order_draws(integrated, orders, boot))
        orders = orders_with_intervals(orders, boot)
        integrated = integrated_orders_with_intervals(integrated, orders, boot)
    written["composability_orders"] = out_dir / "composability_orders.csv"
    orders.to_csv(written["composability_orders"], index=False)
    written["composability_orders_integrated"] = out_dir / "composability_orders_integrated.csv"
    integrated.to_csv(written["composability_orders_integrated"], index=False)
    for (combo, skey), grp in orders.groupby(["combo", "setting_key"], sort=False):
        setting = grp["setting"].iloc[0]
        lines += [f"### {combo}" + ("" if setting == "default" else f" ({setting})"), ""]
        param = grp["sweep_param"].iloc[0] or "sweep"
        view = pd.DataFrame({
            param: grp["sweep_value"].map(_fmt_sweep),
            "criterion": grp["criterion"],
            "best order": [f"{o} ({_fmt(v)})" for o, v in zip(grp["best_order"], grp["kappa_best"])],
            "worst order": [f"{o} ({_fmt(v)})" for o, v in zip(grp["worst_order"], grp["kappa_worst"])],
            "OFE": _ci_cells(grp, "order_free_error"),
            "OS": _ci_cells(grp, "order_sensitivity"),
        })
        lines += [markdown_table(view), ""]
        setting = f"s{list(dict.fromkeys(orders[orders['combo'] == combo]['setting_key'])).index(skey) + 1}"
        for crit in dict.fromkeys(grp["criterion"]):
            name = file_name(_slug(combo), setting, crit, "orders", suffix=".png", what=f"plot of combo {combo!r}")
            path = plot_orders(orders, combo, skey, crit, results, output_path(plots_dir, name))
            if path is not None:
                written[f"plots/{name}"] = path
                lines += [f"![{combo} {crit}]({path.relative_to(out_dir).as_posix()})", ""]
    if integrated["integrated_order_free_error"].notna().any():
        lines += ["### Integrated over the sweep", "", markdown_table(pd.DataFrame({
            "combo": integrated["combo"], "setting": integrated["setting"], "criterion": integrated["criterion"],
            "OFE (integrated)": _ci_cells(integrated, "integrated_order_free_error"),
            "OS (integrated)": _ci_cells(integrated, "integrated_order_sensitivity"),
        })), ""]
    # wins: methods of one category against the same other members
    if categories:
        basis, table, table_draws = (("integrated", integrated, draws[1] if draws else None)
                                     if integrated["integrated_order_free_error"].notna().any()
                                     else ("per setting", orders, draws[0] if draws else None))
        methods = {m for members in orders["members"] for m in members.split("+")}
        for cat, group in category_groups(methods, categories).items():
            if len(group) < 2:
                continue
            try:
                wins = wins_table(table, group)
            except ValueError as exc:
                notes.append(f"k-step wins for {cat} not counted: {exc}")
                continue
            values = wins.drop(columns=[WINS_COLUMN])
            if not (values.notna().sum() >= 2).any():
                continue
            view = wins.reset_index()
            unc = wins_uncertainty(table, table_draws, group, boot) if (table_draws is not None and boot) else None
            if unc is not None:
                view[WINS_COLUMN] = [f"{int(n)} [{lo:g}, {hi:g}]" for n, lo, hi in
                                     zip(wins[WINS_COLUMN], unc.wins_lo.reindex(wins.index),
                                         unc.wins_hi.reindex(wins.index))]
            lines += [f"### # Wins among {cat} ({basis}, k >= 3)", "", markdown_table(view, {WINS_COLUMN: str}), ""]
    return lines


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #f3f3f3; }
img { max-width: 42em; display: block; margin: 0.5em 0 1.5em; }
"""


def html_report(markdown_text: str, base_dir: Path, title: str) -> str:
    """The report as one self-contained HTML page: the Markdown rendered, every plot inlined.

    The Kubeflow UI renders an HTML artifact in its visualization pane but
    cannot follow a Markdown file's relative ``plots/...`` links, so the
    plots are embedded as data URIs.  Rendering uses ``markdown-it-py``
    (CommonMark with tables).
    """
    import base64
    import html
    from urllib.parse import unquote

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)

    def inline(match: re.Match) -> str:
        src = unquote(html.unescape(match.group(1)))
        path = (base_dir / src).resolve()
        if not path.is_file() or base_dir.resolve() not in path.parents:
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{_HTML_STYLE}</style></head>\n<body>\n{body}</body></html>\n"
    )


def _markdown(
    title: str,
    results: pd.DataFrame,
    pairs: pd.DataFrame,
    integrated: pd.DataFrame,
    wins: list[tuple[str, str, pd.DataFrame, WinsUncertainty | None]],
    plots: dict[tuple[str, str, str], Path],
    notes: list[str],
    floor: tuple[str, float] | None,
    out_dir: Path,
    order_lines: list[str] | None = None,
) -> str:
    n_base = int((results["n_steps"] == 0).sum())
    n_single = int((results["n_steps"] == 1).sum())
    n_comp = int((results["n_steps"] >= 2).sum())
    n_pairs = pairs["pair"].nunique() if not pairs.empty else 0
    lines = [
        f"# {title}",
        "",
        f"{len(results)} evaluated model(s): {n_base} base, {n_single} single intervention(s), "
        f"{n_comp} composition(s); {n_pairs} opposite-order pair(s).",
        "",
        "Order-free error (OFE) = 1 - max over the two orders of the criterion mapped to higher-is-better; "
        "order sensitivity (OS) = |difference between the orders|. Lower is better for both. "
        "Integrated values are areas over the sweep axis normalized to [0, 1].",
        "",
    ]
    if "order_difference" in pairs.columns:
        lines += [
            "Intervals are written `value [lo, hi]`. `first - second` is the signed difference between the orders "
            "(raw criterion): the order matters where its interval excludes 0 (OS, an absolute value, has an "
            "interval above 0 even when it does not).",
            "",
        ]
    if notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]

    # single interventions
    lines += ["## Base model and single interventions", ""]
    single = results[results["n_steps"] <= 1].sort_values(["n_steps", "methods", "sweep_value"], kind="stable")
    if single.empty:
        lines += ["_No base-model or single-intervention rows._", ""]
    else:
        view = single[["composition", *CRITERIA]].copy()
        view["composition"] = [c if c else "(base model)" for c in view["composition"]]
        for c in CRITERIA:
            if c + LO in single.columns:
                view[c] = _ci_cells(single, c, 2 if c == "perplexity" else 3)
        lines += [markdown_table(view, _MEASUREMENT_FORMATS), ""]

    # per setting
    lines += ["## Composability per setting", ""]
    if pairs.empty:
        lines += ["_No opposite-order pairs in the results: composability metrics need both orders "
                  "of a two-step composition._", ""]
    else:
        for (pair, skey), grp in pairs.groupby(["pair", "setting_key"], sort=False):
            first, second = grp["first"].iloc[0], grp["second"].iloc[0]
            setting = grp["setting"].iloc[0]
            lines += [f"### {pair}" + ("" if setting == "default" else f" ({setting})"), ""]
            param = grp["sweep_param"].iloc[0] or "sweep"
            view = pd.DataFrame({
                param: grp["sweep_value"].map(_fmt_sweep),
                "criterion": grp["criterion"],
                _order_label(first, second): grp["kappa_first_then_second"],
                _order_label(second, first): grp["kappa_second_then_first"],
                "OFE": _ci_cells(grp, "order_free_error"),
                "OS": _ci_cells(grp, "order_sensitivity"),
            })
            if "order_difference" in grp.columns:  # signed: does the order matter? (interval excludes 0)
                view["first - second"] = _ci_cells(grp, "order_difference")
            lines += [markdown_table(view), ""]

    # integrated
    lines += ["## Integrated composability (sweep)", ""]
    if integrated.empty:
        lines += ["_No pairs to integrate._", ""]
    else:
        if integrated["integrated_order_free_error"].isna().all():
            lines += ["_Every sweep has fewer than two points: integrated values are not defined (n/a)._", ""]
        view = pd.DataFrame({
            "pair": integrated["pair"],
            "setting": integrated["setting"],
            "criterion": integrated["criterion"],
            "floor": [f or "-" for f in integrated["floor"]],
            "OFE (integrated)": _ci_cells(integrated, "integrated_order_free_error"),
            "OS (integrated)": _ci_cells(integrated, "integrated_order_sensitivity"),
            "points": [f"{a}/{b}" for a, b in zip(integrated["n_points"], integrated["n_points_total"])],
        })
        lines += [markdown_table(view), ""]
        if floor:
            lines += [f"Rows with floor `{floor[0]}>={floor[1]:g}` keep only sweep settings where that criterion "
                      "stays at or above the floor in both orders, on the original normalized axis.", ""]

    # wins
    lines += ["## # Wins", ""]
    if not wins:
        lines += ["_No wins table: it needs at least two methods of one category paired with the same opponents"
                  " (and a category mapping)._", ""]
    else:
        lines += ["Per column the strictly lowest value wins; ties and n/a award no win."
                  + (" With intervals: `# Wins` is the point count [interval over resamples], each value is "
                     "followed by the share of resamples in which that method wins the column."
                     if any(unc is not None for *_x, unc in wins) else ""), ""]
        for group, basis, table, unc in wins:
            view = table.reset_index()
            if unc is not None:
                view[WINS_COLUMN] = [f"{int(n)} [{lo:g}, {hi:g}]" for n, lo, hi in
                                     zip(table[WINS_COLUMN], unc.wins_lo.reindex(table.index),
                                         unc.wins_hi.reindex(table.index))]
                for col in table.columns:
                    if col == WINS_COLUMN or col not in unc.share.columns:
                        continue
                    view[col] = [_fmt(v) if _fmt(v) == "n/a" else f"{_fmt(v)} ({100 * p:.0f} %)"
                                 for v, p in zip(table[col], unc.share[col].reindex(table.index))]
            lines += [f"### {group} ({basis})", "", markdown_table(view, {WINS_COLUMN: str}), ""]

    lines += order_lines or []

    # plots
    lines += ["## Plots", ""]
    if not plots:
        lines += ["_No plots (no pairs with values)._", ""]
    else:
        for (pair, _skey, crit), path in plots.items():
            rel = path.relative_to(out_dir).as_posix()
            lines += [f"![{pair} {crit}]({rel})", ""]

    # measurements of every row
    lines += ["## All evaluated models", ""]
    view = results[["composition", "n_steps", *MEASUREMENT_COLUMNS]].copy()
    view["composition"] = [c if c else "(base model)" for c in view["composition"]]
    view["n_steps"] = view["n_steps"].astype(int).astype(str)
    lines += [markdown_table(view, _MEASUREMENT_FORMATS), ""]
    return "\n".join(lines)


__all__ = [
    "BASE_COLUMNS",
    "DEFAULT_TITLE",
    "MEASUREMENT_COLUMNS",
    "build_report",
    "console_table",
    "load_results",
    "markdown_table",
    "plot_pair",
    "validate_results",
]

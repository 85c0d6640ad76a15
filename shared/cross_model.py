"""Composability across base models: one study run per model, compared in one report.

The paper measured one model (Llama-3-8B) and names other families as future
work.  A spec with ``models:`` runs the same study on each model
(:meth:`shared.spec.ExperimentSpec.per_model`); each run writes its own
report folder, and this module puts them side by side:

* a table per criterion -- one row per composition (a pair, or a k-step
  combination over all its orders) and setting, one column per model, the
  order-free error in the cells (order sensitivity in a second table);
* a plot per criterion of each composition's order-free error against model
  size (parameter count, log scale), one line per composition.

It reads only the report folders (``composability.csv``,
``composability_orders.csv`` when the study had k >= 3 compositions, and
``model.json``, which the aggregator writes: the base model's source and
parameter count), so reports fetched from a cluster's store compare the same
way as local runs.  Every value it reads is checked first (a metric outside
[0, 1], a criterion that cannot name a plot file, a malformed ``model.json``
is one :class:`~shared.inputs.InputError` naming the file, row and column).
Model sizes missing from ``model.json`` (reports built before it existed)
leave that model out of the plots, with a note.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from shared.inputs import (
    InputError,
    check_names,
    check_numbers,
    file_name,
    output_folder,
    output_path,
    read_csv,
    read_json,
    require_columns,
    safe_name,
    show,
    writing,
)

#: file the aggregator writes into every report folder: the base model's source and size
MODEL_INFO_FILE = "model.json"


@dataclass(frozen=True)
class ModelReport:
    """One model's study report, as read from its folder."""

    label: str
    folder: Path
    source: str | None
    num_parameters: int | None
    pairs: pd.DataFrame  # composability.csv
    orders: pd.DataFrame  # composability_orders.csv (empty when the study had no k >= 3 combos)


#: columns of composability.csv / composability_orders.csv the comparison reads
PAIR_COLUMNS = ("pair", "setting", "sweep_param", "sweep_value", "criterion", "order_free_error", "order_sensitivity")
ORDER_COLUMNS = ("combo", "k", "setting", "sweep_param", "sweep_value", "criterion", "order_free_error",
                 "order_sensitivity")


def read_model_info(path: Path) -> dict[str, Any]:
    """``model.json``: an object; ``source`` a string and ``num_parameters`` a positive whole number, or absent."""
    info = read_json(path, "model file")
    if not isinstance(info, dict):
        raise InputError(f"{path}: expected a JSON object with source and num_parameters, got {type(info).__name__}")
    source, n = info.get("source"), info.get("num_parameters")
    if source is not None and not isinstance(source, str):
        raise InputError(f"{path}: source: expected a string, got {show(source)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"{path}: num_parameters: expected a positive whole number, got {show(n)}")
    return info


def _read_metrics_table(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    """A composability table with the columns the comparison reads, their values checked (one line per bad cell)."""
    frame = read_csv(path, what, keep_default_na=True)
    require_columns(frame, path, columns, "written by the aggregator; see docs/results-schema.md")
    for metric in ("order_free_error", "order_sensitivity"):
        check_numbers(frame, path, metric, lo=0.0, hi=1.0)  # empty (no value) allowed; "abc", -3, inf are not
    check_numbers(frame, path, "sweep_value")
    if "k" in columns:
        check_numbers(frame, path, "k", lo=2, integer=True, allow_nan=False)
        frame["k"] = frame["k"].astype(float).astype(int)
    check_names(frame, path, "criterion", allow_empty=False)  # each criterion names a plot file
    for metric in ("order_free_error", "order_sensitivity", "sweep_value"):
        frame[metric] = pd.to_numeric(frame[metric], errors="coerce").astype(float)
    return frame


def read_model_report(label: str, folder: str | Path) -> ModelReport:
    """The parts of a report folder the comparison needs, every value checked.

    A folder that is not a report, a ``model.json`` that is not what the
    aggregator writes, a table that is empty, binary, lacks a column or holds
    a metric outside [0, 1] or a criterion that cannot name a file raises
    :class:`~shared.inputs.InputError` (one line: the file, row and column).
    The label must be a plain name too (it names the model's folder in a
    multi-model run).
    """
    safe_name(label, "model label")
    folder = Path(folder)
    pairs_path = folder / "composability.csv"
    if not pairs_path.is_file():
        raise InputError(f"{folder} is not a study report folder (no composability.csv in it)")
    info_path = folder / MODEL_INFO_FILE
    info = read_model_info(info_path) if info_path.exists() else {}
    orders_path = folder / "composability_orders.csv"
    return ModelReport(
        label=label,
        folder=folder,
        source=info.get("source"),
        num_parameters=info.get("num_parameters"),
        pairs=_read_metrics_table(pairs_path, PAIR_COLUMNS, "composability table"),
        orders=(_read_metrics_table(orders_path, ORDER_COLUMNS, "composability table") if orders_path.exists()
                else pd.DataFrame()),
    )


def _sweep_label(param: object, value: object) -> str:
    if param is None or (isinstance(param, float) and pd.isna(param)) or param == "":
        return ""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return str(param)
    return f"{param}={value:g}" if isinstance(value, (int, float)) else f"{param}={value}"


def _rows(report: ModelReport) -> pd.DataFrame:
    """Every composition's metrics of one report in one shape: composition, k, setting, sweep, criterion, metrics."""
    parts = []
    for frame, name_col, k in ((report.pairs, "pair", 2), (report.orders, "combo", None)):
        if frame.empty:
            continue
        parts.append(pd.DataFrame({
            "composition": frame[name_col],
            "k": k if k is not None else frame["k"],
            "setting": frame["setting"].astype(str),
            "sweep": [_sweep_label(p, v) for p, v in zip(frame["sweep_param"], frame["sweep_value"])],
            "criterion": frame["criterion"],
            "order_free_error": frame["order_free_error"],
            "order_sensitivity": frame["order_sensitivity"],
        }))
    if not parts:
        return pd.DataFrame(columns=["composition", "k", "setting", "sweep", "criterion",
                                     "order_free_error", "order_sensitivity"])
    return pd.concat(parts, ignore_index=True)


def cross_model_table(reports: list[ModelReport], metric: str = "order_free_error") -> pd.DataFrame:
    """Long-to-wide: one row per (criterion, composition, setting, sweep), one column per model label."""
    if metric not in ("order_free_error", "order_sensitivity"):
        raise ValueError(f"metric must be order_free_error or order_sensitivity, got {metric!r}")
    labels = [r.label for r in reports]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    long = []
    for r in reports:
        rows = _rows(r)
        rows["model"] = r.label
        long.append(rows)
    data = pd.concat(long, ignore_index=True)
    keys = ["criterion", "k", "composition", "setting", "sweep"]
    # one row per composition any model has (a pivot with dropna=False would form the cartesian product of the keys)
    wide = data.groupby(keys + ["model"], sort=False, dropna=False)[metric].first().unstack("model")
    wide = wide.reindex(columns=labels).reset_index()
    wide.columns.name = None
    return wide.sort_values(keys, kind="stable").reset_index(drop=True)


def plot_against_size(table: pd.DataFrame, reports: list[ModelReport], criterion: str, path: Path) -> bool:
    """Each composition's order-free error against model size (log x); False when fewer than two sizes are known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = [r for r in reports if r.num_parameters]
    if len(sized) < 2:
        return False
    sized.sort(key=lambda r: r.num_parameters)
    sel = table[table["criterion"] == criterion]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for _, row in sel.iterrows():
        xs = [r.num_parameters for r in sized if pd.notna(row[r.label])]
        ys = [row[r.label] for r in sized if pd.notna(row[r.label])]
        if len(xs) < 2:
            continue
        name = row["composition"] + ("" if row["setting"] == "default" else f" [{row['setting']}]") + (
            f" {row['sweep']}" if row["sweep"] else "")
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"order-free error ({criterion})")
    for r in sized:
        ax.annotate(r.label, (r.num_parameters, 0), xycoords=("data", "axes fraction"), textcoords="offset points",
                    xytext=(0, 3), ha="center", fontsize=7, color="0.4")
    ax.set_title(f"{criterion}: order-free error by model size")
    if ax.lines:
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(v: object) -> str:
    return "–" if v is None or (isinstance(v, float) and pd.isna(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))


def build_cross_model_report(reports: list[ModelReport], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Write ``cross_model.csv`` (both metrics, long), the per-criterion plots and ``report.md`` into ``out_dir``."""
    if len(reports) < 2:
        raise ValueError(f"a cross-model report needs at least two models, got {len(reports)}")
    out = output_folder(out_dir)
    for criterion in dict.fromkeys(pd.concat([r.pairs.get("criterion", pd.Series(dtype=object)) for r in reports]
                                             + [r.orders.get("criterion", pd.Series(dtype=object)) for r in reports])):
        file_name(criterion, "ofe_vs_size", suffix=".png", what=f"plot of criterion {criterion!r}")  # before writing
    with writing("compare"):
        (out / "plots").mkdir(parents=True, exist_ok=True)
    ofe, os_ = cross_model_table(reports, "order_free_error"), cross_model_table(reports, "order_sensitivity")
    labels = [r.label for r in reports]
    csv = out / "cross_model.csv"
    pd.concat([ofe.assign(metric="order_free_error"), os_.assign(metric="order_sensitivity")],
              ignore_index=True).to_csv(csv, index=False)
    written: dict[str, Path] = {"cross_model": csv}
    lines = [f"# {title or 'Composability across models'}", "",
             "One study per base model; the same compositions, settings and data. Per criterion two tables: the "
             "order-free error (OFE = 1 - the best order's value, on the higher-is-better scale) and the order "
             "sensitivity (OS = best minus worst order), as in each model's own report; lower is better for both. "
             "k = 2 rows are pairs, k >= 3 rows combos over all their orders.",
             "", "| model | source | parameters | report |", "|---|---|---|---|"]
    for r in reports:
        where = Path(os.path.relpath(r.folder.resolve(), out.resolve())).as_posix()
        lines.append(f"| {r.label} | {r.source or '–'} | {f'{r.num_parameters:,}' if r.num_parameters else 'unknown'} "
                     f"| [{where}]({where}/report.md) |")
    lines.append("")
    unsized = [r.label for r in reports if not r.num_parameters]
    if unsized:
        lines += [f"_No parameter count for {', '.join(unsized)} (report built before model.json existed): "
                  "left out of the size plots._", ""]
    for criterion in dict.fromkeys(ofe["criterion"]):
        lines += [f"## {criterion}", ""]
        for name, table in (("Order-free error", ofe), ("Order sensitivity", os_)):
            sel = table[table["criterion"] == criterion]
            lines += [f"{name}:", "", "| k | composition | setting | sweep | " + " | ".join(labels) + " |",
                      "|---|---|---|---|" + "---|" * len(labels)]
            for _, row in sel.iterrows():
                lines.append(f"| {row['k']} | {row['composition']} | {row['setting']} | {row['sweep'] or '–'} | "
                             + " | ".join(_fmt(row[label]) for label in labels) + " |")
            lines.append("")
        plot = output_path(out / "plots", file_name(criterion, "ofe_vs_size", suffix=".png",
                                                     what=f"plot of criterion {criterion!r}"))
        if plot_against_size(ofe, reports, criterion, plot):
            written[f"plots/{plot.name}"] = plot
            lines += [f"![{criterion}: order-free error against model size](plots/{plot.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    written["report"] = report
    return written

"""Composability metrics: order-free error, order sensitivity, their integrated forms, "# Wins".

These are pure functions over the results table (``docs/results-schema.md``):
no KFP, no torch, so the aggregator component, the CLI and the tests can all
call them directly.

Definitions (paper: "Composable Interventions for Language Models"), for a
bounded criterion κ mapped so that higher is better (``κ' = 1 - κ`` for
lower-is-better criteria such as forget-set accuracy) and interventions i, j:

* order-free error at one setting: ``1 - max(κ'(j∘i), κ'(i∘j))`` -- the error
  left even when the better of the two orders is chosen.  The paper's
  Equation 1 prints ``min`` but its text and every table use ``max``.
* order sensitivity at one setting: ``|κ'(j∘i) - κ'(i∘j)|`` (identical on raw
  and mapped values, since ``1 - x`` preserves distances).
* integrated forms: the area under those per-setting curves over the sweep axis
  normalized to ``[0, 1]`` (trapezoid rule), optionally only over settings where
  a named criterion stays at or above a floor.
* "# Wins": per compared column, the method of a group with the strictly lowest
  value wins; ties (and NaN) award no win.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from shared.criteria import COMPOSABILITY_CRITERIA, CRITERIA, higher_is_better_value

#: order of categories when naming a pair ("ft+wanda", "rmu+gptq", "memit+ga")
CATEGORY_ORDER: dict[str, int] = {"edit": 0, "unlearn": 1, "compress": 2}

#: categories of the ten methods of the design card; pass it as ``categories``
#: where the registry cannot be imported (it may pull in torch).
PAPER_CATEGORIES: dict[str, str] = {
    "ft": "edit",
    "lora": "edit",
    "memit": "edit",
    "ga": "unlearn",
    "gd": "unlearn",
    "rmu": "unlearn",
    "wanda": "compress",
    "sparsegpt": "compress",
    "gptq": "compress",
    "awq": "compress",
}

#: columns every results table must have (step columns are checked against n_steps)
BASE_COLUMNS: tuple[str, ...] = (
    "model_key",
    "n_steps",
    "composition",
    "methods",
    "sweep_method",
    "sweep_param",
    "sweep_value",
)
REQUIRED_COLUMNS: tuple[str, ...] = BASE_COLUMNS + tuple(CRITERIA)

#: columns of :func:`pair_table`, in order
PAIR_COLUMNS: tuple[str, ...] = (
    "pair",
    "first",
    "second",
    "setting",
    "setting_key",
    "sweep_param",
    "sweep_value",
    "criterion",
    "kappa_first_then_second",
    "kappa_second_then_first",
    "order_free_error",
    "order_sensitivity",
    "model_key_first_then_second",
    "model_key_second_then_first",
    "composition_first_then_second",
    "composition_second_then_first",
)

#: columns of :func:`integrated_table`, in order
INTEGRATED_COLUMNS: tuple[str, ...] = (
    "pair",
    "first",
    "second",
    "setting",
    "setting_key",
    "sweep_param",
    "criterion",
    "floor",
    "integrated_order_free_error",
    "integrated_order_sensitivity",
    "n_points",
    "n_points_total",
    "sweep_min",
    "sweep_max",
)

WINS_COLUMN = "# Wins"

#: short names of metric columns, used in the flattened column labels of wins tables
METRIC_SHORT: dict[str, str] = {
    "order_free_error": "OFE",
    "order_sensitivity": "OS",
    "integrated_order_free_error": "OFE",
    "integrated_order_sensitivity": "OS",
}


# --------------------------------------------------------------------------- per setting


def order_free_error(a: float, b: float) -> float:
    """``1 - max(a, b)`` for two higher-is-better values of the two orders.

    ``max``: the error that remains even if one picks the better order -- so a
    pair is only penalized for what no ordering can recover.  NaN if either
    order is NaN, because a missing order cannot be claimed as the better one.
    """
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 1.0 - max(a, b)


def order_sensitivity(a: float, b: float) -> float:
    """``|a - b|``: how much the result depends on the order (NaN if either is NaN)."""
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return abs(a - b)


def criterion_order_free_error(criterion: str, a: float, b: float) -> float:
    """Order-free error of raw criterion values: maps them to higher-is-better first.

    Raw values are what the results table holds; forgetting ``1 - κ`` for a
    lower-is-better criterion is the classic mistake this wrapper prevents.
    """
    return order_free_error(_hib(criterion, a), _hib(criterion, b))


def criterion_order_sensitivity(criterion: str, a: float, b: float) -> float:
    """Order sensitivity of raw criterion values (mapping does not change it; kept for symmetry)."""
    return order_sensitivity(_hib(criterion, a), _hib(criterion, b))


def _hib(criterion: str, value: float) -> float:
    value = float(value)
    return math.nan if math.isnan(value) else float(higher_is_better_value(criterion, value))


# --------------------------------------------------------------------------- integration


def integrate_normalized(
    xs: Sequence[float],
    ys: Sequence[float],
    x_range: tuple[float, float] | None = None,
) -> float:
    """Trapezoid area of ``ys`` over ``xs`` normalized to ``[0, 1]``.

    Normalizing by ``(x - min) / (max - min)`` makes areas comparable across
    sweeps with different units (sparsity 0.25-0.75 vs bits 2-8).  ``x_range``
    fixes ``(min, max)`` of the *full* sweep, so that a floor-restricted subset
    is integrated on the original axis rather than stretched to ``[0, 1]``.

    Returns NaN when fewer than two points are given, when the axis has zero
    width, or when any value is NaN: a missing measurement must not shrink the
    area, since a smaller area reads as a better (lower-error) method.
    """
    x = np.asarray(list(xs), dtype=float)
    y = np.asarray(list(ys), dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"xs and ys differ in length ({x.size} vs {y.size})")
    if x.size < 2 or np.isnan(x).any() or np.isnan(y).any():
        return math.nan
    lo, hi = (float(x.min()), float(x.max())) if x_range is None else (float(x_range[0]), float(x_range[1]))
    if not hi > lo:
        return math.nan
    order = np.argsort(x, kind="stable")
    xn = (x[order] - lo) / (hi - lo)
    yo = y[order]
    return float(np.sum((xn[1:] - xn[:-1]) * (yo[1:] + yo[:-1]) / 2.0))


# --------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class _Step:
    method: str
    params: str  # canonical JSON (sorted keys)

    def sort_key(self, categories: Mapping[str, Any] | None) -> tuple[int, str, str]:
        return (_category_rank(self.method, categories), self.method, self.params)


@dataclass
class PairPoint:
    """One (pair, setting, sweep value): the two evaluated rows of opposite orders."""

    first: str
    second: str
    setting_key: str
    setting_parts: dict[str, Any]
    sweep_param: str
    sweep_value: float
    row_first_then_second: pd.Series
    row_second_then_first: pd.Series
    setting_label: str = "default"


@dataclass
class Pairing:
    """All matched pairs of a results table plus notes on what could not be paired."""

    points: list[PairPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _category_rank(method: str, categories: Mapping[str, Any] | None) -> int:
    if not categories or method not in categories:
        return len(CATEGORY_ORDER) if categories else 0
    cat = categories[method]
    cat = str(getattr(cat, "value", cat))
    return CATEGORY_ORDER.get(cat, len(CATEGORY_ORDER))


def canonical_params(raw: Any) -> str:
    """Re-serialize step params so that key order or spacing never splits a pair."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return ""
    text = str(raw)
    if not text.strip():
        return ""
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return text


def params_dict(canonical: str) -> dict[str, Any]:
    """Step parameters as a dict (``{}`` when absent; non-dict JSON under ``"params"``)."""
    if not canonical:
        return {}
    try:
        value = json.loads(canonical)
    except ValueError:
        return {"params": canonical}
    return value if isinstance(value, dict) else {"params": value}


def _str(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def normalize_results(results: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``results`` with string columns as ``""`` instead of NaN and numbers as floats.

    A CSV round trip turns the schema's empty strings into NaN; every consumer
    here relies on ``""`` meaning "absent".
    """
    df = results.copy()
    str_cols = [c for c in df.columns if c in ("model_key", "composition", "methods", "sweep_method", "sweep_param", "recompress")
                or (c.startswith("step") and (c.endswith("_method") or c.endswith("_params")))]
    for c in str_cols:
        df[c] = df[c].map(_str).astype(object)
    for c in ("sweep_value", *CRITERIA):
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    if "n_steps" in df.columns:
        df["n_steps"] = pd.to_numeric(df["n_steps"], errors="coerce").fillna(0).astype(int)
    return df


def _row_steps(row: pd.Series) -> tuple[_Step, ...]:
    n = int(row["n_steps"])
    return tuple(
        _Step(_str(row.get(f"step{k}_method", "")), canonical_params(row.get(f"step{k}_params", "")))
        for k in range(1, n + 1)
    )


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


def pair_compositions(results: pd.DataFrame, categories: Mapping[str, Any] | None = None) -> Pairing:
    """Match two-step compositions with their opposite-order counterparts.

    Two rows form a pair when their steps are the same (method, full params)
    in opposite orders -- the only rows whose difference is *purely* the order.
    The pair is named ``first+second`` with methods ordered by category
    (edit < unlearn < compress, given ``categories``), then by name, so that a
    pair has one stable name whichever order was run first.  The *setting* is
    every step parameter except the swept one, so the points of one sweep
    line up under one setting.
    """
    df = normalize_results(results)
    notes: list[str] = []
    two = df[df["n_steps"] == 2] if "n_steps" in df.columns else df.iloc[0:0]
    by_steps: dict[tuple[_Step, _Step], list[pd.Series]] = {}
    for _, row in two.iterrows():
        steps = _row_steps(row)
        by_steps.setdefault((steps[0], steps[1]), []).append(row)

    points: list[PairPoint] = []
    seen: set[frozenset] = set()
    for (a, b), rows in sorted(by_steps.items(), key=lambda kv: (kv[0][0].sort_key(categories), kv[0][1].sort_key(categories))):
        key = frozenset((a, b))
        if key in seen:
            continue
        seen.add(key)
        if a == b:
            notes.append(f"composition {rows[0]['composition']!r} applies the same step twice; it has no opposite order")
            continue
        first, second = sorted((a, b), key=lambda s: s.sort_key(categories))
        fwd = by_steps.get((first, second))
        rev = by_steps.get((second, first))
        if not fwd or not rev:
            present = (fwd or rev)[0]
            notes.append(
                f"composition {present['composition']!r} has no opposite-order counterpart in the results; skipped"
            )
            continue
        for label, group in (("first-then-second", fwd), ("second-then-first", rev)):
            if len(group) > 1:
                notes.append(
                    f"{len(group)} rows for {group[0]['composition']!r} ({label}); using the first (model_key {group[0]['model_key']})"
                )
        r_fs, r_sf = fwd[0], rev[0]
        sweep_method = _str(r_fs["sweep_method"]) or _str(r_sf["sweep_method"])
        sweep_param = _str(r_fs["sweep_param"]) or _str(r_sf["sweep_param"])
        sweep_value = _float(r_fs["sweep_value"])
        if math.isnan(sweep_value):
            sweep_value = _float(r_sf["sweep_value"])
        fixed = {step: _params_dict_without(step, sweep_method, sweep_param) for step in (first, second)}
        parts = {f"{step.method}.{k}": v for step in (first, second) for k, v in sorted(fixed[step].items())}
        setting_key = json.dumps(
            {"first": [first.method, fixed[first]], "second": [second.method, fixed[second]],
             "sweep": [sweep_method, sweep_param]},
            sort_keys=True, separators=(",", ":"),
        )
        points.append(PairPoint(first.method, second.method, setting_key, parts, sweep_param, sweep_value, r_fs, r_sf))
    _assign_setting_labels(points)
    return Pairing(points=points, notes=notes)


def _params_dict_without(step: _Step, sweep_method: str, sweep_param: str) -> dict[str, Any]:
    params = params_dict(step.params)
    if sweep_param and step.method == sweep_method:
        params.pop(sweep_param, None)
    return params


def _assign_setting_labels(points: list[PairPoint]) -> None:
    """Label settings by the parameters that differ between settings of the same pair.

    Full parameter lists are unreadable in a table; only the differing ones
    tell two settings apart.  A pair with a single setting is ``default``.
    """
    by_pair: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for p in points:
        by_pair.setdefault((p.first, p.second), {})[p.setting_key] = p.setting_parts
    labels: dict[tuple[str, str, str], str] = {}
    for pair, settings in by_pair.items():
        if len(settings) == 1:
            labels[(*pair, next(iter(settings)))] = "default"
            continue
        keys = sorted({k for parts in settings.values() for k in parts})
        differing = [k for k in keys if len({_fmt_value(parts.get(k, "-")) for parts in settings.values()}) > 1]
        for skey, parts in settings.items():
            label = ", ".join(f"{k}={_fmt_value(parts.get(k, '-'))}" for k in differing)
            labels[(*pair, skey)] = label or skey
    for p in points:
        p.setting_label = labels[(p.first, p.second, p.setting_key)]


def pair_table(
    results: pd.DataFrame,
    categories: Mapping[str, Any] | None = None,
    criteria: Iterable[str] = COMPOSABILITY_CRITERIA,
) -> pd.DataFrame:
    """Per-setting composability: one row per (pair, setting, sweep value, criterion).

    ``kappa_*`` columns hold *raw* criterion values (what a reader recognizes);
    ``order_free_error``/``order_sensitivity`` are computed on the
    higher-is-better mapping.  Criteria NaN in both orders (not evaluated for
    this pair, e.g. edit metrics of an unlearner x compressor pair) are left
    out; NaN in one order gives NaN metrics.  Notes on rows that could not be
    paired are in ``table.attrs["notes"]``.
    """
    crits = list(criteria)
    for c in crits:
        if c not in CRITERIA or not CRITERIA[c].bounded:
            raise ValueError(f"criterion {c!r} is not a bounded criterion; composability metrics need one of {COMPOSABILITY_CRITERIA}")
    pairing = pair_compositions(results, categories)
    rows: list[dict[str, Any]] = []
    for p in pairing.points:
        for c in crits:
            a = _float(p.row_first_then_second.get(c, math.nan))
            b = _float(p.row_second_then_first.get(c, math.nan))
            if math.isnan(a) and math.isnan(b):
                continue
            rows.append({
                "pair": f"{p.first}+{p.second}",
                "first": p.first,
                "second": p.second,
                "setting": p.setting_label,
                "setting_key": p.setting_key,
                "sweep_param": p.sweep_param,
                "sweep_value": p.sweep_value,
                "criterion": c,
                "kappa_first_then_second": a,
                "kappa_second_then_first": b,
                "order_free_error": criterion_order_free_error(c, a, b),
                "order_sensitivity": criterion_order_sensitivity(c, a, b),
                "model_key_first_then_second": _str(p.row_first_then_second["model_key"]),
                "model_key_second_then_first": _str(p.row_second_then_first["model_key"]),
                "composition_first_then_second": _str(p.row_first_then_second["composition"]),
                "composition_second_then_first": _str(p.row_second_then_first["composition"]),
            })
    table = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    if not table.empty:
        crit_rank = {c: i for i, c in enumerate(crits)}
        table = (
            table.assign(_c=table["criterion"].map(crit_rank))
            .sort_values(["pair", "setting", "_c", "sweep_value"], kind="stable", na_position="last")
            .drop(columns="_c")
            .reset_index(drop=True)
        )
    table.attrs["notes"] = list(pairing.notes)
    return table


# --------------------------------------------------------------------------- integrated


def _floor_mask(
    group: pd.DataFrame,
    floor: tuple[str, float],
    pairs: pd.DataFrame,
    results: pd.DataFrame | None,
) -> pd.Series:
    """True where the floor criterion is >= the floor in BOTH orders (NaN fails)."""
    name, value = floor
    if name in set(pairs["criterion"]):
        ref = pairs[(pairs["criterion"] == name)
                    & (pairs["pair"] == group["pair"].iloc[0])
                    & (pairs["setting_key"] == group["setting_key"].iloc[0])]
        lookup = {
            _sv_key(sv): (a, b)
            for sv, a, b in zip(ref["sweep_value"], ref["kappa_first_then_second"], ref["kappa_second_then_first"])
        }
        vals = [lookup.get(_sv_key(sv), (math.nan, math.nan)) for sv in group["sweep_value"]]
    else:
        if results is None:
            raise ValueError(
                f"floor criterion {name!r} is not in the pair table; pass results= to look it up by model_key"
            )
        if name not in results.columns:
            raise ValueError(f"floor criterion {name!r} is not a column of the results table")
        by_key = dict(zip(results["model_key"].map(_str), pd.to_numeric(results[name], errors="coerce")))
        vals = [
            (by_key.get(ka, math.nan), by_key.get(kb, math.nan))
            for ka, kb in zip(group["model_key_first_then_second"], group["model_key_second_then_first"])
        ]
    ok = [(not math.isnan(_float(a))) and (not math.isnan(_float(b))) and _float(a) >= value and _float(b) >= value
          for a, b in vals]
    return pd.Series(ok, index=group.index)


def _sv_key(v: Any) -> float | str:
    f = _float(v)
    return "nan" if math.isnan(f) else round(f, 12)


def integrated_table(
    pairs: pd.DataFrame,
    floor: tuple[str, float] | None = None,
    results: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Integrated order-free error and order sensitivity per (pair, setting, criterion).

    The axis is normalized over all sweep values of the (pair, setting) --
    the *original* sweep -- even when ``floor=(criterion, value)`` drops
    settings where that criterion (raw value) falls below ``value`` in either
    order: the restricted area then measures only the acceptable part of the
    sweep instead of stretching it to the full width.  The floor criterion is
    looked up in ``pairs`` if it is a composability criterion there, otherwise
    in ``results`` by model key (e.g. ``perplexity``).  Values are NaN when
    fewer than two points remain or the sweep has a single value.
    """
    rows: list[dict[str, Any]] = []
    floor_label = f"{floor[0]}>={floor[1]:g}" if floor else ""
    if not pairs.empty:
        for (_pair, _skey), setting in pairs.groupby(["pair", "setting_key"], sort=False, dropna=False):
            sv_all = pd.to_numeric(setting["sweep_value"], errors="coerce").dropna()
            x_range = (float(sv_all.min()), float(sv_all.max())) if not sv_all.empty else (math.nan, math.nan)
            for crit, group in setting.groupby("criterion", sort=False):
                group = group.sort_values("sweep_value", kind="stable")
                n_total = len(group)
                kept = group[_floor_mask(group, floor, pairs, results)] if floor else group
                xs = kept["sweep_value"].astype(float).tolist()
                ofe = integrate_normalized(xs, kept["order_free_error"].astype(float), x_range)
                osens = integrate_normalized(xs, kept["order_sensitivity"].astype(float), x_range)
                first = group.iloc[0]
                rows.append({
                    "pair": first["pair"],
                    "first": first["first"],
                    "second": first["second"],
                    "setting": first["setting"],
                    "setting_key": first["setting_key"],
                    "sweep_param": first["sweep_param"],
                    "criterion": crit,
                    "floor": floor_label,
                    "integrated_order_free_error": ofe,
                    "integrated_order_sensitivity": osens,
                    "n_points": len(kept),
                    "n_points_total": n_total,
                    "sweep_min": x_range[0],
                    "sweep_max": x_range[1],
                })
    table = pd.DataFrame(rows, columns=list(INTEGRATED_COLUMNS))
    table.attrs["notes"] = list(pairs.attrs.get("notes", []))
    return table


# --------------------------------------------------------------------------- wins


def count_wins(wide: pd.DataFrame, min_competitors: int = 2) -> pd.DataFrame:
    """Add a ``# Wins`` column to a wide table (rows = methods, columns = compared values).

    Per column the strictly lowest value wins (every metric here is an error:
    lower is better).  A tie for the lowest value awards no win, NaN never
    wins, and a column with fewer than ``min_competitors`` non-NaN values
    awards nothing -- a win needs an opponent.
    """
    wins = pd.Series(0, index=wide.index, dtype=int)
    for col in wide.columns:
        vals = pd.to_numeric(wide[col], errors="coerce")
        valid = vals.dropna()
        if len(valid) < max(1, min_competitors):
            continue
        best = valid.min()
        winners = valid[valid == best]
        if len(winners) == 1:
            wins[winners.index[0]] += 1
    out = wide.copy()
    out.insert(0, WINS_COLUMN, wins)
    return out


@dataclass(frozen=True)
class WinsRecord:
    """One compared value of a wins table: ``method``'s ``metric`` in ``column``, from table row ``row``."""

    method: str
    column: str
    metric: str
    value: float
    row: Any


def wins_records(
    table: pd.DataFrame,
    group: Sequence[str],
    metrics: Sequence[str] | None = None,
    column_keys: Sequence[str] = ("opponent", "criterion"),
) -> list[WinsRecord]:
    """The values :func:`wins_table` compares, with the table row each comes from.

    For each row whose pair (or k-step combo, ``members``) has exactly one
    member of ``group``, that member is the row's method and the others its
    opponent; rows with several members of the group are ignored.  Columns are labelled like ``"wanda edit_success OFE"``
    and come in sorted order.  Raises ValueError if a method has several
    values in one column (several sweep values or settings).
    """
    group = list(dict.fromkeys(group))
    if metrics is None:
        metrics = [m for m in ("order_free_error", "order_sensitivity",
                               "integrated_order_free_error", "integrated_order_sensitivity") if m in table.columns]
    members = set(group)
    raw: list[tuple[tuple[Any, ...], WinsRecord]] = []
    for idx, row in table.iterrows():
        # a pair table names its two methods; a k-step table (shared.orders) lists them in "members"
        row_members = str(row["members"]).split("+") if "members" in row.index else [row["first"], row["second"]]
        inside = [m for m in row_members if m in members]
        if len(inside) != 1:
            continue
        method = inside[0]
        opponent = "+".join(m for m in row_members if m != method)
        keys = [opponent if key == "opponent" else row[key] for key in column_keys]
        for metric in metrics:
            sort_key = (*keys, METRIC_SHORT.get(metric, metric))
            label = " ".join(str(k) for k in sort_key)
            raw.append((sort_key, WinsRecord(method, label, metric, _float(row[metric]), idx)))
    seen: dict[tuple[str, str], WinsRecord] = {}
    for _, rec in raw:
        if (rec.method, rec.column) in seen:
            raise ValueError(
                f"method {rec.method!r} has several values for column {rec.column!r}; filter the table to one "
                f"sweep value/setting or add 'sweep_value'/'setting' to column_keys"
            )
        seen[(rec.method, rec.column)] = rec
    raw.sort(key=lambda kr: tuple(str(k) if not isinstance(k, (int, float)) else k for k in kr[0]))
    return [rec for _, rec in raw]


def wins_table(
    table: pd.DataFrame,
    group: Sequence[str],
    metrics: Sequence[str] | None = None,
    column_keys: Sequence[str] = ("opponent", "criterion"),
    min_competitors: int = 2,
) -> pd.DataFrame:
    """Count "# Wins" of the methods in ``group`` against every opponent, criterion and metric.

    ``table`` is a :func:`pair_table` (filter it to one sweep value first) or an
    :func:`integrated_table`.  For each row whose pair has exactly one member of
    ``group``, that member is the row's method and the other member is the
    ``opponent``; pairs inside the group are ignored.  The result has one row
    per method of ``group`` (in the given order), a ``# Wins`` column, then one
    column per (``column_keys``..., metric) labelled like
    ``"wanda edit_success OFE"``.  This reproduces the paper's summary tables,
    e.g. editors (ft, lora, memit) vs each compressor.

    Raises ValueError if a method has several values in one column (several
    sweep values or settings): add ``"sweep_value"``/``"setting"`` to
    ``column_keys`` or filter the table first.
    """
    group = list(dict.fromkeys(group))
    records = wins_records(table, group, metrics, column_keys)
    if not records:
        wide = pd.DataFrame(index=pd.Index(group, name="method"))
        return count_wins(wide, min_competitors)
    long = pd.DataFrame([{"method": r.method, "column": r.column, "value": r.value} for r in records])
    column_order = list(dict.fromkeys(r.column for r in records))
    wide = long.pivot(index="method", columns="column", values="value")
    wide = wide.reindex(index=group, columns=column_order)
    wide.index.name = "method"
    wide.columns.name = None
    return count_wins(wide, min_competitors)


def category_groups(methods: Iterable[str], categories: Mapping[str, Any]) -> dict[str, list[str]]:
    """Methods per category (only those present), in category order -- the groups of wins tables."""
    out: dict[str, list[str]] = {}
    for m in sorted(set(methods), key=lambda m: (_category_rank(m, categories), m)):
        cat = categories.get(m)
        if cat is None:
            continue
        out.setdefault(str(getattr(cat, "value", cat)), []).append(m)
    return out


__all__ = [
    "BASE_COLUMNS",
    "CATEGORY_ORDER",
    "PAPER_CATEGORIES",
    "REQUIRED_COLUMNS",
    "WINS_COLUMN",
    "Pairing",
    "PairPoint",
    "canonical_params",
    "category_groups",
    "count_wins",
    "criterion_order_free_error",
    "criterion_order_sensitivity",
    "integrate_normalized",
    "integrated_table",
    "normalize_results",
    "order_free_error",
    "order_sensitivity",
    "pair_compositions",
    "pair_table",
    "params_dict",
    "wins_records",
    "wins_table",
    "WinsRecord",
]

"""Composability of k interventions over all k! orders (the paper's metrics, generalized).

The paper defines order-free error and order sensitivity for two
interventions.  For k interventions applied in every one of their k! orders,
with the criterion mapped to higher-is-better (``κ'``):

* order-free error  ``1 - max over orders of κ'``  -- the error left even with
  the best order;
* order sensitivity ``max over orders of κ' - min over orders of κ'`` -- how
  much choosing the order can change the result.

For k = 2 these are the paper's (``|a - b| = max - min``).  Integrated forms
are areas over the sweep axis normalized to [0, 1], as for pairs.  A group of
compositions only counts when all k! orders were evaluated: a missing order
could be the best or the worst one, so the metrics would be wrong silently.

Pure pandas/numpy, like :mod:`shared.metrics`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from shared.criteria import COMPOSABILITY_CRITERIA, CRITERIA
from shared.metrics import (
    _category_rank,
    _float,
    _fmt_value,
    _hib,
    _params_dict_without,
    _row_steps,
    _Step,
    _str,
    integrate_normalized,
    normalize_results,
)

#: columns of :func:`order_table`, in order
ORDER_COLUMNS: tuple[str, ...] = (
    "combo",
    "k",
    "members",
    "setting",
    "setting_key",
    "sweep_param",
    "sweep_value",
    "criterion",
    "n_orders",
    "best_order",
    "worst_order",
    "kappa_best",
    "kappa_worst",
    "order_free_error",
    "order_sensitivity",
    "compositions",
)

#: columns of :func:`integrated_order_table`, in order
INTEGRATED_ORDER_COLUMNS: tuple[str, ...] = (
    "combo",
    "k",
    "members",
    "setting",
    "setting_key",
    "sweep_param",
    "criterion",
    "integrated_order_free_error",
    "integrated_order_sensitivity",
    "n_points",
    "sweep_min",
    "sweep_max",
)


@dataclass
class OrderGroup:
    """The k! evaluated orders of one set of k distinct steps at one (setting, sweep value)."""

    members: tuple[str, ...]  # method names in category order
    setting_key: str
    setting_parts: dict[str, Any]
    sweep_param: str
    sweep_value: float
    rows: dict[tuple[str, ...], pd.Series]  # order (method names) -> results row
    setting_label: str = "default"


@dataclass
class OrderGrouping:
    groups: list[OrderGroup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def group_orders(results: pd.DataFrame, categories: Mapping[str, Any] | None = None,
                 sizes: Iterable[int] | None = None) -> OrderGrouping:
    """Group compositions of k >= 2 distinct steps by their step set; keep complete groups (all k! orders)."""
    df = normalize_results(results)
    wanted = set(sizes) if sizes is not None else None
    notes: list[str] = []
    by_set: dict[frozenset, dict[tuple[_Step, ...], pd.Series]] = {}
    for _, row in df[df["n_steps"] >= 2].iterrows():
        k = int(row["n_steps"])
        if wanted is not None and k not in wanted:
            continue
        steps = _row_steps(row)
        if len(set(steps)) != k:
            notes.append(f"composition {row['composition']!r} applies a step twice; it has no set of distinct orders")
            continue
        by_set.setdefault(frozenset(steps), {}).setdefault(steps, row)
    groups: list[OrderGroup] = []
    for step_set, orders in by_set.items():
        k = len(step_set)
        expected = math.factorial(k)
        if len(orders) < expected:
            example = next(iter(orders.values()))
            notes.append(f"{len(orders)} of the {expected} orders of {{{', '.join(sorted(s.method for s in step_set))}}} "
                         f"were evaluated (e.g. {example['composition']!r}); left out: every order is needed")
            continue
        ordered_steps = sorted(step_set, key=lambda s: s.sort_key(categories))
        first_row = next(iter(orders.values()))
        sweep_method = _str(first_row["sweep_method"])
        sweep_param = _str(first_row["sweep_param"])
        sweep_value = _float(first_row["sweep_value"])
        fixed = {s: _params_dict_without(s, sweep_method, sweep_param) for s in ordered_steps}
        parts = {f"{s.method}.{key}": v for s in ordered_steps for key, v in sorted(fixed[s].items())}
        setting_key = json.dumps({"steps": [[s.method, fixed[s]] for s in ordered_steps],
                                  "sweep": [sweep_method, sweep_param]}, sort_keys=True, separators=(",", ":"))
        rows = {tuple(s.method for s in order): row for order, row in orders.items()}
        groups.append(OrderGroup(tuple(s.method for s in ordered_steps), setting_key, parts, sweep_param,
                                 sweep_value, rows))
    _label_settings(groups)
    groups.sort(key=lambda g: (len(g.members), [_category_rank(m, categories) for m in g.members], g.members,
                               g.setting_label, _sort_float(g.sweep_value)))
    return OrderGrouping(groups, notes)


def _sort_float(v: float) -> float:
    return math.inf if math.isnan(v) else v


def _label_settings(groups: list[OrderGroup]) -> None:
    """Label a combo's settings by the parameters that differ between them (``default`` if only one)."""
    by_combo: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}
    for g in groups:
        by_combo.setdefault(g.members, {})[g.setting_key] = g.setting_parts
    labels: dict[tuple[tuple[str, ...], str], str] = {}
    for combo, settings in by_combo.items():
        if len(settings) == 1:
            labels[(combo, next(iter(settings)))] = "default"
            continue
        keys = sorted({k for parts in settings.values() for k in parts})
        differing = [k for k in keys if len({_fmt_value(p.get(k, "-")) for p in settings.values()}) > 1]
        for skey, parts in settings.items():
            labels[(combo, skey)] = ", ".join(f"{k}={_fmt_value(parts.get(k, '-'))}" for k in differing) or skey
    for g in groups:
        g.setting_label = labels[(g.members, g.setting_key)]


def order_table(
    results: pd.DataFrame,
    categories: Mapping[str, Any] | None = None,
    criteria: Iterable[str] = COMPOSABILITY_CRITERIA,
    sizes: Iterable[int] | None = None,
) -> pd.DataFrame:
    """One row per (combo of k steps, setting, sweep value, criterion) over all k! orders.

    ``kappa_best`` / ``kappa_worst`` are raw criterion values of the best and
    worst order (by the higher-is-better mapping), named in ``best_order`` /
    ``worst_order`` (methods joined by ``>``); ``compositions`` lists the
    composition labels of every order (JSON, in the order of
    ``itertools.permutations(members)``).  Criteria NaN in every order are
    left out; NaN in some order gives NaN metrics.  Notes on incomplete
    groups are in ``table.attrs["notes"]``.
    """
    crits = list(criteria)
    for c in crits:
        if c not in CRITERIA or not CRITERIA[c].bounded:
            raise ValueError(f"criterion {c!r} is not a bounded criterion; composability metrics need one of {COMPOSABILITY_CRITERIA}")
    grouping = group_orders(results, categories, sizes)
    rows: list[dict[str, Any]] = []
    for g in grouping.groups:
        perms = list(itertools.permutations(g.members))
        for c in crits:
            raw = [_float(g.rows[p].get(c, math.nan)) for p in perms]
            if all(math.isnan(v) for v in raw):
                continue
            mapped = [_hib(c, v) for v in raw]
            if any(math.isnan(v) for v in mapped):
                best = worst = None
                ofe = osens = math.nan
            else:
                best, worst = int(np.argmax(mapped)), int(np.argmin(mapped))
                ofe, osens = 1.0 - mapped[best], mapped[best] - mapped[worst]
            rows.append({
                "combo": "+".join(g.members),
                "k": len(g.members),
                "members": "+".join(g.members),
                "setting": g.setting_label,
                "setting_key": g.setting_key,
                "sweep_param": g.sweep_param,
                "sweep_value": g.sweep_value,
                "criterion": c,
                "n_orders": len(perms),
                "best_order": ">".join(perms[best]) if best is not None else "",
                "worst_order": ">".join(perms[worst]) if worst is not None else "",
                "kappa_best": raw[best] if best is not None else math.nan,
                "kappa_worst": raw[worst] if worst is not None else math.nan,
                "order_free_error": ofe,
                "order_sensitivity": osens,
                "compositions": json.dumps([_str(g.rows[p]["composition"]) for p in perms]),
            })
    table = pd.DataFrame(rows, columns=list(ORDER_COLUMNS))
    table.attrs["notes"] = list(grouping.notes)
    return table


def integrated_order_table(orders: pd.DataFrame) -> pd.DataFrame:
    """Integrated order-free error and order sensitivity per (combo, setting, criterion) over the sweep."""
    rows: list[dict[str, Any]] = []
    if not orders.empty:
        for (_combo, _skey, crit), grp in orders.groupby(["combo", "setting_key", "criterion"], sort=False):
            grp = grp.sort_values("sweep_value", kind="stable")
            xs = grp["sweep_value"].astype(float).tolist()
            first = grp.iloc[0]
            rows.append({
                "combo": first["combo"], "k": first["k"], "members": first["members"], "setting": first["setting"],
                "setting_key": first["setting_key"], "sweep_param": first["sweep_param"], "criterion": crit,
                "integrated_order_free_error": integrate_normalized(xs, grp["order_free_error"].astype(float)),
                "integrated_order_sensitivity": integrate_normalized(xs, grp["order_sensitivity"].astype(float)),
                "n_points": len(grp),
                "sweep_min": float(np.nanmin(xs)) if xs else math.nan,
                "sweep_max": float(np.nanmax(xs)) if xs else math.nan,
            })
    table = pd.DataFrame(rows, columns=list(INTEGRATED_ORDER_COLUMNS))
    table.attrs["notes"] = list(orders.attrs.get("notes", []))
    return table


__all__ = ["INTEGRATED_ORDER_COLUMNS", "ORDER_COLUMNS", "OrderGroup", "OrderGrouping", "group_orders",
           "integrated_order_table", "order_table"]

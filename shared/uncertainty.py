"""Bootstrap intervals for every criterion and every composability figure built from them.

The paper reports point values only.  Here each evaluation keeps its per-item
scores (:mod:`shared.item_scores`: one per edit record, question or
document), and a *paired* bootstrap resamples those items:

* one resample draws the items once (with replacement, within each stratum)
  and every evaluated model is scored on that same draw -- both orders of a
  pair are measured on the same edits and questions, so their difference
  (order sensitivity) is not drowned in item-to-item variation the two
  orders share; identical orders give an interval of exactly ``[0, 0]``;
* with several edit batches, a resample first draws batches with
  replacement, then items within each drawn batch (two-stage bootstrap), and
  averages over the drawn batches as the results table averages over batches;
* each resample recomputes every criterion, then order-free error, order
  sensitivity, their integrated forms and the "# Wins" counts exactly as the
  point values are computed (:mod:`shared.metrics`), and the interval is the
  percentile interval over resamples.

Choices that keep the point values and intervals consistent: a floor of the
integrated metrics keeps the sweep points the *point* values keep (a
resample does not move the floor); NaN stays NaN.

Pure numpy/pandas: the aggregator, the CLI and the tests call it directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared.criteria import CRITERIA
from shared.inputs import InputError, check_number, read_json, show, where
from shared.item_scores import TRANSFORMS, ItemScores, items_from_json, items_to_json

#: defaults of the report's bootstrap: resamples, seed and interval level
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95

#: suffixes of interval columns: ``order_free_error_lo`` / ``order_free_error_hi``
LO, HI = "_lo", "_hi"


@dataclass(frozen=True)
class ItemRecord:
    """The per-item scores of one composition's evaluation on one edit batch."""

    composition: str
    edit_batch: int
    model_key: str
    items: dict[str, ItemScores]

    def to_json(self) -> dict[str, Any]:
        return {"composition": self.composition, "edit_batch": self.edit_batch, "model_key": self.model_key,
                "items": items_to_json(self.items)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ItemRecord":
        return cls(str(obj["composition"]), int(obj["edit_batch"]), str(obj["model_key"]), items_from_json(obj["items"]))


def write_item_records(records: Sequence[ItemRecord], path: str | Path) -> Path:
    """``items.json`` beside a results table: what ``lmcompose report`` needs to rebuild the intervals."""
    path = Path(path)
    path.write_text(json.dumps({"version": 1, "records": [r.to_json() for r in records]}, separators=(",", ":")),
                    encoding="utf-8")
    return path


def read_item_records(path: str | Path) -> list[ItemRecord]:
    """The records of an ``items.json``, every field checked (:func:`validate_item_records`).

    A file that is missing, not JSON, wrongly shaped or holds a score that is
    not a finite number in its criterion's range raises
    :class:`~shared.inputs.InputError` naming the file and the JSON path of
    the bad value (``records[3].items.edit_success.values[0]``).
    """
    obj = read_json(path, "items file")
    if not isinstance(obj, dict) or obj.get("version") != 1 or not isinstance(obj.get("records"), list):
        raise InputError(f"{path}: not an lm-compose items file (expected {{'version': 1, 'records': [...]}})")
    return validate_item_records(obj["records"], str(path))


def _item_scores_from_json(obj: Any, at: str, criterion: str) -> ItemScores:
    """One criterion's item scores, each field's type and range checked (scores of bounded criteria in [0, 1])."""
    if not isinstance(obj, dict) or not isinstance(obj.get("values"), list) or not obj["values"]:
        raise InputError(f"{at}: expected {{'values': [numbers, ...]}} with at least one item")
    unknown = set(obj) - {"values", "weights", "strata", "transform"}
    if unknown:
        raise InputError(f"{at}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    n = len(obj["values"])
    transform = obj.get("transform", "identity")
    if transform not in TRANSFORMS:
        raise InputError(f"{at}.transform: {transform!r} is not one of {', '.join(TRANSFORMS)}")
    weights = obj.get("weights")
    strata = obj.get("strata")
    for name, seq in (("weights", weights), ("strata", strata)):
        if seq is not None and (not isinstance(seq, list) or len(seq) != n):
            raise InputError(f"{at}.{name}: expected a list of {n} entries (one per value)")
    ws = [check_number(w, f"{at}.weights[{i}]", lo=0.0, allow_nan=False, text=False)
          for i, w in enumerate(weights)] if weights is not None else None
    if strata is not None:
        for i, v in enumerate(strata):
            if isinstance(v, bool) or not isinstance(v, int):
                raise InputError(f"{at}.strata[{i}]: {v!r} is not a whole number")
    crit = CRITERIA.get(criterion)
    bounded = crit is not None and crit.bounded and transform == "identity"
    for i, v in enumerate(obj["values"]):
        hi = (ws[i] if ws is not None else 1.0) if bounded else None
        lo = 0.0 if (bounded or transform == "exp") else None  # a summed NLL is >= 0 too
        check_number(v, f"{at}.values[{i}]", lo=lo, hi=hi, allow_nan=False, text=False)
    return ItemScores.from_json(obj)


def validate_item_records(raw: Any, source: str = "items") -> list[ItemRecord]:
    """Records from their JSON form, refusing anything the bootstrap would trip over, with the path of the value.

    Each record: ``composition`` and ``model_key`` strings, ``edit_batch`` a
    whole number >= 0, ``items`` an object of criteria; each score a finite
    number (scores of bounded criteria -- accuracies, F1 -- in [0, 1], or in
    [0, weight] when weighted), weights >= 0; one record per composition and
    batch; and every record of the same batch and evaluator has as many items
    (they score the same data).
    """
    if not isinstance(raw, list):
        raise InputError(f"{source}: records: expected a list")
    records: list[ItemRecord] = []
    seen: dict[tuple[str, int], int] = {}
    families: dict[tuple[int, str], tuple[tuple[int, tuple[int, ...] | None], str]] = {}
    for r, obj in enumerate(raw):
        at = f"{source}: records[{r}]"
        if not isinstance(obj, dict):
            raise InputError(f"{at}: expected an object, got {type(obj).__name__}")
        for name in ("composition", "model_key"):
            if not isinstance(obj.get(name), str):
                raise InputError(f"{at}.{name}: expected a string, got {show(obj.get(name))}")
        batch = obj.get("edit_batch")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise InputError(f"{at}.edit_batch: expected a whole number >= 0, got {show(batch)}")
        if not isinstance(obj.get("items"), dict):
            raise InputError(f"{at}.items: expected an object of criteria, got {show(obj.get('items'))}")
        comp = obj["composition"]
        if (comp, batch) in seen:
            raise InputError(f"{at}: a second record for composition {show(comp)} on edit batch {batch} "
                             f"(the first is records[{seen[(comp, batch)]}])")
        seen[(comp, batch)] = r
        items = {}
        for criterion, scores in obj["items"].items():
            name = f"records[{r}].items.{criterion}"
            items[criterion] = _item_scores_from_json(scores, f"{source}: {name}", criterion)
            family = (batch, _evaluator_of(criterion))
            sig = _signature(items[criterion])
            first = families.setdefault(family, (sig, name))
            if first[0] != sig:
                raise InputError(f"{source}: {name}: {sig[0]} items, but {first[1]} has {first[0][0]} "
                                 "(the same data must have the same items, in the same strata)")
        records.append(ItemRecord(comp, batch, obj["model_key"], items))
    return records


def check_results_match_items(results: pd.DataFrame, records: Sequence[ItemRecord],
                              results_source: str = "results table", items_source: str = "the per-item scores",
                              rel: float = 1e-6) -> None:
    """Each criterion of ``results`` must be the mean over edit batches of what its per-item scores give.

    The results table and ``items.json`` of a report are written together from
    the same evaluations, so a criterion that its items do not reproduce was
    changed afterwards (or the two files come from different runs): the
    intervals would then sit around another value than the point.  Raises
    :class:`~shared.inputs.InputError` naming the row (spreadsheet numbering)
    and column.  Rows without records, and criteria without items on every
    edit batch of their composition, are not checked.
    """
    by_comp: dict[str, list[ItemRecord]] = {}
    for r in records:
        by_comp.setdefault(r.composition, []).append(r)
    if "composition" not in results.columns:
        return
    for i, (comp, row) in enumerate(zip(results["composition"].tolist(), results.to_dict("records"))):
        recs = by_comp.get(str(comp) if comp is not None else "")
        if not recs:
            continue
        for criterion in CRITERIA:
            if criterion not in row or not all(criterion in r.items for r in recs):
                continue
            expected = float(np.mean([r.items[criterion].value() for r in recs]))
            try:
                got = float(row[criterion])
            except (TypeError, ValueError):
                got = math.nan
            if not (math.isclose(got, expected, rel_tol=rel, abs_tol=1e-9) or got == expected):
                raise InputError(f"{where(results_source, i, criterion)}: {got!r}, but the per-item scores in "
                                 f"{items_source} give {expected!r} for composition {comp!r} (the table was "
                                 "changed after it was written, or the two files are from different runs)")


# --------------------------------------------------------------------------- resampling


def resample_indices(scores: ItemScores, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` item indices: each row draws every stratum's items with replacement, keeping its size."""
    n = len(scores)
    index = np.empty((n_boot, n), dtype=np.int64)
    for positions in scores.stratum_indices():
        index[:, positions] = positions[rng.integers(0, len(positions), size=(n_boot, len(positions)))]
    return index


@dataclass
class Bootstrap:
    """Resampled criteria: ``values[composition][criterion]`` is an array of ``n_boot`` values."""

    n_boot: int
    seed: int
    confidence: float
    values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, composition: str, criterion: str) -> np.ndarray | None:
        return self.values.get(composition, {}).get(criterion)

    def interval(self, draws: np.ndarray | None) -> tuple[float, float]:
        """Percentile interval of ``draws`` (NaN, NaN when there are none or any is NaN)."""
        if draws is None or len(draws) == 0 or np.isnan(draws).any():
            return math.nan, math.nan
        tail = (1.0 - self.confidence) / 2.0 * 100.0
        lo, hi = np.percentile(draws, [tail, 100.0 - tail])
        return float(lo), float(hi)


def _signature(scores: ItemScores) -> tuple[int, tuple[int, ...] | None]:
    return len(scores), scores.strata


def bootstrap_criteria(
    records: Sequence[ItemRecord],
    n_boot: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Bootstrap:
    """Resample the items of every (composition, criterion), paired across compositions.

    Items of one criterion on one edit batch are the same data for every
    composition, so one index draw per (batch, evaluator) serves all of them;
    a differing item count there is a bookkeeping error and raises.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1 (got {n_boot})")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1) (got {confidence})")
    boot = Bootstrap(n_boot=n_boot, seed=seed, confidence=confidence)
    if not records:
        return boot
    rng = np.random.default_rng(seed)
    batches = sorted({r.edit_batch for r in records})
    # stage 1: which batches each resample uses (only when there are several)
    batch_draws = rng.integers(0, len(batches), size=(n_boot, len(batches))) if len(batches) > 1 else None

    # stage 2: one item draw per (batch, evaluator), shared by every composition
    families: dict[tuple[int, str], tuple[int, tuple[int, ...] | None]] = {}
    for r in records:
        for criterion, scores in r.items.items():
            fam = (r.edit_batch, _evaluator_of(criterion))
            sig = _signature(scores)
            if families.setdefault(fam, sig) != sig:
                raise ValueError(
                    f"criterion {criterion!r} of {r.composition!r} (batch {r.edit_batch}) has {len(scores)} items, "
                    f"other models of the same data have {families[fam][0]}: the items must be the same data"
                )
    draws: dict[tuple[int, str], np.ndarray] = {}
    for fam in sorted(families):
        n, strata = families[fam]
        draws[fam] = resample_indices(ItemScores.of([0.0] * n, strata=strata), n_boot, rng)

    by_comp: dict[str, dict[int, ItemRecord]] = {}
    for r in records:
        if r.edit_batch in by_comp.setdefault(r.composition, {}):
            raise ValueError(f"two item records for {r.composition!r} on edit batch {r.edit_batch}")
        by_comp[r.composition][r.edit_batch] = r
    for comp, per_batch in by_comp.items():
        out: dict[str, np.ndarray] = {}
        criteria = set.intersection(*(set(per_batch[b].items) if b in per_batch else set() for b in batches))
        missing = set().union(*(set(r.items) for r in per_batch.values())) - criteria
        if missing:
            boot.notes.append(f"{comp or '(base model)'}: per-item scores of {', '.join(sorted(missing))} "
                              "missing on some edit batch; no interval for them")
        for criterion in sorted(criteria):
            stats = np.stack([
                per_batch[b].items[criterion].resampled(draws[(b, _evaluator_of(criterion))]) for b in batches
            ])  # [batches, n_boot]
            if batch_draws is None:
                out[criterion] = stats[0]
            else:
                out[criterion] = stats[batch_draws, np.arange(n_boot)[:, None]].mean(axis=1)
        boot.values[comp] = out
    return boot


def _evaluator_of(criterion: str) -> str:
    crit = CRITERIA.get(criterion)
    return crit.evaluator if crit is not None else criterion


# --------------------------------------------------------------------------- tables with intervals


def _with_interval_columns(out: pd.DataFrame, draws: Mapping[Any, Mapping[str, np.ndarray]],
                           metrics: Sequence[str], boot: Bootstrap) -> pd.DataFrame:
    """Insert ``<metric>_lo`` / ``<metric>_hi`` right after each metric column (rows without draws: NaN)."""
    for metric in metrics:
        bounds = [boot.interval(draws.get(i, {}).get(metric)) for i in out.index]
        at = list(out.columns).index(metric) + 1
        out.insert(at, metric + LO, [lo for lo, _ in bounds])
        out.insert(at + 1, metric + HI, [hi for _, hi in bounds])
    return out


def results_with_intervals(results: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """The results table plus ``<criterion>_lo`` / ``<criterion>_hi`` for every criterion with items."""
    out = results.copy()
    for criterion in CRITERIA:
        if criterion not in out.columns:
            continue
        bounds = [boot.interval(boot.get(str(comp), criterion)) for comp in out["composition"]]
        if all(math.isnan(lo) for lo, _ in bounds):
            continue
        at = list(out.columns).index(criterion) + 1
        out.insert(at, criterion + LO, [lo for lo, _ in bounds])
        out.insert(at + 1, criterion + HI, [hi for _, hi in bounds])
    return out


def _hib_draws(criterion: str, draws: np.ndarray) -> np.ndarray:
    return draws if CRITERIA[criterion].higher_is_better else 1.0 - draws


def pair_draws(pairs: pd.DataFrame, boot: Bootstrap) -> dict[Any, dict[str, np.ndarray]]:
    """Resampled OFE and OS of every pair-table row (by row index); rows without items are absent."""
    out: dict[Any, dict[str, np.ndarray]] = {}
    for idx, row in pairs.iterrows():
        crit = row["criterion"]
        a = boot.get(row["composition_first_then_second"], crit)
        b = boot.get(row["composition_second_then_first"], crit)
        if a is None or b is None:
            continue
        ha, hb = _hib_draws(crit, a), _hib_draws(crit, b)
        out[idx] = {"order_free_error": 1.0 - np.maximum(ha, hb), "order_sensitivity": np.abs(ha - hb),
                    "order_difference": a - b}
    return out


def pairs_with_intervals(pairs: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """The pair table plus ``order_free_error_lo/_hi``, ``order_sensitivity_lo/_hi`` and the signed difference.

    ``order_difference`` = raw criterion of first-then-second minus
    second-then-first, with its interval.  Order sensitivity is its absolute
    value, and the percentile interval of an absolute value stays above 0
    whenever the resamples rarely hit exactly 0 -- so whether the order
    *matters* is read from the signed difference: an interval that excludes
    0 shows it does.
    """
    draws = pair_draws(pairs, boot)
    out = pairs.copy()
    at = list(out.columns).index("order_sensitivity") + 1
    out.insert(at, "order_difference", out["kappa_first_then_second"] - out["kappa_second_then_first"])
    return _with_interval_columns(out, draws, ("order_free_error", "order_sensitivity", "order_difference"), boot)


def _trapezoid_draws(xs: Sequence[float], ys: np.ndarray, x_range: tuple[float, float]) -> np.ndarray | None:
    """Row-wise :func:`shared.metrics.integrate_normalized` of ``ys`` (``[points, n_boot]``)."""
    x = np.asarray(xs, dtype=float)
    lo, hi = x_range
    if x.size < 2 or np.isnan(x).any() or not hi > lo:
        return None
    order = np.argsort(x, kind="stable")
    xn = (x[order] - lo) / (hi - lo)
    y = ys[order]
    return ((xn[1:] - xn[:-1])[:, None] * (y[1:] + y[:-1]) / 2.0).sum(axis=0)


def integrated_draws(
    integrated: pd.DataFrame,
    pairs: pd.DataFrame,
    boot: Bootstrap,
    floor: tuple[str, float] | None = None,
    results: pd.DataFrame | None = None,
) -> dict[Any, dict[str, np.ndarray]]:
    """Resampled integrated OFE and OS of every integrated-table row (by row index).

    The sweep points kept under a floor are those the point value kept
    (:func:`shared.metrics.integrated_table`), on the same normalized axis.
    """
    from shared.metrics import _floor_mask

    per_row = pair_draws(pairs, boot)
    out: dict[Any, dict[str, np.ndarray]] = {}
    for idx, row in integrated.iterrows():
        group = pairs[(pairs["pair"] == row["pair"]) & (pairs["setting_key"] == row["setting_key"])
                      & (pairs["criterion"] == row["criterion"])].sort_values("sweep_value", kind="stable")
        if row["floor"] and floor:
            group = group[_floor_mask(group, floor, pairs, results)]
        if group.empty or any(i not in per_row for i in group.index):
            continue
        xs = group["sweep_value"].astype(float).tolist()
        entry = {}
        for metric in ("order_free_error", "order_sensitivity"):
            ys = np.stack([per_row[i][metric] for i in group.index])
            area = _trapezoid_draws(xs, ys, (float(row["sweep_min"]), float(row["sweep_max"])))
            if area is not None:
                entry["integrated_" + metric] = area
        if entry:
            out[idx] = entry
    return out


def integrated_with_intervals(
    integrated: pd.DataFrame,
    pairs: pd.DataFrame,
    boot: Bootstrap,
    floor: tuple[str, float] | None = None,
    results: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The integrated table plus ``integrated_order_free_error_lo/_hi`` and ``..._sensitivity_lo/_hi``."""
    draws = integrated_draws(integrated, pairs, boot, floor, results)
    out = integrated.copy()
    return _with_interval_columns(out, draws, ("integrated_order_free_error", "integrated_order_sensitivity"), boot)


def order_draws(orders: pd.DataFrame, boot: Bootstrap) -> dict[Any, dict[str, np.ndarray]]:
    """Resampled k-step OFE and OS of every :func:`shared.orders.order_table` row (by row index)."""
    out: dict[Any, dict[str, np.ndarray]] = {}
    for idx, row in orders.iterrows():
        crit = row["criterion"]
        per_order = [boot.get(comp, crit) for comp in json.loads(row["compositions"])]
        if any(d is None for d in per_order):
            continue
        mapped = np.stack([_hib_draws(crit, d) for d in per_order])  # [orders, n_boot]
        best, worst = mapped.max(axis=0), mapped.min(axis=0)
        out[idx] = {"order_free_error": 1.0 - best, "order_sensitivity": best - worst}
    return out


def orders_with_intervals(orders: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """The k-step table plus ``order_free_error_lo/_hi`` and ``order_sensitivity_lo/_hi``."""
    draws = order_draws(orders, boot)
    out = orders.copy()
    return _with_interval_columns(out, draws, ("order_free_error", "order_sensitivity"), boot)


def integrated_order_draws(integrated: pd.DataFrame, orders: pd.DataFrame, boot: Bootstrap) -> dict[Any, dict[str, np.ndarray]]:
    """Resampled integrated k-step metrics of every :func:`shared.orders.integrated_order_table` row."""
    per_row = order_draws(orders, boot)
    out: dict[Any, dict[str, np.ndarray]] = {}
    for idx, row in integrated.iterrows():
        group = orders[(orders["combo"] == row["combo"]) & (orders["setting_key"] == row["setting_key"])
                       & (orders["criterion"] == row["criterion"])].sort_values("sweep_value", kind="stable")
        if group.empty or any(i not in per_row for i in group.index):
            continue
        xs = group["sweep_value"].astype(float).tolist()
        entry = {}
        for metric in ("order_free_error", "order_sensitivity"):
            area = _trapezoid_draws(xs, np.stack([per_row[i][metric] for i in group.index]),
                                    (float(row["sweep_min"]), float(row["sweep_max"])))
            if area is not None:
                entry["integrated_" + metric] = area
        if entry:
            out[idx] = entry
    return out


def integrated_orders_with_intervals(integrated: pd.DataFrame, orders: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    draws = integrated_order_draws(integrated, orders, boot)
    out = integrated.copy()
    return _with_interval_columns(out, draws, ("integrated_order_free_error", "integrated_order_sensitivity"), boot)


# --------------------------------------------------------------------------- wins


@dataclass
class WinsUncertainty:
    """How stable a wins table is under resampling.

    ``share`` (methods x columns): the fraction of resamples in which the
    method wins the column; ``wins_lo`` / ``wins_hi``: the interval of its
    "# Wins" count; ``wins_mean``: the mean count over resamples.
    """

    share: pd.DataFrame
    wins_lo: pd.Series
    wins_hi: pd.Series
    wins_mean: pd.Series


def wins_uncertainty(
    table: pd.DataFrame,
    draws: Mapping[Any, Mapping[str, np.ndarray]],
    group: Sequence[str],
    boot: Bootstrap,
    min_competitors: int = 2,
) -> WinsUncertainty | None:
    """Resampled "# Wins" of :func:`shared.metrics.wins_table` on ``table`` (a pair or integrated table).

    ``draws`` are the resampled metric values of ``table``'s rows
    (:func:`pair_draws` / :func:`integrated_draws`).  A column takes part in
    a resample only where its point value does (same competitors); a value
    without draws makes the whole table's uncertainty undefined (None).
    """
    from shared.metrics import wins_records

    records = wins_records(table, group)
    if not records:
        return None
    columns = list(dict.fromkeys(rec.column for rec in records))
    methods = list(dict.fromkeys(group))
    n_boot = boot.n_boot
    values = np.full((len(methods), len(columns), n_boot), np.nan)
    for rec in records:
        if math.isnan(rec.value):
            continue
        d = draws.get(rec.row, {}).get(rec.metric)
        if d is None:
            return None
        values[methods.index(rec.method), columns.index(rec.column)] = d
    valid = ~np.isnan(values)
    competing = valid.sum(axis=0) >= max(1, min_competitors)  # [columns, n_boot]
    filled = np.where(valid, values, np.inf)
    best = filled.min(axis=0)
    is_best = valid & (filled == best[None])
    unique = is_best.sum(axis=0) == 1
    wins = is_best & (unique & competing)[None]  # [methods, columns, n_boot]
    share = pd.DataFrame(wins.mean(axis=2), index=pd.Index(methods, name="method"), columns=columns)
    counts = wins.sum(axis=1)  # [methods, n_boot]
    tail = (1.0 - boot.confidence) / 2.0 * 100.0
    lo, hi = np.percentile(counts, [tail, 100.0 - tail], axis=1)
    return WinsUncertainty(
        share=share,
        wins_lo=pd.Series(lo, index=methods),
        wins_hi=pd.Series(hi, index=methods),
        wins_mean=pd.Series(counts.mean(axis=1), index=methods),
    )


__all__ = [
    "Bootstrap",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "ItemRecord",
    "WinsUncertainty",
    "bootstrap_criteria",
    "integrated_draws",
    "integrated_order_draws",
    "integrated_orders_with_intervals",
    "integrated_with_intervals",
    "order_draws",
    "orders_with_intervals",
    "pair_draws",
    "pairs_with_intervals",
    "check_results_match_items",
    "read_item_records",
    "resample_indices",
    "validate_item_records",
    "results_with_intervals",
    "wins_uncertainty",
    "write_item_records",
]

"""Per-item scores of a criterion: what the bootstrap resamples.

An evaluator's criterion is an aggregate over items -- edit records, questions,
documents.  To put an interval on it (and on every composability figure built
from it) the items must be kept: :class:`ItemScores` holds them and recomputes
the criterion from any resample of them.

The criterion is, in general, ``transform(mean over strata s of
sum(values[s]) / sum(weights[s]))``:

* edit F1 and multiple-choice accuracy: one stratum, unit weights -> the mean;
* perplexity: values are per-document summed negative log-likelihoods, weights
  their token counts, ``transform="exp"`` -> the token-weighted perplexity;
* several lm-eval tasks averaged (WMDP bio + cyber): one stratum per task, so
  the task means are averaged as the evaluator did, and a resample keeps the
  number of questions of each task (stratified bootstrap).

No torch here: the aggregator, the CLI and the tests import it freely.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

TRANSFORMS = ("identity", "exp")


@dataclass(frozen=True)
class ItemScores:
    """The per-item scores of one criterion of one evaluation."""

    values: tuple[float, ...]
    weights: tuple[float, ...] | None = None  # None: every item weighs 1
    strata: tuple[int, ...] | None = None  # None: one stratum
    transform: Literal["identity", "exp"] = "identity"

    def __post_init__(self) -> None:
        n = len(self.values)
        if n == 0:
            raise ValueError("ItemScores needs at least one item")
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"weights has {len(self.weights)} entries for {n} values")
        if self.strata is not None and len(self.strata) != n:
            raise ValueError(f"strata has {len(self.strata)} entries for {n} values")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS} (got {self.transform!r})")

    @classmethod
    def of(cls, values: Sequence[float], weights: Sequence[float] | None = None,
           strata: Sequence[int] | None = None, transform: str = "identity") -> "ItemScores":
        """Build from any sequences (lists, arrays); floats and ints are normalized."""
        return cls(
            tuple(float(v) for v in values),
            None if weights is None else tuple(float(w) for w in weights),
            None if strata is None else tuple(int(s) for s in strata),
            transform,  # type: ignore[arg-type]
        )

    def __len__(self) -> int:
        return len(self.values)

    def value(self) -> float:
        """The criterion computed from all items (what the evaluator reported)."""
        return float(self.resampled(np.arange(len(self))[None, :])[0])

    def stratum_indices(self) -> list[np.ndarray]:
        """Item indices of each stratum, in stratum order."""
        if self.strata is None:
            return [np.arange(len(self))]
        strata = np.asarray(self.strata)
        return [np.flatnonzero(strata == s) for s in sorted(set(self.strata))]

    def resampled(self, index: np.ndarray) -> np.ndarray:
        """The criterion on each row of ``index`` (shape ``[B, n]``: item indices of B resamples).

        A row must keep every stratum's size and draw a stratum's positions
        from that stratum (:func:`shared.uncertainty.resample_indices` does);
        the statistic is then the mean of the strata's ratio estimates.
        """
        index = np.asarray(index)
        values = np.asarray(self.values, dtype=float)
        weights = np.ones_like(values) if self.weights is None else np.asarray(self.weights, dtype=float)
        parts = []
        for positions in self.stratum_indices():
            drawn = index[:, positions]
            with np.errstate(invalid="ignore", divide="ignore"):
                parts.append(values[drawn].sum(axis=1) / weights[drawn].sum(axis=1))
        stat = np.mean(parts, axis=0)
        return np.exp(stat) if self.transform == "exp" else stat

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"values": list(self.values)}
        if self.weights is not None:
            out["weights"] = list(self.weights)
        if self.strata is not None:
            out["strata"] = list(self.strata)
        if self.transform != "identity":
            out["transform"] = self.transform
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ItemScores":
        return cls.of(obj["values"], obj.get("weights"), obj.get("strata"), obj.get("transform", "identity"))


def items_to_json(items: Mapping[str, ItemScores]) -> dict[str, Any]:
    """``{criterion: ItemScores}`` as stored beside an evaluation result."""
    return {name: scores.to_json() for name, scores in items.items()}


def items_from_json(obj: Mapping[str, Any] | None) -> dict[str, ItemScores]:
    return {name: ItemScores.from_json(v) for name, v in (obj or {}).items()}


def check_consistent(criteria: Mapping[str, float], items: Mapping[str, ItemScores], rel: float = 1e-6) -> None:
    """Raise if an item list does not reproduce the criterion it belongs to (a bookkeeping bug)."""
    for name, scores in items.items():
        if name not in criteria:
            raise ValueError(f"per-item scores for {name!r}, which the evaluator did not report")
        expected, got = float(criteria[name]), scores.value()
        if not math.isclose(expected, got, rel_tol=rel, abs_tol=1e-9):
            raise ValueError(f"per-item scores of {name!r} give {got!r}, the evaluator reported {expected!r}")


def check_finite_scores(evaluator: str, criteria: Mapping[str, float], items: Mapping[str, ItemScores],
                        model_key: str = "") -> None:
    """Raise (one line naming the evaluator and the criterion) if a criterion or a per-item score is NaN or inf.

    Such a score is never a measurement (a NaN model's accuracy is whatever
    argmax makes of NaN logits); storing it would put it into every report.
    """
    on = f" on {model_key}" if model_key else ""
    for name, value in criteria.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"{evaluator}: criterion {name!r} is {float(value)!r}{on}, not a finite score; "
                             "nothing stored")
    for name, scores in items.items():
        for what, seq in (("values", scores.values), ("weights", scores.weights or ())):
            bad = next((i for i, v in enumerate(seq) if not math.isfinite(v)), None)
            if bad is not None:
                raise ValueError(f"{evaluator}: criterion {name!r}: per-item {what}[{bad}] is {seq[bad]!r}{on}, "
                                 "not a finite score; nothing stored")


class Scores(dict):
    """An evaluator's ``{criterion: value}`` with the per-item scores attached (``.items_by_criterion``).

    A plain dict to every caller that only wants the values; the evaluation
    task stores ``items_by_criterion`` beside them for the bootstrap.
    """

    def __init__(self, criteria: Mapping[str, float], items: Mapping[str, ItemScores] | None = None) -> None:
        super().__init__({k: float(v) for k, v in criteria.items()})
        self.items_by_criterion: dict[str, ItemScores] = dict(items or {})

    @classmethod
    def from_items(cls, items: Mapping[str, ItemScores], extra: Mapping[str, float] | None = None) -> "Scores":
        """Criteria computed from their items (so the two can never disagree), plus ``extra`` plain values."""
        return cls({**{k: v.value() for k, v in items.items()}, **(extra or {})}, items)


def item_scores_of(result: Any) -> dict[str, ItemScores]:
    """The per-item scores an evaluator returned (empty for a plain dict)."""
    return dict(getattr(result, "items_by_criterion", {}) or {})


__all__ = ["ItemScores", "Scores", "check_consistent", "check_finite_scores", "item_scores_of", "items_from_json",
           "items_to_json"]

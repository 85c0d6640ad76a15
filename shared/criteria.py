"""The evaluation criteria (columns of the results table) and their directions.

Composability metrics need every criterion as "higher is better" on [0, 1]:
a lower-is-better criterion such as forget-set (WMDP-style) accuracy is mapped
to ``1 - value`` first.  Unbounded criteria (perplexity) and measurements of the
compression itself (sparsity, average bits) are reported and plotted but get
no order-free error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Criterion:
    name: str
    label: str
    higher_is_better: bool
    bounded: bool  # value lies in [0, 1]; composability metrics apply
    evaluator: str  # the evaluator that produces it


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("edit_success", "Edit success", True, True, "edit"),
        Criterion("edit_generalization", "Edit generalization", True, True, "edit"),
        Criterion("edit_locality", "Edit locality", True, True, "edit"),
        Criterion("utility_acc", "Utility accuracy (MMLU-style)", True, True, "utility"),
        Criterion("forget_acc", "Forget-set accuracy (WMDP-style)", False, True, "forget"),
        Criterion("perplexity", "Perplexity", False, False, "perplexity"),
        Criterion("sparsity", "Sparsity", True, False, "compression"),
        Criterion("avg_bits", "Average bits per weight", False, False, "compression"),
    )
}

#: criteria that get order-free error / order sensitivity
COMPOSABILITY_CRITERIA: tuple[str, ...] = tuple(c.name for c in CRITERIA.values() if c.bounded)


def higher_is_better_value(name: str, value: float) -> float:
    """Map a bounded criterion so that higher is better (``1 - v`` for lower-is-better ones)."""
    crit = CRITERIA[name]
    if not crit.bounded:
        raise ValueError(f"criterion {name!r} is unbounded; composability metrics do not apply")
    return value if crit.higher_is_better else 1.0 - value

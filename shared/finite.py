"""Non-finite values: which tensors of a model hold NaN or inf, which numbers of a spec are not sensible.

A step that turns weights into NaN (a learning rate, a weight decay or a loss
weight far too large) must never be committed as a result, and a NaN model
must never be scored: its "accuracy" is whatever argmax makes of NaN logits.
:func:`check_finite_tensors` is the guard every checkpoint commit and every
evaluation load goes through -- one ``torch.aminmax`` per floating tensor
(NaN and inf propagate to the min or max; no temporary copy of the tensor):
about 0.15 s per 135M values on this 2-core CPU, 20 times less than
``isfinite(t).all()`` (the first pass over a freshly loaded model also pages
its weights in, which its first forward pass would do anyway).

:func:`spec_number_problems` walks the raw tree of an experiment spec for
``inf``/``nan`` and absurd magnitudes (YAML's ``.inf`` is a number: it passed
validation and crashed the compiled pipeline's protobuf serialization).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: elements checked at a time (bounds the temporary boolean tensor)
_CHUNK = 1 << 24
#: the largest magnitude of any number in an experiment spec: above every sensible setting (the paper's
#: largest, MEMIT's 25.6M statistics tokens, is far below), small enough that no int64 field overflows
MAX_SPEC_MAGNITUDE = 1e15


class NonFiniteError(ValueError):
    """Tensors (weights, a cached statistic) or scores that are NaN or infinite; the message is one line."""


@dataclass(frozen=True)
class BadTensor:
    """One tensor with non-finite values: its name, how many are NaN, how many infinite, of how many."""

    name: str
    nan: int
    inf: int
    numel: int

    def describe(self) -> str:
        kinds = [f"{n} {what}" for n, what in ((self.nan, "nan"), (self.inf, "inf")) if n]
        return f"{self.name} ({', '.join(kinds)} of {self.numel} values)"


def model_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """A model's parameters and buffers by name (tied weights once)."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def _items(tensors: Any) -> Iterable[tuple[str, Any]]:
    if hasattr(tensors, "named_parameters"):
        return model_tensors(tensors)
    if isinstance(tensors, Mapping):
        return tensors.items()
    return tensors


def _all_finite(t: Any) -> bool:
    """One pass, no temporary of the tensor's size: min and max propagate NaN and are infinite if any value is.

    (``isfinite(t).all()`` takes ~20x longer on a CPU: 2.5 s against 0.15 s for 135M values.)
    """
    import torch

    t = t.detach()
    if not t.is_complex():
        try:
            lo, hi = torch.aminmax(t)
            return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
        except (RuntimeError, NotImplementedError):  # a dtype aminmax does not take (e.g. float8)
            pass
    return all(bool(torch.isfinite(chunk).all()) for chunk in t.reshape(-1).split(_CHUNK))


def nonfinite_tensors(tensors: Any) -> list[BadTensor]:
    """Every floating tensor of ``tensors`` (a model, a ``{name: tensor}`` mapping or ``(name, tensor)`` pairs) holding NaN or inf."""
    import torch

    bad = []
    for name, t in _items(tensors):
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        if t.device.type == "meta" or t.numel() == 0 or _all_finite(t):
            continue
        flat = t.detach().reshape(-1)
        nan = sum(int(torch.isnan(c).sum()) for c in flat.split(_CHUNK))
        inf = sum(int(torch.isinf(c).sum()) for c in flat.split(_CHUNK))
        bad.append(BadTensor(name, nan, inf, t.numel()))
    return bad


def describe_bad(bad: list[BadTensor], shown: int = 2) -> str:
    """``a (3 nan of 4096 values), b (...) and 5 more tensors`` -- the first ``shown`` in full."""
    text = ", ".join(b.describe() for b in bad[:shown])
    if len(bad) > shown:
        text += f" and {len(bad) - shown} more tensor(s)"
    return text


def check_finite_tensors(tensors: Any, what: str, consequence: str = "") -> None:
    """Raise :class:`NonFiniteError` (one line: ``what``, the first bad tensors, ``consequence``) if any value is NaN or inf."""
    bad = nonfinite_tensors(tensors)
    if bad:
        tail = f"; {consequence}" if consequence else ""
        raise NonFiniteError(f"{what}: {len(bad)} tensor(s) hold nan/inf: {describe_bad(bad)}{tail}")


def is_finite_number(value: Any) -> bool:
    """True for a real number that is neither NaN nor infinite (bools and ints are finite)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def _walk(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    from pydantic import BaseModel

    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]")
    elif isinstance(obj, BaseModel):  # a validated section (the cluster block): its fields
        for key in type(obj).model_fields:
            yield from _walk(getattr(obj, key), f"{path}.{key}" if path else key)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def spec_number_problems(obj: Any, path: str = "", limit: float = MAX_SPEC_MAGNITUDE) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(non_finite, too_large)``: ``(field path, message)`` for every number of a spec tree that is NaN/inf, or above ``limit`` in magnitude.

    Paths are written the way spec errors name fields: ``interventions[0].params.alpha``.
    """
    non_finite, too_large = [], []
    for where, value in _walk(obj, path):
        if isinstance(value, float) and not math.isfinite(value):
            non_finite.append((where, f"{value!r} is not a finite number (inf and nan are never valid settings)"))
        elif abs(value) > limit:
            too_large.append((where, f"{value!r} is out of range: a number in a spec must be at most {limit:.0e} "
                                     "in magnitude"))
    return non_finite, too_large


__all__ = [
    "MAX_SPEC_MAGNITUDE",
    "BadTensor",
    "NonFiniteError",
    "check_finite_tensors",
    "describe_bad",
    "is_finite_number",
    "model_tensors",
    "nonfinite_tensors",
    "spec_number_problems",
]

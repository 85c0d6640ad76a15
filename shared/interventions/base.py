"""The intervention interface.

An intervention is one post-training operation (an edit, an unlearning step,
a compression) with a typed parameter model.  Each method lives in its own
module in this package and registers itself with :func:`register`; nothing
else in the project needs to change to add one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from shared.data import ExperimentData


class Category(str, Enum):
    """The three families of interventions studied in the paper."""

    EDIT = "edit"
    UNLEARN = "unlearn"
    COMPRESS = "compress"


#: bounds of a seed parameter: any 63-bit integer (torch seeds are 64-bit; some methods use ``seed + 1``)
SEED_MIN, SEED_MAX = -(2**62), 2**62
#: the largest decoder-layer index a parameter may name (the model's own count is checked when it is known)
MAX_LAYER = 9999


def layer_indices(v: list[int]) -> list[int]:
    """Validate a list of decoder-layer indices (distinct, >= 0) and return it sorted.

    Shared by every method with a ``layers`` parameter; whether an index
    exists is checked against the model when the method is applied.
    """
    if any(i < 0 for i in v):
        raise ValueError("layer indices must be >= 0")
    if any(i > MAX_LAYER for i in v):
        raise ValueError(f"layer indices must be <= {MAX_LAYER}")
    if len(set(v)) != len(v):
        raise ValueError("layer indices must be distinct")
    return sorted(v)


class InterventionParams(BaseModel):
    """Base class of every method's parameter model: strict, immutable, no unknown fields.

    Every number must be finite (``inf``/``nan`` are refused, naming the field)
    and every numeric field has an upper bound: a parameter bounded only from
    below once accepted ``inf`` or ``1e308`` and produced NaN weights.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Intervention(ABC):
    """One intervention method.

    Class attributes describe the method to the planner and the spec validator:

    * ``name`` -- the identifier used in experiment specs (``ft``, ``wanda``...).
    * ``category`` -- edit / unlearn / compress.
    * ``params_model`` -- pydantic model of its hyperparameters (defaults = the
      recommended setting for the built-in model).
    * ``sweep_axis`` -- the parameter that expresses its strength (the sweep
      axis of composability plots), e.g. ``sparsity`` for Wanda.
    * ``needs_calibration`` -- whether it reads calibration text.
    * ``version`` -- bump it when the method's behaviour changes: it is part of
      checkpoint keys, so results of the old code are not reused.
    * ``data_inputs`` -- which fields of :class:`shared.data.ExperimentData` it
      reads; their content digests become part of the checkpoint key, so a
      different edit batch or corpus can never be mistaken for a cached result.
    """

    name: ClassVar[str]
    category: ClassVar[Category]
    params_model: ClassVar[type[InterventionParams]]
    version: ClassVar[str] = "1"
    sweep_axis: ClassVar[str | None] = None
    needs_calibration: ClassVar[bool] = False
    data_inputs: ClassVar[tuple[str, ...]] = ()
    #: whether :meth:`apply` takes the parent checkpoint's compression state (``state=``)
    reads_compression_state: ClassVar[bool] = False
    #: whether :meth:`apply` takes ``cache=``: a store-backed tensor cache keyed by the model's content
    uses_tensor_cache: ClassVar[bool] = False
    #: whether :meth:`apply` takes ``lineage=``: the state an earlier step of the same method left along this
    #: model's lineage (:mod:`shared.lineage_state`; AlphaEdit's protected keys), and returns its own as
    #: ``record["lineage_state"]``
    uses_lineage_state: ClassVar[bool] = False

    def parse_params(self, raw: dict[str, Any] | None) -> InterventionParams:
        """Validate raw parameters (raises pydantic.ValidationError naming the field)."""
        return self.params_model.model_validate(raw or {})

    def check_model(self, params: Any, input_widths: set[int]) -> None:
        """Reject parameters that cannot work on a model whose block Linear layers have these input widths.

        Called when a spec is validated (if the model's shapes are known without
        loading it) and again by :meth:`apply` before any calibration, so e.g. an
        impossible quantization group size fails at once with a clear error.
        """

    def check_layers(self, params: Any, num_layers: int) -> None:
        """Reject layer indices the model does not have (``layers`` lists and a single ``layer``).

        Called when a spec is validated, so e.g. FT's default layers on a
        4-layer model fail before any task starts, naming the field.
        """
        for name in ("layers", "layer"):
            value = getattr(params, name, None)
            if value is None:
                continue
            indices = value if isinstance(value, list) else [value]
            bad = [i for i in indices if not 0 <= int(i) < num_layers]
            if bad:
                raise ValueError(
                    f"{name}: {self.name} {name} {value} out of range: the model has {num_layers} layers "
                    f"(0..{num_layers - 1})"
                )

    @abstractmethod
    def apply(self, model: Any, tokenizer: Any, params: Any, data: "ExperimentData") -> dict[str, Any]:
        """Apply the intervention to ``model`` in place.

        Returns a JSON-serializable record of what was done that later steps
        and evaluators may need (e.g. ``{"compression": {...}}`` with the
        method, its parameters and the resulting state).  The model handed
        back must be dense float weights (compressed models stay dense in
        memory so later steps can act on them).
        """

"""GD -- gradient difference: gradient ascent on the forget corpus plus a weighted retain loss.

Each step ascends the forget documents' LM loss and descends the retain
documents' loss, weighted by ``retain_weight``.  The paper found a large
retain weight essential (40 in its appendix, 400 in its text) to keep general
ability while the forget domain is unlearned.  Layers, batches and the rest
are as for :mod:`shared.interventions.ga`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from shared.interventions import register
from shared.interventions.base import Category, Intervention
from shared.interventions.ga import GAParams, gradient_unlearning


class GDParams(GAParams):
    """Hyperparameters of gradient difference (defaults: built-in SmolLM2-135M)."""

    retain_weight: float = Field(40.0, gt=0, le=1e6, description="weight of the retain-corpus LM loss")


@register
class GradientDifference(Intervention):
    """Unlearn the forget domain by gradient ascent on it and descent on the retain corpus."""

    name = "gd"
    category = Category.UNLEARN
    params_model = GDParams
    sweep_axis = "steps"
    data_inputs = ("forget_corpus", "retain_corpus")

    def apply(self, model: Any, tokenizer: Any, params: GDParams, data: Any) -> dict[str, Any]:
        return gradient_unlearning(self.name, model, tokenizer, params, data, retain_weight=params.retain_weight)

"""GD -- gradient difference: gradient ascent on the forget corpus plus a weighted retain loss.

Each step ascends the forget documents' LM loss and descends the retain
documents' loss, weighted by ``retain_weight``.  The paper found a large
retain weight essential (40 in its appendix, 400 in its text) to keep general
ability while the forget domain is unlearned.  Layers, batches and the rest
are as for :mod:`shared.interventions.ga`.

Measured on the built-in SmolLM2-135M (float32; base forget accuracy 0.727,
utility 0.767, held-out perplexity 29.6; upper 15 layers + final norm,
batches of 4 x 256 tokens; the tuning rows before gradient accumulation
existed, one batch per step):

* with the paper's large retain weight (40) and lr 1e-5 / 3e-5 the retain
  term wins and nothing is forgotten (forget 0.727 / 0.742);
* weight 1, lr 1e-4, plain ascent: 12 steps -> forget 0.578, perplexity 41;
  18 steps -> 0.453, utility 0.714, perplexity 137; 30 steps -> 0.195 but
  perplexity ~10900 (the forget loss runs away from 3.0 to 65 and general
  language modelling goes with it);
* the default adds a per-token cap on the ascended loss (6 nats, against
  3.0 at the start; ``forget_loss_cap``): a forget token pushed past the cap
  stops pushing, so the ascent saturates while the retain term keeps
  repairing -- 30 steps: forget 0.523, utility 0.789, perplexity 46.4
  without accumulation; with the default ``grad_accum`` 2 (60 batches of
  each corpus): forget 0.477, utility 0.782, perplexity 43.3.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from shared.interventions import register
from shared.interventions.base import Category, Intervention
from shared.interventions.ga import GAParams, gradient_unlearning


class GDParams(GAParams):
    """Hyperparameters of gradient difference (defaults: built-in SmolLM2-135M)."""

    lr: float = Field(1e-4, gt=0, le=1.0, description="Adam learning rate (the paper: 5e-5)")
    steps: int = Field(30, ge=1, le=100_000, description="optimizer steps (grad_accum forget and retain batches each)")
    retain_weight: float = Field(
        1.0, gt=0, le=1e6, description="weight of the retain-corpus LM loss (the paper: 40-400 on Llama-3-8B)"
    )
    forget_loss_cap: float | None = Field(
        6.0,
        gt=0,
        le=1000,
        description="clamp each forget token's loss at this many nats before ascending it (null: the "
        "paper's uncapped ascent, which destroys perplexity on the built-in model)",
    )


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

"""GA -- unlearning by gradient ascent on the forget corpus.

The simplest unlearner of the paper: maximize the language-modeling loss of
the forget documents, training only the upper half of the decoder layers
(the paper: layers 16-31 of Llama-3-8B's 32, plus the final norm and the LM
head).  Gradient ascent has no term that holds the rest of the model in
place, so it is known to damage general ability together with the forget
domain; :mod:`shared.interventions.gd` adds a retain loss for that reason.

Measured on the built-in SmolLM2-135M (float32; base forget accuracy 0.727,
utility 0.767, chance 0.25; upper 15 layers + final norm, 20 batches of 4
documents x 256 tokens, measured before gradient accumulation existed):
lr 1e-5 -> forget 0.703, utility 0.744; lr 3e-5 -> forget 0.570, utility
0.714.  The default (lr 3e-5, 20 steps, ``grad_accum`` 2, i.e. 40 batches):
forget 0.539, utility 0.699, held-out perplexity 71.7 (base 29.6) -- the
forget domain drops 19 points and general ability 7 with it, the known
weakness of plain gradient ascent.

As in the reference, gradients of ``grad_accum`` = 2 batches are accumulated
into each optimizer step (effective batch 8 documents).

Differences from the reference code, on purpose:

* padding is masked out of the loss (the reference maximized the loss on pad
  tokens too);
* the LM head is not trained by default: SmolLM2 ties it to the input
  embeddings, so training it would change every token's embedding
  (``train_final_norm`` keeps the final norm trainable, as in the paper).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, field_validator

from shared.interventions import register
from shared.interventions._unlearning import forget_training, lm_loss
from shared.interventions.base import SEED_MAX, SEED_MIN, Category, Intervention, InterventionParams, layer_indices

log = logging.getLogger(__name__)


class ForgetTrainingParams(InterventionParams):
    """What every loss-based unlearner here shares: trained layers, optimizer steps, document batches."""

    layers: list[int] | None = Field(
        None, description="decoder layers to train (0-based); null = the upper half, as in the paper"
    )
    train_final_norm: bool = Field(True, description="also train the final RMSNorm (the paper did)")
    lr: float = Field(3e-5, gt=0, le=1.0, description="Adam learning rate (the paper: 5e-5)")
    steps: int = Field(20, ge=1, le=100_000, description="optimizer steps (grad_accum forget batches each)")
    batch_size: int = Field(4, ge=1, le=1024, description="forget documents per batch")
    grad_accum: int = Field(
        2, ge=1, le=1024,
        description="batches whose gradients are accumulated into one optimizer step (the reference: 2); "
        "each step sees batch_size x grad_accum documents",
    )
    seq_len: int = Field(256, ge=8, le=32_768, description="tokens per document (longer ones are truncated)")
    seed: int = Field(0, ge=SEED_MIN, le=SEED_MAX, description="seed of the document order")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("layers must name at least one layer (or be null for the upper half)")
        return layer_indices(v)


class GAParams(ForgetTrainingParams):
    """Hyperparameters of gradient-ascent unlearning (defaults: built-in SmolLM2-135M)."""

    forget_loss_cap: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="clamp each forget token's loss at this many nats before ascending it (null: no cap, "
        "the paper's plain ascent); a capped token stops pushing, so ascent cannot run away",
    )


def gradient_unlearning(
    method: str, model: Any, tokenizer: Any, params: GAParams, data: Any, retain_weight: float = 0.0
) -> dict[str, Any]:
    """Ascend the forget loss (and, with ``retain_weight`` > 0, descend the retain loss) on the chosen layers.

    Loss per step: ``-NLL(forget batch) + retain_weight * NLL(retain batch)``,
    averaged over ``grad_accum`` batches whose gradients are accumulated.
    Returns the record: losses before and after on the first batches, what was trained.
    """
    record = forget_training(
        method, model, tokenizer, params, data,
        forget_loss=lambda _i, batch: -lm_loss(model, batch, cap=params.forget_loss_cap),
        retain_weight=retain_weight,
    )
    u = record["unlearn"]
    log.info("%s: forget loss %.3f -> %.3f in %.1fs", method, u["forget_loss_before"], u["forget_loss_after"], record["seconds"])
    return record


@register
class GradientAscent(Intervention):
    """Unlearn the forget domain by maximizing the LM loss of the forget corpus."""

    name = "ga"
    category = Category.UNLEARN
    params_model = GAParams
    sweep_axis = "steps"
    data_inputs = ("forget_corpus",)

    def apply(self, model: Any, tokenizer: Any, params: GAParams, data: Any) -> dict[str, Any]:
        return gradient_unlearning(self.name, model, tokenizer, params, data)

"""NPO and SimNPO -- unlearning with preference-style losses on the forget set.

Gradient ascent pushes the forget documents' likelihood down without limit,
which is why it collapses the model (:mod:`shared.interventions.ga`).  The
two methods here treat every forget document as a *rejected* response of a
preference pair with no preferred one, which bounds the push:

* **NPO** (Zhang et al., 2024, "Negative Preference Optimization"):
  ``L_f = -(2/beta) * mean log sigmoid(-beta * log(pi(y|x) / pi_ref(y|x)))``
  against the frozen starting model ``pi_ref``.  Its gradient is GA's
  gradient weighted by ``2 pi^beta / (pi^beta + pi_ref^beta)``, which goes to
  zero once a document is unlikely enough -- divergence becomes slow
  (logarithmic instead of linear).
* **SimNPO** (Fan et al., 2024, "Simplicity Prevails"): no reference model;
  the likelihood is length-normalized and shifted by a margin ``gamma``:
  ``L_f = -(2/beta) * mean log sigmoid(-(beta/|y|) log pi(y|x) - gamma)``,
  so short and long documents are unlearned alike.

Both add, as in the papers' "+RT" variants used on WMDP and TOFU, the retain
corpus's LM loss with weight ``retain_weight``.  Batches, trained layers (the
upper half of the decoder plus the final norm, like GA) and gradient
accumulation are GA's.

``pi_ref(y|x)`` of NPO is computed once per forget batch before training
starts, from the model as it comes in -- the same numbers as the papers'
frozen copy of the model, without keeping a second copy in memory.

Defaults: the papers' settings (NPO beta 0.1, SimNPO beta 2.5 and gamma 0,
retain weight 1) with GD's batches and a learning rate of 1e-4 for the
built-in model's upper half; they are not yet tuned on the built-in model
(docs/unlearning.md says what is measured).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from pydantic import Field

from shared.interventions import register
from shared.interventions._unlearning import check_layers, layer_parameters, lm_loss, only_trainable, sequence_nll, text_batches, upper_half
from shared.interventions.base import Category, Intervention
from shared.interventions.ga import ForgetTrainingParams

log = logging.getLogger(__name__)


class NPOParams(ForgetTrainingParams):
    """Hyperparameters of NPO (+ retain loss); the paper's beta, learning rate and steps like GD's (not yet tuned)."""

    lr: float = Field(1e-4, gt=0, le=1.0, description="Adam learning rate (the paper: 1e-5 on 7B models)")
    steps: int = Field(20, ge=1, le=100_000, description="optimizer steps (grad_accum forget and retain batches each)")
    beta: float = Field(0.1, gt=0, le=100, description="inverse temperature of the preference loss (the paper: 0.1)")
    retain_weight: float = Field(
        1.0, ge=0, le=1e6, description="weight of the retain-corpus LM loss (0 = NPO alone; the paper's NPO+RT: 1)"
    )


class SimNPOParams(NPOParams):
    """Hyperparameters of SimNPO (+ retain loss); the paper's beta and gamma (not yet tuned on the built-in model)."""

    beta: float = Field(2.5, gt=0, le=100, description="inverse temperature of the length-normalized loss (the paper: 2.5)")
    gamma: float = Field(0.0, ge=0, le=100, description="reward margin (the paper: 0 on TOFU and WMDP)")


def npo_forget_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: ``-(2/beta) log sigmoid(-beta (log pi - log pi_ref))``, averaged over documents (``nll`` = ``-log pi``)."""
    return -(2.0 / beta) * torch.nn.functional.logsigmoid(beta * (nll - ref_nll)).mean()


def simnpo_forget_loss(nll: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO: ``-(2/beta) log sigmoid(-(beta/|y|) log pi - gamma)``, averaged over documents."""
    return -(2.0 / beta) * torch.nn.functional.logsigmoid(beta * nll / lengths.clamp(min=1) - gamma).mean()


def preference_unlearning(method: str, model: Any, tokenizer: Any, params: NPOParams, data: Any) -> dict[str, Any]:
    """Descend the NPO or SimNPO forget loss plus ``retain_weight`` x the retain LM loss on the chosen layers."""
    layers = params.layers if params.layers is not None else upper_half(model)
    check_layers(model, layers, method)
    micro_batches = params.steps * params.grad_accum
    forget = text_batches(tokenizer, data.texts("forget_corpus"), params.batch_size, params.seq_len, micro_batches, params.seed)
    retain = (
        text_batches(tokenizer, data.texts("retain_corpus"), params.batch_size, params.seq_len, micro_batches, params.seed + 1)
        if params.retain_weight > 0
        else []
    )
    trained = layer_parameters(model, layers, params.train_final_norm)
    start = time.perf_counter()
    with only_trainable(model, trained):
        with torch.no_grad():
            # the reference model is the model as it comes in: its likelihoods, once per batch
            ref_nll = [sequence_nll(model, batch)[0] for batch in forget] if method == "npo" else []
            forget_before = float(lm_loss(model, forget[0]))
        optimizer = torch.optim.Adam(list(trained.values()), lr=params.lr)
        for step in range(params.steps):
            optimizer.zero_grad(set_to_none=True)
            for micro in range(step * params.grad_accum, (step + 1) * params.grad_accum):
                nll, lengths = sequence_nll(model, forget[micro])
                if method == "npo":
                    loss = npo_forget_loss(nll, ref_nll[micro], params.beta)
                else:
                    loss = simnpo_forget_loss(nll, lengths, params.beta, params.gamma)  # type: ignore[attr-defined]
                if retain:
                    loss = loss + params.retain_weight * lm_loss(model, retain[micro])
                (loss / params.grad_accum).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            forget_after = float(lm_loss(model, forget[0]))
    seconds = time.perf_counter() - start
    log.info("%s: forget loss %.3f -> %.3f in %.1fs", method, forget_before, forget_after, seconds)
    return {
        "unlearn": {
            "method": method,
            "layers": layers,
            "trained_parameters": int(sum(p.numel() for p in trained.values())),
            "forget_loss_before": round(forget_before, 4),
            "forget_loss_after": round(forget_after, 4),
        },
        "seconds": round(seconds, 2),
    }


@register
class NegativePreferenceOptimization(Intervention):
    """Unlearn the forget domain with NPO's bounded preference loss against the starting model (+ retain loss)."""

    name = "npo"
    category = Category.UNLEARN
    params_model = NPOParams
    sweep_axis = "steps"
    data_inputs = ("forget_corpus", "retain_corpus")

    def apply(self, model: Any, tokenizer: Any, params: NPOParams, data: Any) -> dict[str, Any]:
        return preference_unlearning(self.name, model, tokenizer, params, data)


@register
class SimpleNegativePreferenceOptimization(Intervention):
    """Unlearn the forget domain with SimNPO's length-normalized, reference-free preference loss (+ retain loss)."""

    name = "simnpo"
    category = Category.UNLEARN
    params_model = SimNPOParams
    sweep_axis = "steps"
    data_inputs = ("forget_corpus", "retain_corpus")

    def apply(self, model: Any, tokenizer: Any, params: SimNPOParams, data: Any) -> dict[str, Any]:
        return preference_unlearning(self.name, model, tokenizer, params, data)

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

Defaults, tuned on the built-in SmolLM2-135M (``benchmarks/interventions.py
--suite unlearn``; base: forget 0.727, utility 0.767, perplexity 29.6; GD's
batches, 20 steps x 2, retain weight 1):

===============================  ======  =======  ==========
setting                          forget  utility  perplexity
===============================  ======  =======  ==========
NPO beta 0.1, lr 1e-4            0.531   0.684    59.0
**NPO beta 0.1, lr 5e-5**        0.617   0.714    46.5
SimNPO beta 2.5 (paper), lr 1e-4 0.719   0.820    23.6
SimNPO beta 1.0, lr 1e-4         0.711   0.812    24.7
**SimNPO beta 0.3, lr 1e-4**     0.570   0.774    52.4
===============================  ======  =======  ==========

NPO keeps the paper's beta; at lr 1e-4 it costs 8 utility points, at 5e-5
it forgets 11 points for 5.  SimNPO's loss is the *mean* token NLL (about 3
nats on these documents) times beta: at the paper's 2.5 (tuned on TOFU's
short answers) ``sigmoid(-7.5)`` leaves the forget term almost no gradient, so
only the retain term trains -- utility and perplexity improve, nothing is
forgotten.  beta 0.3 puts the sigmoid back in its working range: 16 points
forgotten with utility accuracy unchanged -- but held-out perplexity rises
from 29.6 to 52.4, a language-modelling cost the accuracy does not show.  The
saturation comes from the high per-token NLL of text the model never
memorised, not from document length (the mean does not grow with length).
Note that NPO's forget loss is the *summed* sequence NLL (as in its reference
code) while the retain loss is a mean, so
the retain term weighs little in NPO and fully in SimNPO.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field

from shared.interventions import register
from shared.interventions._unlearning import forget_training, sequence_nll
from shared.interventions.base import Category, Intervention
from shared.interventions.ga import ForgetTrainingParams

log = logging.getLogger(__name__)


class NPOParams(ForgetTrainingParams):
    """Hyperparameters of NPO (+ retain loss); the paper's beta, learning rate tuned on the built-in model."""

    lr: float = Field(5e-5, gt=0, le=1.0, description="Adam learning rate (the paper: 1e-5 on 7B models)")
    steps: int = Field(20, ge=1, le=100_000, description="optimizer steps (grad_accum forget and retain batches each)")
    beta: float = Field(0.1, gt=0, le=100, description="inverse temperature of the preference loss (the paper: 0.1)")
    retain_weight: float = Field(
        1.0, ge=0, le=1e6, description="weight of the retain-corpus LM loss (0 = NPO alone; the paper's NPO+RT: 1)"
    )


class SimNPOParams(NPOParams):
    """Hyperparameters of SimNPO (+ retain loss); beta tuned on the built-in model, the paper's gamma."""

    lr: float = Field(1e-4, gt=0, le=1.0, description="Adam learning rate (the paper: 1e-5 on 7B models)")
    beta: float = Field(
        0.3, gt=0, le=100,
        description="inverse temperature of the length-normalized loss (the paper: 2.5 on TOFU, saturated here: the forget text's mean token NLL is ~3 nats)",
    )
    gamma: float = Field(0.0, ge=0, le=100, description="reward margin (the paper: 0 on TOFU and WMDP)")


def npo_forget_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: ``-(2/beta) log sigmoid(-beta (log pi - log pi_ref))``, averaged over documents (``nll`` = ``-log pi``)."""
    return -(2.0 / beta) * torch.nn.functional.logsigmoid(beta * (nll - ref_nll)).mean()


def simnpo_forget_loss(nll: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO: ``-(2/beta) log sigmoid(-(beta/|y|) log pi - gamma)``, averaged over documents."""
    return -(2.0 / beta) * torch.nn.functional.logsigmoid(beta * nll / lengths.clamp(min=1) - gamma).mean()


def preference_unlearning(method: str, model: Any, tokenizer: Any, params: NPOParams, data: Any) -> dict[str, Any]:
    """Descend the NPO or SimNPO forget loss plus ``retain_weight`` x the retain LM loss on the chosen layers."""
    ref_nll: list[torch.Tensor] = []

    def reference(forget: list[dict[str, torch.Tensor]]) -> None:
        # the reference model is the model as it comes in: its likelihoods, once per batch
        ref_nll.extend(sequence_nll(model, batch)[0] for batch in forget)

    def loss(i: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nll, lengths = sequence_nll(model, batch)
        if method == "npo":
            return npo_forget_loss(nll, ref_nll[i], params.beta)
        return simnpo_forget_loss(nll, lengths, params.beta, params.gamma)  # type: ignore[attr-defined]

    record = forget_training(method, model, tokenizer, params, data, forget_loss=loss,
                             retain_weight=params.retain_weight, prepare=reference if method == "npo" else None)
    u = record["unlearn"]
    log.info("%s: forget loss %.3f -> %.3f in %.1fs", method, u["forget_loss_before"], u["forget_loss_after"], record["seconds"])
    return record


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

"""LoRA -- knowledge editing with a low-rank adapter (plain LoRA or AdaLoRA, through ``peft``).

The paper's LoRA editor trains an AdaLoRA adapter (Zhang et al., 2023) on the
attention query and value projections of every layer -- Adam, lr 5e-3, 70
steps, ``lora_alpha`` 32 (here lr 1e-3 by default, see below) -- on the whole edit batch at once, and the loss on
the target tokens only.  ``variant="lora"`` trains a plain LoRA adapter
(Hu et al., 2021) instead.  After training the adapter is merged into the dense
weights (``merge_and_unload``): the model handed back is the very object that
was passed in, with the original modules and parameter names, so a later step
or ``save_pretrained`` sees an ordinary dense model.  Only the weights of the
adapted modules change.

Differences from the reference code, on purpose:

* the prompt and target text come from :mod:`shared.evaluation.edit` (through
  :func:`shared.interventions.ft.build_edit_batch`), exactly as for ``ft``: the
  model is trained on the token boundary greedy generation sees, and prompt
  and padding are masked out of the loss;
* the loss is computed from the logits here (:func:`~shared.interventions.ft.target_loss`,
  the masked cross-entropy over target tokens), not taken from the model's
  ``.loss``: peft's AdaLoRA adds its orthogonality penalty to ``.loss``, so the
  reported losses are the pure edit loss.  The penalty is *not* trained either
  (the reference version of peft did not add it; over 70 steps the singular
  vectors stay close to their random init and it has no measurable effect);
* AdaLoRA's rank allocator is actually run: ``total_step`` is set to ``steps``
  and ``update_and_allocate`` is called after every optimizer step, so the
  rank budget shrinks (cubic schedule) from ``r`` to ``target_r`` per matrix
  on average (the reference code never called it, which makes AdaLoRA a
  fixed-rank SVD-parameterised LoRA);
* the adapter is applied to explicitly named modules of the decoder layers
  (``model.layers.{i}.….{target}``), never to the embeddings or the LM head,
  and ``layers`` restricts it to some layers;
* training runs with the model in eval mode (no attention/hidden dropout of
  the base model); only the adapter's own dropout (``dropout``) is active.
  Everything is deterministic given ``seed``.

The defaults keep the paper's structure (AdaLoRA on q/v of every layer, alpha
32, 70 steps) with the learning rate scaled for the built-in SmolLM2-135M.
Measured on the 10 built-in edits (edit_seed 0; float32; base model: success
0.0, generalization 0.0, locality 0.4, utility accuracy 0.767, perplexity
29.57), r 12 -> target_r 8 unless noted:

==========================  =======  =====  =====  ========  =======  ==========
setting                     seconds  succ.  gen.   locality  utility  perplexity
==========================  =======  =====  =====  ========  =======  ==========
lr 5e-3, 70 steps (paper)   ~100     1.0    1.0    0.1       0.662*   43.8*
lr 5e-3, 30 steps           43       1.0    1.0    0.1       0.692    39.4
lr 5e-3, 20 steps           28       1.0    1.0    0.1       0.669    32.6
lr 2e-3, 40 steps           55       1.0    1.0    0.1       0.722    31.4
**lr 1e-3, 70 steps**       97       1.0    1.0    0.2       0.722    31.0
lr 1e-3, 50 steps           69       0.8    0.4    0.1       0.722    30.1
lr 5e-4, 70 steps           98       0.4    0.2    0.1       0.729    29.8
lr 1e-3, 70, r 4 -> 2       96       1.0    1.0    0.1       0.707    30.9
lr 1e-3, 70, layers 2-6     95       0.2    0.1    0.1       0.677    30.1
lr 2e-3, 70, layers 2-6     93       1.0    0.7    0.5       0.699    38.6
==========================  =======  =====  =====  ========  =======  ==========

(*from the editors x Wanda run, evaluated in bfloat16: base 0.759 / 29.60.)
lr 1e-3 with the paper's 70 steps is the smallest change that reaches every
edit and the best utility/perplexity among those that do; on a second batch
(edit_seed 1; base locality 0.24) it gave success 1.0, generalization 0.7,
locality 0.0, utility 0.662, perplexity 30.5.  Unlike FT and MEMIT, which
touch five MLP down-projections, LoRA changes attention in every layer, and on
this small model that costs 4-10 points of utility accuracy however the
learning rate and rank are set -- the bound the tests check is 8 points and
10 % perplexity on edit_seed 0.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from shared.interventions import register
from shared.interventions.base import SEED_MAX, SEED_MIN, Category, Intervention, InterventionParams, layer_indices
from shared.interventions.ft import build_edit_batch, target_loss

log = logging.getLogger(__name__)

__all__ = ["LoRAEdit", "LoRAParams", "adapted_module_names"]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LoRAParams(InterventionParams):
    """Hyperparameters of the LoRA / AdaLoRA editor (defaults: built-in SmolLM2-135M)."""

    variant: Literal["lora", "adalora"] = Field(
        "adalora", description="'adalora' (adaptive rank allocation, the paper's choice) or plain 'lora'"
    )
    r: int = Field(
        12,
        ge=1,
        le=1024,
        description="adapter rank; for AdaLoRA the initial rank (init_r) of every adapted matrix",
    )
    target_r: int = Field(
        8,
        ge=1,
        le=1024,
        description="AdaLoRA only: the average rank per matrix the allocator prunes down to (< r); "
        "ignored by plain LoRA",
    )
    alpha: float = Field(
        32.0, gt=0, le=1e4, description="lora_alpha: the update is scaled by alpha / r"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input (lora_dropout)")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="names of the Linear modules inside each decoder layer that get an adapter",
    )
    layers: list[int] | None = Field(
        None,
        description="decoder layers (0-based) to adapt; None adapts every layer",
    )
    steps: int = Field(70, ge=1, le=10_000, description="optimizer steps on the whole edit batch")
    lr: float = Field(
        1e-3, gt=0, le=1.0, description="Adam learning rate of the adapter (the paper: 5e-3 on Llama-3-8B)"
    )
    seed: int = Field(0, ge=SEED_MIN, le=SEED_MAX, description="torch seed (adapter init and dropout; training is deterministic given it)")

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _IDENTIFIER.match(name):
                raise ValueError(f"target module {name!r} must be a plain module name such as 'q_proj'")
        if len(set(v)) != len(v):
            raise ValueError("target modules must be distinct")
        return sorted(v)

    @field_validator("layers")
    @classmethod
    def _distinct_non_negative(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("layers must name at least one layer (or be null for all layers)")
        return layer_indices(v)

    @model_validator(mode="after")
    def _adalora_budget(self) -> "LoRAParams":
        if self.variant == "adalora" and self.target_r >= self.r:
            raise ValueError(
                f"target_r ({self.target_r}) must be smaller than r ({self.r}) for variant 'adalora': "
                "the allocator prunes the rank from r down to target_r"
            )
        return self


def adapted_module_names(model: Any, target_modules: list[str], layers: list[int] | None) -> list[str]:
    """Full names of the Linear modules that get an adapter (``model.layers.{i}.….{target}``).

    Raises ``ValueError`` naming the field if a layer index is out of range or a
    target module exists in none of the chosen layers.
    """
    blocks = model.model.layers
    chosen = list(range(len(blocks))) if layers is None else layers
    if chosen and chosen[-1] >= len(blocks):
        raise ValueError(f"lora layers {layers} out of range: the model has {len(blocks)} layers")
    names: list[str] = []
    found: set[str] = set()
    available: set[str] = set()
    for i in chosen:
        for sub, module in blocks[i].named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            leaf = sub.rsplit(".", 1)[-1]
            available.add(leaf)
            if leaf in target_modules:
                names.append(f"model.layers.{i}.{sub}")
                found.add(leaf)
    missing = sorted(set(target_modules) - found)
    if missing:
        raise ValueError(
            f"lora target_modules {missing} match no Linear layer of the decoder layers; "
            f"available: {', '.join(sorted(available))}"
        )
    return names


def _peft_config(params: LoRAParams, targets: list[str]) -> Any:
    from peft import AdaLoraConfig, LoraConfig

    common = {
        "target_modules": targets,
        "lora_alpha": params.alpha,
        "lora_dropout": params.dropout,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    if params.variant == "lora":
        return LoraConfig(r=params.r, **common)
    # tinit = tfinal = 0: the budget shrinks from the first step to the last
    # (the allocator needs tinit < total_step - tfinal, true for any steps >= 1)
    return AdaLoraConfig(init_r=params.r, target_r=params.target_r, total_step=params.steps, **common)


def _kept_rank(peft_model: Any) -> int | None:
    """AdaLoRA: the total rank left after allocation (the sum of unmasked singular values)."""
    pattern = peft_model.peft_config["default"].rank_pattern
    if not pattern:
        return None
    return int(sum(sum(bool(b) for b in mask) for mask in pattern.values()))


@register
class LoRAEdit(Intervention):
    """Edit facts by training a LoRA / AdaLoRA adapter on the edit batch, then merging it into the weights."""

    name = "lora"
    category = Category.EDIT
    params_model = LoRAParams
    sweep_axis = "steps"
    needs_calibration = False
    data_inputs = ("edits",)

    def apply(self, model: Any, tokenizer: Any, params: LoRAParams, data: Any) -> dict[str, Any]:
        from peft import get_peft_model

        edits = list(data.edits)
        if not edits:
            raise ValueError("lora needs at least one edit")
        targets = adapted_module_names(model, params.target_modules, params.layers)

        torch.manual_seed(params.seed)
        batch = build_edit_batch(tokenizer, edits)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}

        # What peft touches beyond the modules it wraps: grad flags (it freezes
        # the base model) and instance attributes.  Both are restored, so the
        # step leaves no trace on the model beyond the adapted weights.
        saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        saved_attrs = set(vars(model))
        was_training = model.training
        # eval mode: no dropout of the base model; the adapter's dropout is
        # switched on below, so the result depends on the data and the seed only
        model.eval()
        start = time.perf_counter()
        peft_model = get_peft_model(model, _peft_config(params, targets))
        merged = False
        losses: list[float] = []
        try:
            for name, module in model.named_modules():
                if name.endswith("lora_dropout"):
                    module.train()
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            num_trainable = sum(p.numel() for p in trainable)
            optimizer = torch.optim.Adam(trainable, lr=params.lr)
            adalora = params.variant == "adalora"
            for step in range(params.steps):
                optimizer.zero_grad(set_to_none=True)
                # the original model object now holds the adapter layers: its
                # forward is the adapted forward, without peft's loss extras
                loss = target_loss(model, batch)
                loss.backward()
                optimizer.step()
                if adalora:
                    # needs this step's gradients (importance scores): before zero_grad
                    peft_model.base_model.update_and_allocate(step)
                losses.append(float(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            kept_rank = _kept_rank(peft_model) if adalora else None
            unloaded = peft_model.merge_and_unload()
            merged = True
            if unloaded is not model:  # pragma: no cover - peft contract
                raise RuntimeError("peft merge_and_unload returned a different model object")
        finally:
            if not merged:
                peft_model.unload()  # drop the adapter, leave the original weights
            for attr in set(vars(model)) - saved_attrs:
                delattr(model, attr)
            for n, p in model.named_parameters():
                p.grad = None
                p.requires_grad_(saved_flags[n])
            model.train(was_training)
        del peft_model
        model.eval()
        try:
            with torch.no_grad():
                final = float(target_loss(model, batch))
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        log.info(
            "lora (%s): %d edits, %d modules, %d steps, loss %.3f -> %.3f in %.1fs",
            params.variant, len(edits), len(targets), params.steps, losses[0], final, seconds,
        )
        return {
            "edit": {
                "method": "lora",
                "variant": params.variant,
                "num_edits": len(edits),
                "initial_loss": losses[0],
                "final_loss": final,
                "trainable_params": int(num_trainable),
                "adapted_modules": len(targets),
                "kept_rank": kept_rank,
            },
            "seconds": round(seconds, 2),
        }

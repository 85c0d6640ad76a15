"""Wanda -- pruning by weight magnitude x input-activation norm (Sun et al., 2023).

Runs llm-compressor's ``WandaPruningModifier`` through ``llmcompressor.oneshot``
on every Linear layer inside the transformer blocks (attention and MLP
projections; embeddings and the LM head are left dense, as in the paper).
Pruning is per output row: each row of a ``[out, in]`` weight loses exactly
``int(in * sparsity)`` weights (or ``n`` of every ``m`` with ``mask_structure``),
so the measured sparsity matches the requested one up to that rounding (at
most ``1 / in_features``: under 0.2 % for SmolLM2's 576 and 1536 columns).

The calibration windows are cut from the experiment's ``calibration`` texts
(:mod:`shared.interventions._calibration`) and handed to ``oneshot`` already
tokenized, so llm-compressor never loads a dataset or a tokenizer itself.

Afterwards the model is returned to an ordinary dense transformers model:
``oneshot`` replaces ``model.save_pretrained`` by a compressing wrapper and
keeps a global session; both are undone here (see :func:`_restore_plain_model`).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from shared.interventions import register
from shared.interventions._calibration import calibration_dataset
from shared.interventions.base import Category, Intervention, InterventionParams
from shared.models import block_linear_weights

log = logging.getLogger(__name__)

_NM = re.compile(r"^(\d+):(\d+)$")


class WandaParams(InterventionParams):
    """Hyperparameters of Wanda pruning (defaults: built-in SmolLM2-135M on CPU)."""

    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of block linear weights set to zero")
    mask_structure: str = Field(
        "unstructured",
        description="'unstructured' or 'N:M' (N zeros in every M consecutive input weights, e.g. '2:4')",
    )
    num_calibration_samples: int = Field(
        32, ge=1, description="calibration windows (fewer if the corpus is shorter; the record has the count)"
    )
    calibration_seq_len: int = Field(256, ge=8, description="tokens per calibration window")

    @field_validator("mask_structure")
    @classmethod
    def _check_structure(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("unstructured", "0:0"):
            return "unstructured"
        m = _NM.match(v)
        if not m or not (0 < int(m.group(1)) < int(m.group(2))):
            raise ValueError("mask_structure must be 'unstructured' or 'N:M' with 0 < N < M")
        return v

    @model_validator(mode="after")
    def _nm_matches_sparsity(self) -> "WandaParams":
        # An N:M mask fixes the sparsity at N/M; a different requested value would
        # be silently ignored by llm-compressor, so it is rejected here.
        if self.mask_structure != "unstructured":
            n, m = (int(x) for x in self.mask_structure.split(":"))
            if abs(self.sparsity - n / m) > 1e-9:
                raise ValueError(f"mask_structure {self.mask_structure} implies sparsity {n / m}, got {self.sparsity}")
        return self

    def llmcompressor_mask(self) -> str:
        """The mask structure in llm-compressor's spelling ('0:0' = unstructured)."""
        return "0:0" if self.mask_structure == "unstructured" else self.mask_structure


def measured_sparsity(model: Any) -> float:
    """Fraction of exact zeros over all block linear weights (what compression is measured on)."""
    zeros = total = 0
    for w in block_linear_weights(model).values():
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


@contextmanager
def _loadable_config_path(model: Any) -> Iterator[None]:
    """Make ``model.config.name_or_path`` a local folder holding the model's config.

    Workaround: ``oneshot`` (``Oneshot.validate_model``) re-reads the config with
    ``AutoConfig.from_pretrained(model.config.name_or_path)``.  A model that was
    built in memory or whose source folder was a since-deleted temporary
    checkpoint has no such folder, and a bare name would be looked up on the
    hub -- which the default path must never touch.  So the current config is
    written to a temporary folder for the duration of the call.
    """
    original = model.config._name_or_path
    if original and (Path(original) / "config.json").is_file():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="lmc-wanda-config-") as tmp:
        model.config.save_pretrained(tmp)
        model.config._name_or_path = tmp
        try:
            yield
        finally:
            model.config._name_or_path = original


def _hook_count(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _restore_plain_model(model: Any, hooks_before: int) -> None:
    """Undo what ``oneshot`` leaves on the model and in the process.

    * ``modify_save_pretrained`` replaced ``model.save_pretrained`` by an
      *instance* attribute that compresses on save and writes a recipe; deleting
      it brings back the class's ordinary method, so checkpoints are plain dense
      safetensors (compressed-tensors has no sparse compressor to apply anyway).
    * The global llm-compressor session still holds the recipe and modifier
      state; it is reset so a later compressor in the same process starts clean.
    """
    from llmcompressor.core import reset_session

    if "save_pretrained" in vars(model):
        del model.save_pretrained
    reset_session()
    # the modifier removes its hooks on finalize; make sure nothing is left behind
    if _hook_count(model) != hooks_before:
        raise RuntimeError("llm-compressor left forward hooks on the model")


@register
class WandaPruning(Intervention):
    """Unstructured (or N:M) Wanda pruning of all block Linear layers via llm-compressor."""

    name = "wanda"
    category = Category.COMPRESS
    params_model = WandaParams
    sweep_axis = "sparsity"
    needs_calibration = True
    data_inputs = ("calibration",)

    def apply(self, model: Any, tokenizer: Any, params: WandaParams, data: Any) -> dict[str, Any]:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        dataset = calibration_dataset(
            tokenizer, data.texts("calibration"), params.num_calibration_samples, params.calibration_seq_len
        )
        # Target the decoder-block class: the modifier prunes every Linear inside
        # the matched modules, which is exactly block_linear_weights() -- the LM
        # head (also a Linear) is outside the blocks and stays dense.
        block_class = type(model.model.layers[0]).__name__
        modifier = WandaPruningModifier(
            sparsity=params.sparsity,
            mask_structure=params.llmcompressor_mask(),
            targets=[block_class],
        )
        was_training = model.training
        hooks_before = _hook_count(model)
        model.eval()
        start = time.perf_counter()
        try:
            with _loadable_config_path(model):
                oneshot(
                    model=model,
                    tokenizer=tokenizer,
                    recipe=modifier,
                    dataset=dataset,
                    num_calibration_samples=len(dataset),
                    max_seq_length=params.calibration_seq_len,
                    shuffle_calibration_samples=False,
                    batch_size=1,
                )
        finally:
            _restore_plain_model(model, hooks_before)
            model.train(was_training)
        seconds = time.perf_counter() - start
        measured = measured_sparsity(model)
        log.info("wanda: sparsity %.3f requested, %.4f measured, %.1fs", params.sparsity, measured, seconds)
        return {
            "compression": {
                "method": "wanda",
                "sparsity": params.sparsity,
                "mask_structure": params.mask_structure,
                "measured_sparsity": measured,
                "num_calibration_samples": len(dataset),
                "calibration_seq_len": params.calibration_seq_len,
            },
            "seconds": round(seconds, 2),
        }

"""Running an llm-compressor recipe on an in-memory model and getting a plain model back.

Every compressor (Wanda, SparseGPT, GPTQ, AWQ, RTN, AutoRound) goes through
``llmcompressor.oneshot``.  It is built to produce a checkpoint for an inference
engine; this project needs the opposite -- an ordinary dense transformers
model that a later edit or unlearning step can train.  This module holds the
few things needed in between, each isolated and explained:

* :func:`_loadable_config_path` -- ``oneshot`` re-reads the config from
  ``model.config.name_or_path``;
* :func:`_no_pinned_memory_without_accelerator` -- AWQ pins CPU memory, which
  fails on a machine without an accelerator;
* :func:`_restore_plain_model` -- undo the compressing ``save_pretrained``
  wrapper and the global session ``oneshot`` leaves behind.

Quantized layers are turned back into plain ``Linear`` layers by
:mod:`shared.compression_state` (snap to grid, record scales, strip).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field

from shared.interventions._calibration import calibration_dataset
from shared.interventions.base import InterventionParams

log = logging.getLogger(__name__)


class CalibratedParams(InterventionParams):
    """Calibration settings shared by every compressor (defaults: built-in SmolLM2-135M on CPU).

    The paper used 128 windows of 2048 C4 tokens on GPUs; here the built-in
    calibration text gives 32 windows of 256 tokens, which is enough for the
    135M model and keeps each compressor under about a minute on 2 cores.
    """

    num_calibration_samples: int = Field(
        32, ge=1, le=100_000, description="calibration windows (fewer if the corpus is shorter; the record has the count)"
    )
    calibration_seq_len: int = Field(256, ge=8, le=32_768, description="tokens per calibration window")


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
    with tempfile.TemporaryDirectory(prefix="lmc-config-") as tmp:
        model.config.save_pretrained(tmp)
        model.config._name_or_path = tmp
        try:
            yield
        finally:
            model.config._name_or_path = original


@contextmanager
def _no_pinned_memory_without_accelerator() -> Iterator[None]:
    """Workaround: make ``IntermediatesCache.pin_memory`` a no-op when there is no accelerator.

    llm-compressor 0.14's AWQ pins the cached activations before its grid search
    "for faster onloading" to the GPU.  Pinning needs an accelerator runtime and
    raises "Cannot access accelerator device" on a CPU-only machine, although
    nothing would ever be copied to a device there.  Pinned memory is only a
    transfer optimisation, so skipping it changes no result.  The patch is
    applied only without an accelerator and only for the duration of a call.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def _hook_count(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _restore_plain_model(model: Any, hooks_before: int) -> None:
    """Undo what ``oneshot`` leaves on the model and in the process.

    * ``modify_save_pretrained`` replaced ``model.save_pretrained`` by an
      *instance* attribute that compresses on save and writes a recipe; deleting
      it brings back the class's ordinary method, so checkpoints are plain dense
      safetensors.
    * ``oneshot`` dispatches the model through compressed-tensors' offloading
      (each module's ``_parameters`` becomes an offload cache and its
      ``forward`` a wrapper); the dispatch is removed and the plain forwards
      restored, so training or saving the model afterwards sees ordinary
      ``nn.Module`` parameters.  (Quantization wrappers are removed later by
      :func:`shared.compression_state.snap_and_strip_quantized`, which needs
      the scales first.)
    * The global llm-compressor session still holds the recipe and modifier
      state; it is reset so a later compressor in the same process starts clean.
    """
    from compressed_tensors.offload import remove_dispatch
    from llmcompressor.core import reset_session

    if "save_pretrained" in vars(model):
        del model.save_pretrained
    remove_dispatch(model)
    for module in model.modules():
        bound = vars(module).get("forward")
        if bound is not None and getattr(bound, "__func__", None) is type(module).forward:
            del module.forward  # an instance attribute that is just the class's own forward
    reset_session()
    if _hook_count(model) != hooks_before:
        raise RuntimeError("llm-compressor left forward hooks on the model")


def block_class_name(model: Any) -> str:
    """Class name of the decoder blocks: the target that covers exactly the block Linear layers."""
    return type(model.model.layers[0]).__name__


def run_oneshot(model: Any, tokenizer: Any, recipe: Any, params: CalibratedParams, texts: list[str]) -> dict[str, Any]:
    """Run ``recipe`` with ``oneshot`` on ``model`` in place; return calibration facts for the record.

    The calibration windows are cut from ``texts`` and handed over already
    tokenized, so llm-compressor never loads a dataset or a tokenizer itself.
    """
    dataset = calibration_dataset(tokenizer, texts, params.num_calibration_samples, params.calibration_seq_len)
    seconds = _oneshot_in_place(
        model,
        tokenizer,
        recipe,
        dataset=dataset,
        num_calibration_samples=len(dataset),
        max_seq_length=params.calibration_seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    return {
        "num_calibration_samples": len(dataset),
        "calibration_seq_len": params.calibration_seq_len,
        "oneshot_seconds": seconds,
    }


def run_data_free(model: Any, tokenizer: Any, recipe: Any) -> dict[str, Any]:
    """Run a recipe that needs no calibration data (round-to-nearest weight quantization) in place.

    llm-compressor infers its ``DataFreePipeline`` when no dataset is given;
    the record says so with zero calibration windows.
    """
    seconds = _oneshot_in_place(model, tokenizer, recipe)
    return {"num_calibration_samples": 0, "calibration_seq_len": 0, "oneshot_seconds": seconds}


def _oneshot_in_place(model: Any, tokenizer: Any, recipe: Any, **oneshot_kwargs: Any) -> float:
    """``oneshot`` on ``model`` with the workarounds above, always leaving a plain model; returns seconds."""
    from llmcompressor import oneshot

    was_training = model.training
    hooks_before = _hook_count(model)
    model.eval()
    start = time.perf_counter()
    failed = True
    try:
        with _loadable_config_path(model), _no_pinned_memory_without_accelerator():
            oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **oneshot_kwargs)
        failed = False
    finally:
        try:
            _restore_plain_model(model, hooks_before)
        except Exception as cleanup_error:
            if not failed:
                raise
            # the step fails with llm-compressor's own error; a cleanup problem after it would hide it
            log.warning("cleanup after the failed llm-compressor run: %s", cleanup_error)
        model.train(was_training)
    return round(time.perf_counter() - start, 2)

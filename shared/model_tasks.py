"""Library entry points of the Model-artifact components: prepare a base model, apply one step, evaluate.

A component hands these functions the *reference* read from its input
``Model`` artifact (:class:`shared.model_ref.ModelRef`: store URI + checkpoint
key) and typed values; they return the reference and the metadata of the
output artifact.  Everything content-addressed stays as in
:mod:`shared.execution` -- the same checkpoint and result keys whether a step
comes from a spec-compiled pipeline or from a user's own pipeline -- so
results are shared between the two, re-runs resume, and the aggregator finds
every evaluation.

Why the parent's steps come from its manifest and not from a parameter: a
user chaining ``wanda(model=base.outputs["model"])`` knows nothing of keys or
step lists; the checkpoint already records how it was made (base digest and
the keyed steps), so the new key follows from the parent alone.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.data import DataConfig, ExperimentData
from shared.model_ref import ModelRef, artifact_metadata
from shared.store import checkpoint_key, open_store, result_key

log = logging.getLogger("lmcompose")

#: the data fields that select the edit batch (given with ``edits``)
EDIT_SELECTION = ("num_edits", "edit_seed", "edit_batch")


class ParameterError(ValueError):
    """A component argument that fails validation; the message names the parameter as a spec would."""


def default_store_uri(store_uri: str = "") -> str:
    """The store a component writes to: the argument, else ``$LMCOMPOSE_STORE``, else ``$LMCOMPOSE_CACHE/store``.

    In a cluster the ``lmcompose-store`` ConfigMap sets ``LMCOMPOSE_STORE``
    (manifests/); on one machine the default is a local folder.
    """
    uri = store_uri or os.environ.get("LMCOMPOSE_STORE", "")
    if not uri:
        cache = os.environ.get("LMCOMPOSE_CACHE") or str(Path.home() / ".cache" / "lm-compose")
        uri = str(Path(cache).expanduser() / "store")
    from shared.store import check_store_uri

    check_store_uri(uri)
    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    return uri


def data_for(fields: dict[str, Any]) -> ExperimentData:
    """The experiment data a component's data inputs describe (other fields keep their defaults).

    Only the named fields matter to the keys: a step's key holds the digests
    of the data inputs its method reads, nothing else.
    """
    raw = {k: v for k, v in fields.items() if v is not None}
    raw.setdefault("num_batches", int(raw.get("edit_batch", 0)) + 1)
    try:
        config = DataConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "data"
        raise ParameterError(f"{where}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})") from None
    return ExperimentData(config)


def validated_params(method_name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A method's full parameters (defaults filled in) or a :class:`ParameterError` naming the field."""
    from shared.interventions import get_intervention

    method = get_intervention(method_name)
    try:
        return method.parse_params(params).model_dump(mode="json")
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "params"
        msg = err["msg"].removeprefix("Value error, ")
        raise ParameterError(f"{method_name}: params.{loc}: {msg} (got {err.get('input')!r})") from None


def _check_data_readable(data: ExperimentData, names: tuple[str, ...] | list[str]) -> None:
    """Load each data input once now, so a bad path fails before the model is loaded."""
    for name in names:
        if name == "edits":
            data.edits  # noqa: B018 - loads and validates the selected batch
        elif data.harness_tasks(name) is None:
            data.path(name)
            from shared.data import load_field

            load_field(name, getattr(data.config, name))


def prepare_base_model(model_source: str, store_uri: str = "", trust_remote_code: bool = False) -> tuple[ModelRef, dict[str, Any]]:
    """Put the base model into the store (once); its reference and artifact metadata."""
    from shared.execution import prepare_base

    uri = default_store_uri(store_uri)
    _digest, key = prepare_base(uri, model_source, trust_remote_code)
    ref = ModelRef(uri, key)
    manifest = _manifest(ref)
    return ref, artifact_metadata(ref, manifest)


def _manifest(ref: ModelRef) -> dict[str, Any]:
    return open_store(ref.store_uri).manifest(ref.key)


def apply_to_model(
    parent: ModelRef,
    method_name: str,
    params: dict[str, Any],
    data_fields: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[ModelRef, dict[str, Any]]:
    """Apply one intervention to the checkpoint ``parent``; the new checkpoint's reference and metadata.

    Parameters and data are validated before the parent is read; the step
    returns at once when its checkpoint is already in the store.
    """
    from shared.execution import apply_step, keyed_steps
    from shared.interventions import get_intervention

    method = get_intervention(method_name)
    full = validated_params(method_name, params)
    data = data_for({k: v for k, v in (data_fields or {}).items() if k in method.data_inputs or k in EDIT_SELECTION})
    store = open_store(parent.store_uri)
    parent_meta = store.checkpoint_meta(parent.key)
    base_digest = parent_meta.get("base_digest") or parent_meta.get("model_digest")
    if not base_digest:
        raise ValueError(f"{parent.key} in {parent.store_uri} records no base model digest; is it a model checkpoint?")
    parent_keyed = parent_meta.get("steps", [])
    if checkpoint_key(base_digest, parent_keyed) != parent.key:
        raise ValueError(f"{parent.key}: its manifest's steps do not give its own key; the checkpoint is not trustworthy")
    step = {"method": method_name, "params": full}
    keyed = parent_keyed + keyed_steps([step], data)
    key = checkpoint_key(base_digest, keyed)
    if not store.has_checkpoint(key):
        from shared.lease import compute_once

        _check_data_readable(data, method.data_inputs)
        compute_once(store, key, lambda: store.has_checkpoint(key),
                     lambda: apply_step(store, base_digest, parent.key, keyed, step, data, trust_remote_code,
                                        source=parent_meta.get("source", "")))
    ref = ModelRef(parent.store_uri, key)
    return ref, artifact_metadata(ref, _manifest(ref))


def evaluate_model(
    model: ModelRef,
    evaluators: list[str],
    data_fields: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate one checkpoint with several evaluators, loading it at most once.

    Results are stored under the same content-addressed keys as
    the aggregator recomputes (:func:`shared.execution.evaluation_config`);
    evaluators whose result is already stored are not recomputed.  Returns
    ``{evaluator: {criterion: value}}``.
    """
    from shared.evaluation import EVALUATOR_DATA, EvalOptions
    from shared.execution import evaluation_config

    if not evaluators:
        raise ParameterError("evaluators: name at least one of " + ", ".join(EVALUATOR_DATA))
    unknown = [e for e in evaluators if e not in EVALUATOR_DATA]
    if unknown:
        raise ParameterError(f"evaluators: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(EVALUATOR_DATA)}")
    options = dict(options or {})
    dtype_name = options.get("dtype", "float32")
    if dtype_name not in ("float32", "bfloat16"):
        raise ParameterError(f"dtype: must be 'float32' or 'bfloat16' (got {dtype_name!r})")
    eval_options = {k: v for k, v in options.items() if k != "dtype"}
    try:
        EvalOptions.model_validate(eval_options)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ParameterError(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})") from None
    data = data_for(data_fields or {})
    store = open_store(model.store_uri)
    keys = {e: result_key(model.key, e, evaluation_config(e, data, options)) for e in dict.fromkeys(evaluators)}
    out: dict[str, dict[str, float]] = {}
    todo = []

    def complete(evaluator: str) -> bool:
        return result_is_complete(store, keys[evaluator], evaluator)

    for evaluator, rkey in keys.items():
        if complete(evaluator):
            out[evaluator] = store.get_json(rkey)["criteria"]
            log.info("evaluation %s of %s already in store", evaluator, model.key)
        else:
            todo.append(evaluator)
    if todo:
        from shared.lease import compute_once

        _check_data_readable(data, sorted({n for e in todo for n in EVALUATOR_DATA[e]}))

        def compute() -> None:
            _evaluate_missing(store, model, [e for e in todo if not complete(e)], keys, data, options,
                              dtype_name, eval_options, out)

        compute_once(store, keys[todo[0]], lambda: all(complete(e) for e in todo), compute)
        for evaluator in todo:  # computed here or by a concurrent runner
            out.setdefault(evaluator, store.get_json(keys[evaluator])["criteria"])
    return {e: out[e] for e in keys}


def result_is_complete(store: Any, key: str, evaluator: str) -> bool:
    """A stored evaluation result usable as is: present, and with per-item scores where the evaluator gives them.

    Results stored before per-item scores were kept have the same key; they
    are computed again once, so that every figure of a report gets an interval.
    """
    from shared.evaluation import EVALUATORS_WITH_ITEMS

    if not store.has_json(key):
        return False
    return evaluator not in EVALUATORS_WITH_ITEMS or bool(store.get_json(key).get("items"))


def _evaluate_missing(store: Any, model: ModelRef, todo: list[str], keys: dict[str, str], data: ExperimentData,
                      options: dict[str, Any], dtype_name: str, eval_options: dict[str, Any],
                      out: dict[str, dict[str, float]]) -> None:
    """Load the model once and compute (and store) every evaluator of ``todo``."""
    import torch

    from shared.evaluation import EvalOptions, get_evaluator
    from shared.item_scores import check_consistent, item_scores_of, items_to_json
    from shared.models import default_threads, load_model

    if todo:
        from shared.execution import verified_checkpoint

        folder, manifest = verified_checkpoint(store, model.key)
        default_threads(os.environ.get("LMCOMPOSE_EVAL_THREADS"))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
        loaded, tokenizer = load_model(folder, dtype=dtype)
        opts = EvalOptions.model_validate({**eval_options, "compression": manifest["meta"].get("compression")})
        for evaluator in todo:
            started = time.time()
            scores = get_evaluator(evaluator)(loaded, tokenizer, data, opts)
            criteria = {k: float(v) for k, v in scores.items()}
            items = item_scores_of(scores)
            check_consistent(criteria, items)
            document = {"model_key": model.key, "evaluator": evaluator, "criteria": criteria,
                        "seconds": time.time() - started}
            if items:
                document["items"] = items_to_json(items)
            store.put_json(keys[evaluator], document)
            log.info("evaluated %s with %s: %s", model.key, evaluator, criteria)
            out[evaluator] = criteria

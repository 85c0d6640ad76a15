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
#: how ``evaluate_model`` chooses the edits it scores: ``recipe`` (the default) takes the selection the
#: model's editing step applied and refuses a different explicit one; ``explicit`` scores the given one
EDITS_FROM = ("recipe", "explicit")


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
    check_store_for_pods(uri)
    return uri


#: set to 1 where every pod mounts a local-folder store at the same path (a shared volume)
ALLOW_LOCAL_STORE_ENV = "LMCOMPOSE_ALLOW_LOCAL_STORE"


def check_store_for_pods(uri: str) -> None:
    """Refuse a local-folder store in a Kubernetes pod: what one pod writes there, the next pod never sees.

    Without this, a task in a cluster writes its checkpoint to its own pod's
    disk and the next task fails with an unexplained "checkpoint not found".
    ``$LMCOMPOSE_ALLOW_LOCAL_STORE=1`` allows it where a shared volume is
    mounted at the same path in every pod (``lmcompose compile --local-store``
    sets it on the tasks).
    """
    if not os.environ.get("KUBERNETES_SERVICE_HOST") or os.environ.get(ALLOW_LOCAL_STORE_ENV) == "1":
        return
    if uri.startswith("s3://"):
        return
    raise ParameterError(
        f"store_uri: {uri} is a local folder, but this task runs in a Kubernetes pod whose disk no other task sees; "
        f"pass store_uri='s3://bucket/prefix' (lmcompose --store s3://...), or set {ALLOW_LOCAL_STORE_ENV}=1 if every "
        "pod mounts this folder"
    )


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


def prepare_base_model(model_source: str, store_uri: str = "", trust_remote_code: bool = False,
                       display_source: str = "") -> tuple[ModelRef, dict[str, Any]]:
    """Put the base model into the store (once); its reference and artifact metadata.

    ``display_source`` is what the artifact's metadata names as the source
    (e.g. the URI of an input ``Model`` artifact, where ``model_source`` is
    the pod-local path it was downloaded to).  A folder's identity is its
    content, so the stored checkpoint may have been made from the same
    content under another name; the metadata names the source of *this* call.
    """
    from shared.execution import prepare_base

    uri = default_store_uri(store_uri)
    _digest, key = prepare_base(uri, model_source, trust_remote_code)
    ref = ModelRef(uri, key)
    manifest = _manifest(ref)
    metadata = artifact_metadata(ref, manifest)
    metadata["base_source"] = display_source or model_source
    return ref, metadata


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder (a ``config.json`` in it) rather than a model reference."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and not (path / "model.json").is_file()


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
    check_store_for_pods(parent.store_uri)
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
    edits_from: str = "recipe",
) -> dict[str, dict[str, float]]:
    """Evaluate one checkpoint with several evaluators, loading it at most once.

    The edit evaluator scores the edits the model's editing step applied
    (:func:`resolve_edit_selection`): ``data_fields`` values of ``None`` for
    ``edits``/``num_edits``/``edit_seed``/``edit_batch`` take the recipe's,
    and a given value that selects other edits is refused unless
    ``edits_from="explicit"``.

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
    check_store_for_pods(model.store_uri)
    store = open_store(model.store_uri)
    if not store.has_checkpoint(model.key):  # before any lease or result is written
        from shared.store import NOT_FOUND_CAUSES, CheckpointNotFound

        raise CheckpointNotFound(f"no committed checkpoint {model.key} in {store.uri}; {NOT_FOUND_CAUSES}")
    fields = dict(data_fields or {})
    if "edit" in evaluators:
        fields = resolve_edit_selection(store, model, fields, edits_from)
    data = data_for(fields)
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


def _recipe_edit_selection(store: Any, key: str) -> dict[str, Any] | None:
    """The data selection of the newest editing step along ``key``'s lineage, from the checkpoints' recipes."""
    from shared.interventions import get_intervention

    seen: set[str] = set()
    while key and key not in seen:
        seen.add(key)
        recipe = store.checkpoint_meta(key).get("recipe")
        if not isinstance(recipe, dict):
            return None
        step = recipe.get("step") or {}
        try:
            reads_edits = "edits" in get_intervention(step.get("method", "")).data_inputs
        except Exception:  # noqa: BLE001 - a method this version does not know: look further up
            reads_edits = False
        if reads_edits:
            data = recipe.get("data") or {}
            return {"method": step["method"], **{k: data.get(k) for k in ("edits", *EDIT_SELECTION)}}
        key = recipe.get("parent", "")
    return None


def resolve_edit_selection(store: Any, model: ModelRef, fields: dict[str, Any], edits_from: str = "recipe") -> dict[str, Any]:
    """The data fields the edit evaluator of ``model`` uses: the edits the model received, unless asked otherwise.

    Why: an edit metric computed on other records than the ones applied is a
    wrong number that looks right (4 edits applied, 10 scored: success 0.4
    instead of 1.0).  Every checkpoint records the data digest of each step
    (``steps[i].data.edits``) and how it was made (``recipe``), so:

    * unset fields (``None``) take the values of the model's editing step;
    * a given value is checked against the step: if the selection it makes is
      not the one applied, the evaluation is refused in one line, unless
      ``edits_from="explicit"`` (scoring other edits on purpose, e.g. locality
      of unrelated facts);
    * a model with no editing step uses the given values (or the defaults);
      a model whose steps applied several different selections must say
      which to score (``edits_from="explicit"``).
    """
    if edits_from not in EDITS_FROM:
        raise ParameterError(f"edits_from: must be one of {', '.join(EDITS_FROM)} (got {edits_from!r})")
    names = ("edits", *EDIT_SELECTION)
    given = {k: fields[k] for k in names if fields.get(k) is not None}
    out = {k: v for k, v in fields.items() if k not in names}
    if edits_from == "explicit":
        return {**out, **given}
    steps = store.checkpoint_meta(model.key).get("steps", [])
    applied = [(s.get("method", "?"), s["data"]["edits"]) for s in steps if "edits" in (s.get("data") or {})]
    if not applied:
        return {**out, **given}
    digests = {d for _m, d in applied}
    if len(digests) > 1:
        raise ParameterError(
            f"edits_from: the model's steps applied {len(digests)} different edit selections "
            f"({', '.join(m for m, _d in applied)}); set edits_from='explicit' and the selection to score"
        )
    recipe = _recipe_edit_selection(store, model.key)
    if recipe is None:
        if set(given) != set(names):
            raise ParameterError(
                "edits: the model's checkpoints do not record which edits were applied (made before recipes were "
                "kept); give edits, num_edits, edit_seed and edit_batch as used by the editing step"
            )
        recipe = {"method": applied[-1][0]}
    method = recipe.pop("method")
    resolved = {**{k: v for k, v in recipe.items() if v is not None}, **given}
    if data_for(resolved).digest("edits") != applied[-1][1]:
        differs = [f"{k}={given[k]!r}" for k in names if k in given and k in recipe and given[k] != recipe[k]]
        applied_text = ", ".join(f"{k}={recipe[k]!r}" for k in names if k in recipe)
        raise ParameterError(
            f"{' '.join(differs) or 'the edit selection'}: the model's {method} step applied other edits "
            f"({applied_text}); leave the selection unset to score the applied edits, or set edits_from='explicit' "
            "to score another selection on purpose"
        )
    return {**out, **resolved}


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
    from shared.finite import check_finite_tensors
    from shared.item_scores import check_consistent, check_finite_scores, item_scores_of, items_to_json
    from shared.models import default_threads, load_model

    if todo:
        from shared.execution import verified_checkpoint

        folder, manifest = verified_checkpoint(store, model.key)
        default_threads(os.environ.get("LMCOMPOSE_EVAL_THREADS"))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
        loaded, tokenizer = load_model(folder, dtype=dtype)
        # a NaN model's "scores" are whatever argmax makes of NaN logits: refuse it before any evaluator runs
        check_finite_tensors(loaded, f"{', '.join(todo)}: model {model.key} is not finite",
                             "refusing to evaluate it; nothing stored")
        opts = EvalOptions.model_validate({**eval_options, "compression": manifest["meta"].get("compression")})
        for evaluator in todo:
            started = time.time()
            scores = get_evaluator(evaluator)(loaded, tokenizer, data, opts)
            criteria = {k: float(v) for k, v in scores.items()}
            items = item_scores_of(scores)
            check_finite_scores(evaluator, criteria, items, model.key)
            check_consistent(criteria, items)
            document = {"model_key": model.key, "evaluator": evaluator, "criteria": criteria,
                        "seconds": time.time() - started}
            if items:
                document["items"] = items_to_json(items)
            store.put_json(keys[evaluator], document)
            log.info("evaluated %s with %s: %s", model.key, evaluator, criteria)
            out[evaluator] = criteria


#: what ``export_model`` writes: ``auto`` (packed when the model is quantized and on its grid, else dense),
#: ``dense`` (float safetensors) or ``pack-quantized`` (compressed-tensors; quantized models only)
EXPORT_FORMATS = ("auto", "dense", "pack-quantized")
#: provenance file written into every exported folder (plain JSON; transformers ignores it)
PROVENANCE_FILE = "lm_compose.json"


def validated_export_format(export_format: str) -> str:
    if export_format not in EXPORT_FORMATS:
        raise ParameterError(f"export_format: must be one of {', '.join(EXPORT_FORMATS)} (got {export_format!r})")
    return export_format


def export_model(model: ModelRef, dest: str | Path, export_format: str = "auto") -> dict[str, Any]:
    """Write the checkpoint ``model`` as a Hugging Face folder at ``dest``; return the output artifact's metadata.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(dest)``:
    dense safetensors + config + tokenizer, or compressed-tensors'
    ``pack-quantized`` format for a quantized model (transformers unpacks it
    through its compressed-tensors integration).  A quantized model whose
    weights left their grid (a later step changed them) cannot be packed
    without changing it: ``auto`` writes it dense and says so; ``pack-quantized``
    refuses it.  The metadata carries the composition, every step and the
    compression state; ``lm_compose.json`` in the folder carries the same for
    readers outside Kubeflow.
    """
    import json
    import shutil

    from shared.compression_state import STATE_FILE, grid_distance, grid_layers, load_state
    from shared.execution import verified_checkpoint
    from shared.export import GRID_TOLERANCE, export_compressed, folder_bytes
    from shared.lineage_state import LINEAGE_DIR
    from shared.store import MANIFEST, VERIFIED_STAMP

    validated_export_format(export_format)
    check_store_for_pods(model.store_uri)
    store = open_store(model.store_uri)
    folder, manifest = verified_checkpoint(store, model.key)
    tensors, args = load_state(folder)
    quantized = bool(grid_layers(tensors))
    note = ""
    if export_format == "pack-quantized" and not quantized:
        raise ParameterError(f"export_format: 'pack-quantized' needs a quantized model; {model.key} is not "
                             "(use 'dense' or 'auto')")
    packed = False
    if quantized and export_format != "dense":
        if export_format == "auto":
            from shared.models import load_model

            loaded, _tok = load_model(folder)
            distance = grid_distance(loaded, tensors, args)
            del loaded
            if distance > GRID_TOLERANCE:
                note = (f"weights are up to {distance:.3g} away from their recorded quantization grid (a step after "
                        "the quantization changed them): written dense")
                log.warning("export of %s: %s", model.key, note)
        if not note:
            export_compressed(folder, dest)  # refuses an off-grid model
            packed = True
    dest = Path(dest)
    if not packed:
        dest.mkdir(parents=True, exist_ok=True)
        skip = {MANIFEST, VERIFIED_STAMP, STATE_FILE}
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and rel.as_posix() not in skip and rel.parts[0] != LINEAGE_DIR:  # store-internal state
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest / rel)
    meta = {k: v for k, v in artifact_metadata(model, manifest).items() if k not in ("lmcompose_format", "store", "key")}
    meta.update({
        "export_format": "pack-quantized" if packed else "dense",
        "exported_from_store": model.store_uri,
        "exported_from_key": model.key,
        "weights_bytes": folder_bytes(dest),
    })
    if note:
        meta["export_note"] = note
    provenance = {"lm_compose": meta, "compression": manifest["meta"].get("compression"),
                  "records": manifest["meta"].get("records", [])}
    (dest / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, sort_keys=True, default=str) + "\n")
    return meta

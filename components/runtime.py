"""What runs inside a component's task: read the input Model artifact, call the library, make the output artifact.

Kept out of the component functions so that each component stays a few
lines (KFP ships a component function's source to the container; this
module is imported from the installed package there).  The library
(:mod:`shared.model_tasks`) knows nothing of KFP; this module is the only
place that turns its references and metadata into KFP artifacts.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import namedtuple
from pathlib import Path
from typing import Any

from shared.model_ref import ModelRef

ModelOutputs = namedtuple("Outputs", ["model"])


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def read_model(artifact: Any) -> ModelRef:
    """The checkpoint an input ``Model`` artifact names.

    An lm-compose reference (the output of prepare_base or of an
    intervention) is read from its file, or from its metadata where a
    launcher kept that but not the file.  A Hugging Face folder at the
    artifact's path (the KFP convention: another pipeline's model, an
    ``export`` output, a ``dsl.importer``) is imported as a base model on the
    fly, into the default store, exactly as ``prepare_base`` would.
    """
    from shared.model_ref import ModelRefError
    from shared.model_tasks import is_hf_folder, prepare_base_model

    path = str(getattr(artifact, "path", "") or "")
    if path and is_hf_folder(path):
        log = logging.getLogger("lmcompose")
        log.info("input model %s is a Hugging Face folder: importing it as a base model", getattr(artifact, "uri", path))
        ref, _meta = prepare_base_model(path, "", False, display_source=str(getattr(artifact, "uri", "") or path))
        return ref
    meta = dict(getattr(artifact, "metadata", {}) or {})
    from_meta = None
    if meta.get("store") and meta.get("key") and meta.get("lmcompose_format"):
        from_meta = ModelRef.from_json({"format": meta.get("lmcompose_format"), "store": meta["store"], "key": meta["key"]},
                                       "the model artifact's metadata")
    file_path = Path(path) / "model.json" if path and Path(path).is_dir() else Path(path)
    if from_meta is not None and not file_path.exists():  # a launcher that kept the metadata but not the file
        return from_meta
    try:
        ref = ModelRef.read(path)
    except ModelRefError as exc:
        raise ModelRefError(
            f"{exc}; an input model must be the 'model' output of prepare_base, of an intervention or of export, "
            "or a Hugging Face folder (config.json + *.safetensors) at the artifact's path -- bring other models in "
            "with prepare_base(model=...) or prepare_base(model_source=...)"
        ) from None
    if from_meta is not None and from_meta != ref:
        raise ModelRefError(
            f"model artifact {path} names {ref.key} in {ref.store_uri} but its metadata names {from_meta.key} in "
            f"{from_meta.store_uri}; one of them was altered -- refusing to guess which model is meant"
        )
    return ref


def model_output(ref: ModelRef, metadata: dict[str, Any]) -> Any:
    """A new output ``Model`` artifact under the pipeline root holding ``ref``, with ``metadata``."""
    from kfp import dsl
    from kfp.dsl import Model

    artifact = Model(uri=dsl.get_uri(suffix="model"), metadata=json.loads(json.dumps(metadata)))
    ref.write(artifact.path)
    return ModelOutputs(artifact)


def run_prepare_base(model_source: str, store_uri: str, trust_remote_code: bool, model: Any = None) -> Any:
    """prepare_base: from ``model_source``, or from an input ``Model`` artifact (a Hugging Face folder or a reference)."""
    from shared.model_tasks import ParameterError, is_hf_folder, prepare_base_model

    _logging()
    if model is not None:
        if model_source:
            raise ParameterError("prepare_base: give either model (an input Model artifact) or model_source, not both")
        path = str(model.path)
        if not is_hf_folder(path):
            ref = read_model(model)  # an lm-compose reference passes through unchanged
            from shared.model_ref import artifact_metadata
            from shared.store import open_store

            return model_output(ref, artifact_metadata(ref, open_store(ref.store_uri).manifest(ref.key)))
        ref, metadata = prepare_base_model(path, store_uri, trust_remote_code, display_source=str(model.uri or path))
        return model_output(ref, metadata)
    from shared.models import BUILTIN_SMOLLM2

    ref, metadata = prepare_base_model(model_source or BUILTIN_SMOLLM2, store_uri, trust_remote_code)
    return model_output(ref, metadata)


def run_export(model: Any, export_format: str) -> Any:
    """export: the input reference's checkpoint as a Hugging Face folder at a new output ``Model``'s path."""
    from kfp import dsl
    from kfp.dsl import Model

    from shared.model_tasks import export_model, validated_export_format

    _logging()
    validated_export_format(export_format)
    ref = read_model(model)
    artifact = Model(uri=dsl.get_uri(suffix="model"))
    metadata = export_model(ref, artifact.path, export_format)
    artifact.metadata.update(json.loads(json.dumps(metadata)))
    return ModelOutputs(artifact)


def run_intervention(method: str, model: Any, params: dict[str, Any], data: dict[str, Any], trust_remote_code: bool) -> Any:
    from shared.model_tasks import apply_to_model, validated_params

    _logging()
    validated_params(method, params)  # a bad value fails before the input model is even read
    ref, metadata = apply_to_model(read_model(model), method, params, data, trust_remote_code)
    return model_output(ref, metadata)


def run_evaluation(model: Any, evaluators: list[str], data: dict[str, Any], options: dict[str, Any], metrics: Any,
                   edits_from: str = "recipe") -> str:
    """Evaluate, log every criterion to the ``Metrics`` artifact, return the results as JSON (for the aggregator).

    Edit-selection inputs left at their "unset" value (``edits`` empty, the
    integers -1) take what the model's editing step applied.
    """
    from shared.model_tasks import evaluate_model

    _logging()
    options = dict(options)
    options["limit"] = options.get("limit") or None  # 0 = all (kfp.local 2.17 cannot pass None to an int input)
    data = {k: (None if (k == "edits" and v == "") or (k in ("num_edits", "edit_seed", "edit_batch") and v is not None
                             and int(v) < 0) else v)
            for k, v in data.items()}
    ref = read_model(model)
    results = evaluate_model(ref, list(evaluators), data, options, edits_from)
    for criteria in results.values():
        for name, value in criteria.items():
            metrics.log_metric(name, value)
    metrics.metadata["model_key"] = ref.key
    return json.dumps({"model_key": ref.key, "criteria": results}, sort_keys=True)

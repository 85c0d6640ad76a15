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
from typing import Any

from shared.model_ref import ModelRef

ModelOutputs = namedtuple("Outputs", ["model"])


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def read_model(artifact: Any) -> ModelRef:
    """The checkpoint reference an input ``Model`` artifact holds (its file; its metadata as a fallback)."""
    try:
        return ModelRef.read(artifact.path)
    except Exception:  # noqa: BLE001 - a launcher that kept the metadata but not the file
        meta = dict(getattr(artifact, "metadata", {}) or {})
        if meta.get("store") and meta.get("key"):
            return ModelRef.from_json({"format": meta.get("lmcompose_format"), "store": meta["store"], "key": meta["key"]})
        raise


def model_output(ref: ModelRef, metadata: dict[str, Any]) -> Any:
    """A new output ``Model`` artifact under the pipeline root holding ``ref``, with ``metadata``."""
    from kfp import dsl
    from kfp.dsl import Model

    artifact = Model(uri=dsl.get_uri(suffix="model"), metadata=json.loads(json.dumps(metadata)))
    ref.write(artifact.path)
    return ModelOutputs(artifact)


def run_prepare_base(model_source: str, store_uri: str, trust_remote_code: bool) -> Any:
    from shared.model_tasks import prepare_base_model

    _logging()
    ref, metadata = prepare_base_model(model_source, store_uri, trust_remote_code)
    return model_output(ref, metadata)


def run_intervention(method: str, model: Any, params: dict[str, Any], data: dict[str, Any], trust_remote_code: bool) -> Any:
    from shared.model_tasks import apply_to_model, validated_params

    _logging()
    validated_params(method, params)  # a bad value fails before the input model is even read
    ref, metadata = apply_to_model(read_model(model), method, params, data, trust_remote_code)
    return model_output(ref, metadata)


def run_evaluation(model: Any, evaluators: list[str], data: dict[str, Any], options: dict[str, Any], metrics: Any) -> str:
    """Evaluate, log every criterion to the ``Metrics`` artifact, return the results as JSON (for the aggregator)."""
    from shared.model_tasks import evaluate_model

    _logging()
    options = dict(options)
    options["limit"] = options.get("limit") or None  # 0 = all (kfp.local 2.17 cannot pass None to an int input)
    ref = read_model(model)
    results = evaluate_model(ref, list(evaluators), data, options)
    for criteria in results.values():
        for name, value in criteria.items():
            metrics.log_metric(name, value)
    metrics.metadata["model_key"] = ref.key
    return json.dumps({"model_key": ref.key, "criteria": results}, sort_keys=True)

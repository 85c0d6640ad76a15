"""Component: the `edit` evaluator alone (for reuse; compiled pipelines use `evaluate`, one task per model)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from components.image import BASE_IMAGE

EVALUATOR = "edit"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate_edit(
    model: Input[Model],
    metrics: Output[Metrics],
    edits: str = "",
    num_edits: int = -1,
    edit_seed: int = -1,
    edit_batch: int = -1,
    edits_from: str = "recipe",
    batch_size: int = 16,
    limit: int = 0,
    max_length: int = 256,
    dtype: str = "bfloat16",
) -> NamedTuple("Outputs", [("results", str)]):
    """Evaluate ``model`` with the `edit` evaluator; log its criteria as Metrics.

    Args:
        model: the model to evaluate -- the 'model' output of prepare_base or of an intervention.
        edits: zsRE-style edit records: 'builtin', a JSON-lines file or s3://bucket/key; empty = the records the
            model's editing step used ('builtin' for a model never edited).
        num_edits: edits per batch; -1 = as the model's editing step applied (10 for a model never edited).
        edit_seed: seed choosing which records form the batches; -1 = as the editing step (0 if none).
        edit_batch: the edit batch to score; -1 = as the editing step (0 if none).
        edits_from: 'recipe' (default): score the edits the model received, refusing a selection above that
            differs; 'explicit': score the selection given above on purpose.
        batch_size: batch size of generation and scoring.
        limit: score only the first N questions of each set (quick runs); 0 = all.
        max_length: perplexity window in tokens.
        dtype: precision the model is evaluated in: float32 or bfloat16.

    Returns:
        results: JSON {"model_key", "criteria": {"edit": {criterion: value}}} (also stored in the checkpoint store).
    """
    from collections import namedtuple

    from components.runtime import run_evaluation

    options = dict(batch_size=batch_size, limit=limit, max_length=max_length, dtype=dtype)
    results = run_evaluation(model, ["edit"], dict(edits=edits, num_edits=num_edits, edit_seed=edit_seed, edit_batch=edit_batch), options, metrics,
                             edits_from)
    return namedtuple("Outputs", ["results"])(results)

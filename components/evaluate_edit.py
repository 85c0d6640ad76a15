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
    edits: str = "builtin",
    num_edits: int = 10,
    edit_seed: int = 0,
    edit_batch: int = 0,
    batch_size: int = 16,
    limit: int = 0,
    max_length: int = 256,
    dtype: str = "bfloat16",
) -> NamedTuple("Outputs", [("results", str)]):
    """Evaluate ``model`` with the `edit` evaluator; log its criteria as Metrics.

    Args:
        model: the model to evaluate -- the 'model' output of prepare_base or of an intervention.
        edits: zsRE-style edit records: 'builtin', a JSON-lines file or s3://bucket/key.
        num_edits: edits per batch (as given to the editing step).
        edit_seed: seed choosing which records form the batches.
        edit_batch: the edit batch to score.
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
    results = run_evaluation(model, ["edit"], dict(edits=edits, num_edits=num_edits, edit_seed=edit_seed, edit_batch=edit_batch), options, metrics)
    return namedtuple("Outputs", ["results"])(results)

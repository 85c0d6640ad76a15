"""Component: the `perplexity` evaluator alone (for reuse; compiled pipelines use `evaluate`, one task per model)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from components.image import BASE_IMAGE

EVALUATOR = "perplexity"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate_perplexity(
    model: Input[Model],
    metrics: Output[Metrics],
    perplexity: str = "builtin",
    batch_size: int = 16,
    limit: int = 0,
    max_length: int = 256,
    dtype: str = "bfloat16",
) -> NamedTuple("Outputs", [("results", str)]):
    """Evaluate ``model`` with the `perplexity` evaluator; log its criteria as Metrics.

    Args:
        model: the model to evaluate -- the 'model' output of prepare_base or of an intervention.
        perplexity: held-out text: 'builtin', a JSON-lines file or s3://bucket/key.
        batch_size: batch size of generation and scoring.
        limit: score only the first N questions of each set (quick runs); 0 = all.
        max_length: perplexity window in tokens.
        dtype: precision the model is evaluated in: float32 or bfloat16.

    Returns:
        results: JSON {"model_key", "criteria": {"perplexity": {criterion: value}}} (also stored in the checkpoint store).
    """
    from collections import namedtuple

    from components.runtime import run_evaluation

    options = dict(batch_size=batch_size, limit=limit, max_length=max_length, dtype=dtype)
    results = run_evaluation(model, ["perplexity"], dict(perplexity=perplexity), options, metrics)
    return namedtuple("Outputs", ["results"])(results)

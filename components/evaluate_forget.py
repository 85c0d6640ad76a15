"""Component: the `forget` evaluator alone (for reuse; compiled pipelines use `evaluate`, one task per model)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from components.image import BASE_IMAGE

EVALUATOR = "forget"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate_forget(
    model: Input[Model],
    metrics: Output[Metrics],
    forget_mcq: str = "builtin",
    batch_size: int = 16,
    limit: int = 0,
    max_length: int = 256,
    dtype: str = "bfloat16",
    mcq_format: str = "cloze",
) -> NamedTuple("Outputs", [("results", str)]):
    """Evaluate ``model`` with the `forget` evaluator; log its criteria as Metrics.

    Args:
        model: the model to evaluate -- the 'model' output of prepare_base or of an intervention.
        forget_mcq: 4-choice forget-domain questions: 'builtin', a file, s3://... or lm-eval:wmdp_bio,wmdp_cyber.
        batch_size: batch size of generation and scoring.
        limit: score only the first N questions of each set (quick runs); 0 = all.
        max_length: perplexity window in tokens.
        dtype: precision the model is evaluated in: float32 or bfloat16.
        mcq_format: how a local multiple-choice set is scored: cloze (choice texts) or letters (A-D, lm-eval's
            mmlu/wmdp format).

    Returns:
        results: JSON {"model_key", "criteria": {"forget": {criterion: value}}} (also stored in the checkpoint store).
    """
    from collections import namedtuple

    from components.runtime import run_evaluation

    options = dict(batch_size=batch_size, limit=limit, max_length=max_length, dtype=dtype, mcq_format=mcq_format)
    results = run_evaluation(model, ["forget"], dict(forget_mcq=forget_mcq), options, metrics)
    return namedtuple("Outputs", ["results"])(results)

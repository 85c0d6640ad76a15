"""Component: evaluate one model with several evaluators -- one load, one Metrics artifact."""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    metrics: Output[Metrics],
    evaluators: List[str] = ["edit", "utility", "forget", "perplexity", "compression"],
    edits: str = "",
    num_edits: int = -1,
    edit_seed: int = -1,
    edit_batch: int = -1,
    edits_from: str = "recipe",
    utility_mcq: str = "builtin",
    forget_mcq: str = "builtin",
    perplexity: str = "builtin",
    batch_size: int = 16,
    limit: int = 0,
    max_length: int = 256,
    dtype: str = "bfloat16",
    mcq_format: str = "cloze",
) -> NamedTuple("Outputs", [("results", str)]):
    """Load ``model`` once and compute every criterion of ``evaluators``; log them as Metrics.

    Args:
        model: the model to evaluate -- the 'model' output of prepare_base or of an intervention.
        evaluators: any of edit, utility, forget, perplexity, compression.
        edits: zsRE-style edit records: 'builtin', a JSON-lines file or s3://bucket/key; empty = the records the
            model's editing step used ('builtin' for a model never edited).
        num_edits: edits per batch; -1 = as the model's editing step applied (10 for a model never edited).
        edit_seed: seed choosing which records form the batches; -1 = as the editing step (0 if none).
        edit_batch: the edit batch to score; -1 = as the editing step (0 if none).
        edits_from: 'recipe' (default): score the edits the model received, refusing a selection above that
            differs; 'explicit': score the selection given above on purpose.
        utility_mcq: 4-choice utility questions: 'builtin', a file, s3://... or lm-eval:mmlu.
        forget_mcq: 4-choice forget-domain questions: 'builtin', a file, s3://... or lm-eval:wmdp_bio,wmdp_cyber.
        perplexity: held-out text for perplexity: 'builtin', a file or s3://bucket/key.
        batch_size: batch size of generation and scoring.
        limit: score only the first N questions of each set (quick runs); 0 = all.
        max_length: perplexity window in tokens.
        dtype: precision every model is evaluated in: float32 or bfloat16.
        mcq_format: how local multiple-choice sets are scored: cloze (choice texts) or letters (A-D, lm-eval's
            mmlu/wmdp format).

    Returns:
        results: JSON {"model_key", "criteria": {evaluator: {criterion: value}}}; the same results are
            stored in the checkpoint store, where the aggregator reads them.
    """
    from collections import namedtuple

    from components.runtime import run_evaluation

    data = dict(edits=edits, num_edits=num_edits, edit_seed=edit_seed, edit_batch=edit_batch,
                utility_mcq=utility_mcq, forget_mcq=forget_mcq, perplexity=perplexity)
    options = dict(batch_size=batch_size, limit=limit, max_length=max_length, dtype=dtype, mcq_format=mcq_format)
    results = run_evaluation(model, evaluators, data, options, metrics, edits_from)
    return namedtuple("Outputs", ["results"])(results)

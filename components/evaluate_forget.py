"""Component: the `forget` evaluator (see shared/evaluation/)."""

from kfp import dsl
from kfp.dsl import Metrics, Output

from components.image import BASE_IMAGE

EVALUATOR = "forget"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate_forget(store_uri: str, model_source: str, steps: str, data: str, options: str, metrics: Output[Metrics]) -> str:
    """Evaluate the model ``steps`` made from the base model with the `forget` evaluator; output its criteria as JSON and as Metrics."""
    import json

    from shared.execution import evaluate_steps

    criteria = evaluate_steps(store_uri, model_source, steps, "forget", data, options)
    for name, value in criteria.items():
        metrics.log_metric(name, value)
    return json.dumps(criteria)

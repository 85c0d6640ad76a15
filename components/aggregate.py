"""Component: the aggregation step -- results table, composability metrics, report."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def aggregate(
    base_model: Input[Model],
    evaluations: str,
    plan: str,
    data: str,
    options: str,
    report: Output[Markdown],
    report_html: Output[HTML],
    results: Output[Dataset],
) -> str:
    """Collect every evaluation of ``plan`` from the store and write the report; output the report's store key.

    Args:
        base_model: the base model (the 'model' output of prepare_base): names the store and the base digest.
        evaluations: the evaluation results of this run (collect_results' output; '' for an aggregation-only
            run of a sharded study). The table is read from the store, which must hold every result of the plan.
        plan: the study's plan (JSON, from the pipeline builder), or where it is in the store: JSON with its
            key and digest, plan_key and plan_sha256 (compiled studies; shared.plan_store).
        data: the study's data section (JSON).
        options: the evaluation options (JSON).

    The Kubeflow UI shows ``report_html`` (tables and plots in one page) in the
    task's visualizations; ``report`` is the same as Markdown (its plots are
    relative links, complete in the store's copy of the report folder).
    """
    import json
    import shutil
    import tempfile

    from components.runtime import read_model
    from shared.execution import aggregate as run
    from shared.models import known_num_parameters
    from shared.plan_store import resolve_plan
    from shared.store import open_store

    ref = read_model(base_model)
    plan = resolve_plan(ref.store_uri, plan)  # a compiled study passes the plan's store key and digest
    meta = open_store(ref.store_uri).checkpoint_meta(ref.key)
    base_digest = meta["model_digest"]
    received = json.loads(evaluations) if evaluations else []
    received = received if isinstance(received, list) else [received]  # one evaluation needs no collect task
    print(f"aggregating: {len(received)} evaluation task result(s) received from this run")
    with tempfile.TemporaryDirectory() as tmp:
        source = meta.get("source", "")
        model_info = {"source": source, "model_digest": base_digest,
                      "num_parameters": meta.get("num_parameters") or known_num_parameters(source)}
        paths = run(ref.store_uri, base_digest, plan, data, options, tmp, model_info=model_info)
        shutil.copyfile(paths["report"], report.path)
        shutil.copyfile(paths["report_html"], report_html.path)
        shutil.copyfile(paths["results"], results.path)
    return paths["report_key"]

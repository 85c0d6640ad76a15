"""Component: the aggregation step -- results table, composability metrics, report."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Markdown, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def aggregate(
    store_uri: str,
    base_digest: str,
    plan: str,
    data: str,
    options: str,
    report: Output[Markdown],
    report_html: Output[HTML],
    results: Output[Dataset],
) -> str:
    """Collect every evaluation of ``plan`` from the store and write the report; output the report's store key.

    The Kubeflow UI shows ``report_html`` (tables and plots in one page) in the
    task's visualizations; ``report`` is the same as Markdown (its plots are
    relative links, complete in the store's copy of the report folder).
    """
    import shutil
    import tempfile

    from shared.execution import aggregate as run
    from shared.execution import report_key

    with tempfile.TemporaryDirectory() as tmp:
        paths = run(store_uri, base_digest, plan, data, options, tmp)
        shutil.copyfile(paths["report"], report.path)
        shutil.copyfile(paths["report_html"], report_html.path)
        shutil.copyfile(paths["results"], results.path)
    return report_key(base_digest, plan, data, options)

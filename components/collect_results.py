"""Component: gather evaluation results into one list -- the fan-in of a compiled study.

Why: a KFP component cannot take a variable number of inputs, and
``dsl.Collected`` only gathers from inside a ``ParallelFor``.  Compiled
studies evaluate each model in its own task, started by its model's data
edge, so the builder joins their ``results`` outputs with a tree of these
tasks (up to ``FAN_IN`` inputs each) into the aggregator's one input -- a data
edge from every evaluation to the report, with no ``.after()``.
"""

from kfp import dsl

from components.image import BASE_IMAGE

FAN_IN = 16


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def collect_results(
    r0: str = "",
    r1: str = "",
    r2: str = "",
    r3: str = "",
    r4: str = "",
    r5: str = "",
    r6: str = "",
    r7: str = "",
    r8: str = "",
    r9: str = "",
    r10: str = "",
    r11: str = "",
    r12: str = "",
    r13: str = "",
    r14: str = "",
    r15: str = "",
) -> str:
    """Join evaluation results (JSON objects, or JSON lists from another collect_results) into one JSON list.

    Args:
        r0: a results output of evaluate / evaluate_<criterion>, or the output of another collect_results
            ('' = none; r1 ... r15 likewise).
        r1: like r0.
        r2: like r0.
        r3: like r0.
        r4: like r0.
        r5: like r0.
        r6: like r0.
        r7: like r0.
        r8: like r0.
        r9: like r0.
        r10: like r0.
        r11: like r0.
        r12: like r0.
        r13: like r0.
        r14: like r0.
        r15: like r0.

    Returns:
        A JSON list of every result object given, in input order.
    """
    import json

    out = []
    for text in (r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15):
        if not text:
            continue
        value = json.loads(text)
        out.extend(value if isinstance(value, list) else [value])
    return json.dumps(out, sort_keys=True)

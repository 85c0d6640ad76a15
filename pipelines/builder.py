"""Compile an experiment spec into a Kubeflow pipeline.

The plan's prefix tree becomes a static DAG of intervention tasks: one task
per distinct step, a child taking its parent's checkpoint key as input, so it
starts as soon as its own parent is done (no per-depth barrier; a loop per
depth would make each depth wait for the slowest task of the previous one,
and nested loops give wrong values under kfp.local 2.17).

Evaluations are one flat ``ParallelFor`` over the evaluated models (their step
lists are constants of the plan), with one task per evaluator inside; each
evaluator recomputes its model's content-addressed key from the base model's
digest (looked up in the store by model source) and the steps.  They start when all interventions are done and run side by
side (two at a time under kfp.local, which overlaps one task's start-up with
another's compute on a small machine).

Fan-in (a component cannot take a variable number of inputs) goes through
the store: evaluators write results under content-addressed keys that the
aggregator recomputes from the plan it receives as a constant; the aggregator
waits for the whole loop.
"""


import json
from typing import Any, Callable, Optional

from kfp import dsl

from components import evaluator_component, intervention_component
from components.aggregate import aggregate
from components.prepare_base import prepare_base
from shared.planner import Plan, build_plan, describe_step
from shared.spec import ExperimentSpec


def evaluation_options(spec: ExperimentSpec) -> dict[str, Any]:
    """Options every evaluator task receives (they key cached results)."""
    ev = spec.evaluation
    return {"batch_size": ev.batch_size, "limit": ev.limit, "max_length": ev.max_length, "dtype": ev.dtype}


def pipeline_name(spec: ExperimentSpec) -> str:
    return f"lmcompose-{spec.name}"


#: Kubernetes objects from manifests/base that give tasks access to an S3 store
S3_SECRET = "lmcompose-s3-credentials"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
STORE_CONFIG_MAP = "lmcompose-store"
STORE_CONFIG_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION")


def attach_store_access(task: Any, secret: str = S3_SECRET, config_map: str = STORE_CONFIG_MAP) -> None:
    """Give a task the S3 credentials (from a Secret) and endpoint (from a ConfigMap) as env vars.

    Credentials never become pipeline parameters, so they never appear in the
    compiled YAML or the KFP UI -- only the Secret's name does.
    """
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in S3_SECRET_KEYS})
    kubernetes.use_config_map_as_env(
        task, config_map_name=config_map, config_map_key_to_env={k: k for k in STORE_CONFIG_KEYS}, optional=True
    )


def build_pipeline(
    spec: ExperimentSpec, store_uri: str, plan: Optional[Plan] = None, kubernetes: Optional[bool] = None
) -> Callable[..., Any]:
    """A ``@dsl.pipeline`` function running ``spec`` against the store at ``store_uri``.

    ``kubernetes`` adds the cluster-only task settings (S3 credentials from a
    Secret); by default they are added when the store is on S3.  kfp.local
    ignores them, so the local driver switches them off.
    """
    plan = plan or build_plan(spec)
    if kubernetes is None:
        kubernetes = store_uri.startswith("s3://")
    all_tasks: list[Any] = []
    # one data JSON per edit batch: the tasks of batch b read edit batch b
    batch_data = [spec.data.for_batch(b).model_dump_json() for b in range(plan.num_batches)]
    data_json = batch_data[0]
    options_json = json.dumps(evaluation_options(spec), sort_keys=True)
    plan_json = json.dumps(plan.to_json(), sort_keys=True)
    batched = plan.num_batches > 1

    def batch_label(b: int) -> str:
        return f" [batch {b}]" if batched else ""

    @dsl.pipeline(name=pipeline_name(spec), description=spec.description or f"lm-compose experiment {spec.name}")
    def pipeline(store_uri: str = store_uri) -> None:
        base = prepare_base(store_uri=store_uri, model_source=spec.model, trust_remote_code=spec.trust_remote_code)
        base.set_display_name("base model")
        all_tasks.append(base)
        base_digest = base.outputs["base_digest"]
        # (node id, batch) -> checkpoint key; a node whose steps do not read the edits is
        # computed once (batch 0) and shared by every batch
        keys = {("base", 0): base.outputs["model_key"]}
        interventions = [base]
        for node in plan.step_nodes:
            step = node.steps[-1]
            for b in range(plan.batches_of(node)):
                parent = keys.get((node.parent, b), keys.get((node.parent, 0)))
                task = intervention_component(step["method"])(
                    store_uri=store_uri,
                    base_digest=base_digest,
                    parent_key=parent,
                    steps=json.dumps(node.steps, sort_keys=True),
                    data=batch_data[b],
                    trust_remote_code=spec.trust_remote_code,
                )
                task.set_display_name(
                    " > ".join(describe_step(s, plan.sweeps.get(s["method"])) for s in node.steps)
                    + (batch_label(b) if plan.batches_of(node) > 1 else "")
                )
                keys[(node.id, b)] = task.output
                interventions.append(task)
                all_tasks.append(task)
        # evaluations: loops over the evaluated models (constant step lists), the evaluators inside;
        # they start once all interventions are done and run side by side (kfp.local: two at a time).
        # Batch 0 evaluates everything; a further batch re-evaluates what depends on its edits only.
        evaluations = []
        for b in range(plan.num_batches):
            if b == 0:  # every model, every evaluator
                groups = [(list(plan.evaluated_nodes), list(plan.evaluators))]
            else:  # models edited with batch b: everything; shared models: the evaluators reading the edits
                dependent = [n for n in plan.evaluated_nodes if plan.batches_of(n) > 1]
                shared = [n for n in plan.evaluated_nodes if plan.batches_of(n) == 1]
                groups = [
                    (dependent, list(plan.evaluators)),
                    (shared, [e for e in plan.evaluators if shared and plan.evaluation_batches(shared[0], e) > 1]),
                ]
            for nodes, evaluators in groups:
                if not nodes or not evaluators:
                    continue
                with dsl.ParallelFor(items=[json.dumps(n.steps, sort_keys=True) for n in nodes],
                                     parallelism=spec.evaluation.parallelism) as steps:
                    for name in evaluators:
                        # the base model is named by its source, not by prepare_base's output: kfp.local 2.17
                        # hands a loop body the loop item in place of an outer task's output parameter
                        task = evaluator_component(name)(
                            store_uri=store_uri, model_source=spec.model, steps=steps, data=batch_data[b],
                            options=options_json,
                        )
                        task.set_display_name(f"eval {name}{batch_label(b)}")
                        task.after(*interventions)
                        evaluations.append(task)
                        all_tasks.append(task)
        agg = aggregate(store_uri=store_uri, base_digest=base_digest, plan=plan_json, data=data_json, options=options_json)
        agg.set_display_name("composability report")
        agg.after(*evaluations)
        all_tasks.append(agg)
        if kubernetes:
            for task in all_tasks:
                attach_store_access(task)

    return pipeline


def compile_pipeline(spec: ExperimentSpec, store_uri: str, output: str) -> None:
    """Write the pipeline YAML (IR) of ``spec`` to ``output``."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(spec, store_uri), package_path=output)

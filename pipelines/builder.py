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
from components.image import CPU_IMAGE
from components.prepare_base import prepare_base
from pipelines.kfp_speedups import kfp_setters_without_source_lookup
from shared.cluster import ClusterConfig
from shared.planner import Plan, build_plan, describe_step, partition
from shared.spec import ExperimentSpec


def evaluation_options(spec: ExperimentSpec) -> dict[str, Any]:
    """Options every evaluator task receives (they key cached results)."""
    ev = spec.evaluation
    return {"batch_size": ev.batch_size, "limit": ev.limit, "max_length": ev.max_length, "dtype": ev.dtype}


def pipeline_name(spec: ExperimentSpec, shard: Optional[tuple[int, int]] = None, aggregate_only: bool = False) -> str:
    """``lmcompose-<name>``; shards and the aggregation run of a sharded study get a suffix."""
    if aggregate_only:
        return f"lmcompose-{spec.name}-aggregate"
    if shard and shard[1] > 1:
        return f"lmcompose-{spec.name}-shard-{shard[0] + 1}-of-{shard[1]}"
    return f"lmcompose-{spec.name}"


#: Kubernetes objects that give tasks access to an S3 store (manifests/credentials makes the Secret,
#: manifests/base the ConfigMap; the names can be changed per cluster: cluster.s3_secret / store_config_map)
S3_SECRET = "lmcompose-s3-credentials"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
STORE_CONFIG_MAP = "lmcompose-store"
STORE_CONFIG_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION")


#: where a cluster task mounts its scratch volume (checkpoint cache, hub cache)
SCRATCH = "/scratch"


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


def place_task(task: Any, component: str, family: str, cluster: ClusterConfig, s3: bool) -> None:
    """Apply the cluster settings of ``component`` to one task.

    GPU tasks request their accelerator and land on the GPU nodes (node
    selector + tolerations); CPU-only tasks run the CPU image on
    ``cpu_node_selector`` nodes.  Every task gets retries with exponential
    backoff, a timeout, a scratch volume for its checkpoint cache (an 8B
    checkpoint is 16 GB: the container's own disk is not meant for that), the
    store's credentials and endpoint by reference and, if configured, a hub
    token by reference.  KFP's own caching is off: the store is the cache
    (a step finds its finished checkpoint and returns at once), and a KFP
    cache hit could skip a step whose checkpoint was deleted from the store.
    """
    with kfp_setters_without_source_lookup():
        _apply_placement(task, component, family, cluster, s3)


def _apply_placement(task: Any, component: str, family: str, cluster: ClusterConfig, s3: bool) -> None:
    """The body of :func:`place_task`."""
    from kfp import kubernetes

    res = cluster.resources_for(component, family)
    if res.cpu:
        task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    if res.memory:
        task.set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.uses_gpu:
        task.set_accelerator_type(res.accelerator_type or "nvidia.com/gpu").set_accelerator_limit(res.accelerator_count)
        for key, value in cluster.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for tol in cluster.tolerations:
            kubernetes.add_toleration(
                task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect,
                toleration_seconds=tol.toleration_seconds,
            )
    else:
        task.set_container_image(CPU_IMAGE)
        for key, value in cluster.cpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
    if cluster.retries:
        task.set_retry(num_retries=cluster.retries, backoff_duration=f"{cluster.backoff_seconds}s", backoff_factor=2.0)
    kubernetes.set_timeout(task, seconds=int(cluster.timeout_hours * 3600))
    kubernetes.empty_dir_mount(task, volume_name="scratch", mount_path=SCRATCH, size_limit=cluster.scratch_size)
    task.set_env_variable("LMCOMPOSE_CACHE", f"{SCRATCH}/cache")
    task.set_env_variable("HF_HOME", f"{SCRATCH}/huggingface")
    task.set_caching_options(False)
    if s3:
        attach_store_access(task, cluster.s3_secret, cluster.store_config_map)
    if cluster.hf_token_secret:
        kubernetes.use_secret_as_env(task, secret_name=cluster.hf_token_secret, secret_key_to_env={"HF_TOKEN": "HF_TOKEN"})
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, cluster.image_pull_secrets)


def build_pipeline(
    spec: ExperimentSpec,
    store_uri: str,
    plan: Optional[Plan] = None,
    kubernetes: Optional[bool] = None,
    cluster: Optional[ClusterConfig] = None,
    shard: Optional[tuple[int, int]] = None,
    aggregate_only: bool = False,
) -> Callable[..., Any]:
    """A ``@dsl.pipeline`` function running ``spec`` against the store at ``store_uri``.

    ``kubernetes`` adds the cluster task settings of ``cluster`` (default: the
    spec's) to every task -- resources, GPU placement, retries, scratch
    volume, and the S3 credentials from a Secret when the store is on S3; by
    default they are added when the store is on S3.  kfp.local ignores them,
    so the local driver switches them off.

    ``shard=(i, n)`` builds run ``i`` of ``n``: the subtrees of the plan
    :func:`shared.planner.partition` gives it, their evaluations, no report;
    ``aggregate_only`` builds the run that reports on the whole plan from
    the store once every shard is done.  Without either, one run does it all.
    """
    plan = plan or build_plan(spec)
    if kubernetes is None:
        kubernetes = store_uri.startswith("s3://")
    cluster = cluster or spec.cluster_config()
    s3 = store_uri.startswith("s3://")
    owned: Optional[set[tuple[str, int]]] = None  # (node id, edit batch) pairs of this run; None: everything
    if aggregate_only:
        owned = set()
    elif shard is not None and shard[1] > 1:
        owned = partition(plan, shard[1])[shard[0]]
    with_report = aggregate_only or shard is None or shard[1] == 1
    all_tasks: list[tuple[Any, str, str]] = []  # (task, component name, resource family)
    # one data JSON per edit batch: the tasks of batch b read edit batch b
    batch_data = [spec.data.for_batch(b).model_dump_json() for b in range(plan.num_batches)]
    data_json = batch_data[0]
    options_json = json.dumps(evaluation_options(spec), sort_keys=True)
    plan_json = json.dumps(plan.to_json(), sort_keys=True)
    batched = plan.num_batches > 1

    def batch_label(b: int) -> str:
        return f" [batch {b}]" if batched else ""

    description = spec.description or f"lm-compose experiment {spec.name}"
    if owned is not None:
        description += " (aggregation run)" if aggregate_only else f" (run {shard[0] + 1} of {shard[1]})"

    @dsl.pipeline(name=pipeline_name(spec, shard, aggregate_only), description=description)
    def pipeline(store_uri: str = store_uri) -> None:
        base = prepare_base(store_uri=store_uri, model_source=spec.model, trust_remote_code=spec.trust_remote_code)
        base.set_display_name("base model")
        all_tasks.append((base, "prepare_base", "default"))
        base_digest = base.outputs["base_digest"]
        # (node id, batch) -> checkpoint key; a node whose steps do not read the edits is
        # computed once (batch 0) and shared by every batch
        keys = {("base", 0): base.outputs["model_key"]}
        interventions = [base]
        for node in plan.step_nodes:
            step = node.steps[-1]
            for b in range(plan.batches_of(node)):
                if owned is not None and (node.id, b) not in owned:
                    continue
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
                all_tasks.append((task, step["method"], _family(step["method"])))
        # evaluations: loops over the evaluated models (constant step lists), the evaluators inside;
        # they start once all interventions are done and run side by side (kfp.local: two at a time).
        # Batch 0 evaluates everything; a further batch re-evaluates what depends on its edits only.
        evaluations = []
        for b in range(plan.num_batches):
            evaluated = [n for n in plan.evaluated_nodes if owned is None or (n.id, b) in owned]
            if b == 0:  # every model, every evaluator
                groups = [(list(evaluated), list(plan.evaluators))]
            else:  # models edited with batch b: everything; shared models: the evaluators reading the edits
                dependent = [n for n in evaluated if plan.batches_of(n) > 1]
                shared = [n for n in evaluated if plan.batches_of(n) == 1]
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
                        all_tasks.append((task, f"evaluate_{name}", "evaluate"))
        if with_report:
            agg = aggregate(
                store_uri=store_uri, base_digest=base_digest, plan=plan_json, data=data_json, options=options_json
            )
            agg.set_display_name("composability report")
            if evaluations:
                agg.after(*evaluations)
            all_tasks.append((agg, "aggregate", "default"))
        if kubernetes:
            for task, component, family in all_tasks:
                place_task(task, component, family, cluster, s3)

    return pipeline


def _family(method: str) -> str:
    """The resource family of an intervention: its category (edit, unlearn, compress)."""
    from shared.interventions import get_intervention

    return get_intervention(method).category.value


def compile_pipeline(
    spec: ExperimentSpec,
    store_uri: str,
    output: str,
    cluster: Optional[ClusterConfig] = None,
    shard: Optional[tuple[int, int]] = None,
    aggregate_only: bool = False,
    plan: Optional[Plan] = None,
) -> None:
    """Write the pipeline YAML (IR) of ``spec`` -- or of one shard / the aggregation run -- to ``output``.

    A compiled pipeline is for a cluster, so it always carries the cluster
    task settings (``cluster``, default: the spec's).
    """
    from kfp import compiler

    pipeline = build_pipeline(
        spec, store_uri, plan=plan, kubernetes=True, cluster=cluster, shard=shard, aggregate_only=aggregate_only
    )
    compiler.Compiler().compile(pipeline, package_path=output)


def compile_study(
    spec: ExperimentSpec, store_uri: str, out_dir: str, cluster: Optional[ClusterConfig] = None
) -> list[str]:
    """Compile every run of a study: one file, or ``cluster.shards`` shard files plus the aggregation run.

    Returns the paths in submission order (the aggregation run last).
    """
    from pathlib import Path

    cluster = cluster or spec.cluster_config()
    plan = build_plan(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = cluster.shards
    if n == 1:
        path = out / f"{spec.name}.pipeline.yaml"
        compile_pipeline(spec, store_uri, str(path), cluster, plan=plan)
        return [str(path)]
    partition(plan, n)  # fails early, naming the number of subtrees, if n is too large
    paths = []
    for i in range(n):
        path = out / f"{spec.name}.shard-{i + 1}-of-{n}.pipeline.yaml"
        compile_pipeline(spec, store_uri, str(path), cluster, shard=(i, n), plan=plan)
        paths.append(str(path))
    path = out / f"{spec.name}.aggregate.pipeline.yaml"
    compile_pipeline(spec, store_uri, str(path), cluster, aggregate_only=True, plan=plan)
    paths.append(str(path))
    return paths

"""Compile an experiment spec into a Kubeflow pipeline.

The plan's prefix tree becomes a static DAG that follows the data:

* ``prepare_base`` outputs the base model as a ``Model`` artifact;
* one intervention task per distinct step, taking its parent's ``Model``
  output as input and the step's hyperparameters as typed arguments, so it
  starts as soon as its own parent is done (no per-depth barrier);
* one ``evaluate`` task per evaluated model (per edit batch where the edits
  matter), fed by that model's artifact: it loads the model once, computes
  every criterion and starts as soon as the model exists;
* fan-in: the evaluations' ``results`` outputs are joined by a tree of
  ``collect_results`` tasks (a component cannot take a variable number of
  inputs) into the aggregator's single input, so the report waits for every
  evaluation through data edges.  The aggregator reads the results from the
  store under content-addressed keys recomputed from the plan, and fails if
  one is missing.

No ``.after()`` anywhere: every dependency is a data edge.
"""


import json
import re
from typing import Any, Callable, Optional

from kfp import dsl

from components import intervention_component
from components.aggregate import aggregate
from components.collect_results import FAN_IN, collect_results
from components.evaluate import evaluate
from components.image import CPU_IMAGE
from components.prepare_base import prepare_base
from pipelines.kfp_speedups import kfp_setters_without_source_lookup
from shared.cluster import ClusterConfig
from shared.planner import Plan, build_plan, describe_step, partition
from shared.spec import ExperimentSpec


def evaluation_options(spec: ExperimentSpec) -> dict[str, Any]:
    """Options every evaluator task receives (they key cached results)."""
    ev = spec.evaluation
    options = {"batch_size": ev.batch_size, "limit": ev.limit, "max_length": ev.max_length, "dtype": ev.dtype}
    if ev.mcq_format != "cloze":  # the default is left out of compiled arguments (result keys: shared.execution)
        options["mcq_format"] = ev.mcq_format
    return options


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
    else:  # compiled with --local-store on purpose: every pod mounts the folder (see check_store_for_pods)
        task.set_env_variable("LMCOMPOSE_ALLOW_LOCAL_STORE", "1")
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
    from shared.store import check_store_uri

    check_store_uri(store_uri)  # a URI with credentials must never become a pipeline parameter's default
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
        base = prepare_base(model_source=spec.model, store_uri=store_uri, trust_remote_code=spec.trust_remote_code)
        base.set_display_name("base model")
        all_tasks.append((base, "prepare_base", "default"))
        # (node id, batch) -> Model output; a node whose steps do not read the edits is
        # computed once (batch 0) and shared by every batch
        models = {("base", 0): base.outputs["model"]}
        for node in plan.step_nodes:
            step = node.steps[-1]
            for b in range(plan.batches_of(node)):
                if owned is not None and (node.id, b) not in owned:
                    continue
                parent = models.get((node.parent, b), models.get((node.parent, 0)))
                task = intervention_component(step["method"])(
                    model=parent, **step_arguments(spec, step, b), trust_remote_code=spec.trust_remote_code
                )
                task.set_display_name(
                    " > ".join(describe_step(s, plan.sweeps.get(s["method"])) for s in node.steps)
                    + (batch_label(b) if plan.batches_of(node) > 1 else "")
                )
                models[(node.id, b)] = task.outputs["model"]
                all_tasks.append((task, step["method"], _family(step["method"])))
        # evaluations: one task per evaluated model and edit batch, fed by the model's artifact.
        # Batch 0 evaluates everything; a further batch re-evaluates what depends on its edits only.
        results = []
        for node in plan.evaluated_nodes:
            for b in range(plan.num_batches):
                if owned is not None and (node.id, b) not in owned:
                    continue
                evaluators = [e for e in plan.evaluators if b == 0 or plan.evaluation_batches(node, e) > 1]
                if not evaluators:
                    continue
                model = models.get((node.id, b), models.get((node.id, 0)))
                task = evaluate(model=model, **evaluation_arguments(spec, evaluators, b))
                label = " > ".join(describe_step(s, plan.sweeps.get(s["method"])) for s in node.steps) or "base"
                task.set_display_name(f"eval {label}{batch_label(b)}")
                results.append(task.outputs["results"])
                all_tasks.append((task, "evaluate", "evaluate"))
        if with_report:
            joined = fan_in(results, all_tasks)
            agg = aggregate(
                base_model=base.outputs["model"], evaluations=joined, plan=plan_json, data=data_json,
                options=options_json,
            )
            agg.set_display_name("composability report")
            all_tasks.append((agg, "aggregate", "default"))
        if kubernetes:
            for task, component, family in all_tasks:
                place_task(task, component, family, cluster, s3)

    return pipeline


def step_arguments(spec: ExperimentSpec, step: dict[str, Any], batch: int) -> dict[str, Any]:
    """The typed arguments of one intervention task: the step's parameters and the data its method reads.

    ``None`` cannot be a KFP argument: a parameter left at a ``None`` default is
    omitted, one set to ``None`` against a non-``None`` default goes into
    ``set_to_none``.
    """
    from shared.interventions import get_intervention

    method = get_intervention(step["method"])
    fields = method.params_model.model_fields
    args: dict[str, Any] = {}
    to_none = []
    for name, value in step["params"].items():
        if value is None:
            if fields[name].get_default(call_default_factory=True) is not None:
                to_none.append(name)
            continue
        args[name] = value
    if to_none:
        args["set_to_none"] = to_none
    args.update(data_arguments(spec, method.data_inputs, batch))
    return args


def data_arguments(spec: ExperimentSpec, fields: Any, batch: int) -> dict[str, Any]:
    """The typed data inputs for ``fields`` (with the edit batch selection when the edits are read)."""
    args: dict[str, Any] = {}
    for name in fields:
        args[name] = getattr(spec.data, name)
        if name == "edits":
            args.update(num_edits=spec.data.num_edits, edit_seed=spec.data.edit_seed, edit_batch=batch)
    return args


def evaluation_arguments(spec: ExperimentSpec, evaluators: list[str], batch: int) -> dict[str, Any]:
    """Arguments of one ``evaluate`` task (the same options key every result, see :func:`evaluation_options`)."""
    from shared.evaluation import EVALUATOR_DATA

    fields = list(dict.fromkeys(n for e in evaluators for n in EVALUATOR_DATA[e]))
    args: dict[str, Any] = {"evaluators": list(evaluators), **data_arguments(spec, fields, batch)}
    args.update({k: v for k, v in evaluation_options(spec).items() if v is not None})
    return args


def fan_in(outputs: list[Any], all_tasks: list[tuple[Any, str, str]]) -> Any:
    """Join task outputs into one through a tree of ``collect_results`` tasks (``FAN_IN`` inputs each).

    Returns the joined output, one output as it is, or ``""`` for none.
    """
    level = list(outputs)
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level), FAN_IN):
            group = level[i:i + FAN_IN]
            task = collect_results(**{f"r{j}": out for j, out in enumerate(group)})
            task.set_display_name("collect results")
            all_tasks.append((task, "collect_results", "default"))
            nxt.append(task.output)
        level = nxt
    return level[0] if level else ""


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
    compact_compiled(output)


_DOCSTRING = re.compile(r'(\) -> [^\n]*:\n)    """.*?"""\n', re.DOTALL)


def compact_compiled(path: str) -> None:
    """Drop the component docstrings and input descriptions from a compiled study pipeline.

    KFP compiles one component and one executor per task (each task has its
    own resources), and each carries its component's descriptions and, in the
    embedded source, its docstring -- about 4 KB per task, which would make the
    largest run of the editing x compression study 1 MB (Argo stores a
    workflow in etcd, whose default limit is 1.5 MiB).  The descriptions stay
    in the standalone component YAMLs (components/yaml/), which are what a
    user reads; a study's pipeline only runs the components.
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the Python parser would take minutes
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    with open(path) as fh:
        text = fh.read()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))  # KFP's summary comment
    docs = list(yaml.load_all(text, Loader=loader))
    ir = docs[0]
    for comp in ir.get("components", {}).values():
        for side in ("inputDefinitions", "outputDefinitions"):
            for kind in ("parameters", "artifacts"):
                for entry in comp.get(side, {}).get(kind, {}).values():
                    entry.pop("description", None)
    for executor in ir.get("deploymentSpec", {}).get("executors", {}).values():
        command = executor.get("container", {}).get("command", [])
        executor["container"]["command"] = [_DOCSTRING.sub(r"\1", c, count=1) if "def " in c else c for c in command]
    with open(path, "w") as fh:
        fh.write(header)
        yaml.dump_all(docs, fh, Dumper=dumper, sort_keys=True)


def compile_study(
    spec: ExperimentSpec, store_uri: str, out_dir: str, cluster: Optional[ClusterConfig] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[str]:
    """Compile every run of a study: one file, or ``cluster.shards`` shard files plus the aggregation run.

    Returns the paths in submission order (the aggregation run last).  ``progress``
    receives a line per file written (a 40-shard study takes tens of seconds).
    """
    say = progress or (lambda _line: None)
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
        say(f"compiled run {i + 1} of {n + 1}: {path.name}")
    path = out / f"{spec.name}.aggregate.pipeline.yaml"
    compile_pipeline(spec, store_uri, str(path), cluster, aggregate_only=True, plan=plan)
    paths.append(str(path))
    return paths

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
from typing import Any, Callable, Iterable, Optional

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
    plan_arg: Optional[str] = None,
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

    ``plan_arg`` is what the aggregator receives as its plan: by default the
    plan's JSON; compiled pipelines pass a reference to the plan in the store
    (:func:`shared.plan_store.plan_reference`), so the aggregation run's size
    does not grow with the study.
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
    plan_json = plan_arg or json.dumps(plan.to_json(), sort_keys=True)
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
    plan_arg: Optional[str] = None,
) -> tuple[dict, dict]:
    """Write the pipeline YAML (IR) of ``spec`` -- or of one shard / the aggregation run -- to ``output``.

    A compiled pipeline is for a cluster, so it always carries the cluster
    task settings (``cluster``, default: the spec's), and its aggregator
    reads the plan from the store (``plan_arg``, default: the reference of
    :func:`shared.plan_store.plan_reference`; the plan must be put there
    before the run reports -- ``lmcompose submit`` does, ``lmcompose
    compile`` writes the file to upload).  Returns the written documents
    (pipeline spec, platform spec).
    """
    from kfp import compiler

    from shared.plan_store import plan_reference

    plan = plan or build_plan(spec)
    pipeline = build_pipeline(
        spec, store_uri, plan=plan, kubernetes=True, cluster=cluster, shard=shard, aggregate_only=aggregate_only,
        plan_arg=plan_arg or plan_reference(plan.to_json()),
    )
    compiler.Compiler().compile(pipeline, package_path=output)
    return compact_compiled(output)


_DOCSTRING = re.compile(r'(\) -> [^\n]*:\n)    """.*?"""\n', re.DOTALL)


def compact_compiled(path: str) -> tuple[dict, dict]:
    """Take out of a compiled study pipeline what costs bytes in every task and changes nothing it does.

    Argo keeps a run's whole workflow in one Kubernetes object, which must
    stay under Argo's 1 MiB at the end of the run and under etcd's 1.5 MiB
    (docs/cost-model.md, "Workflow size"); every byte per task counts
    hundreds of times.  What goes, measured on the paper's largest run:

    * the components' docstrings and input descriptions (KFP copies them into
      every task's component and embedded source; they stay in the
      standalone component YAMLs, components/yaml/, which are what a user
      reads);
    * the deprecated ``secretName`` / ``configMapName`` that kfp-kubernetes
      writes next to ``secretNameParameter`` / ``configMapNameParameter``:
      KFP backends read the parameter form since 2.5.0;
    * task arguments equal to the component's default: an optional input
      without a value gets the function's default, the same value;
    * identical copies of a component: KFP writes one component, executor
      and Kubernetes config per task, and the Argo compiler of the KFP
      backend shares component specs by container but stores a Kubernetes
      config per component name; tasks with equal component, container and
      Kubernetes settings now share one.

    Returns the documents written (pipeline spec, platform spec).
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the Python parser would take minutes
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    with open(path) as fh:
        text = fh.read()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))  # KFP's summary comment
    docs = list(yaml.load_all(text, Loader=loader))
    ir = docs[0]
    platform = docs[1] if len(docs) > 1 else {}
    for comp in ir.get("components", {}).values():
        for side in ("inputDefinitions", "outputDefinitions"):
            for kind in ("parameters", "artifacts"):
                for entry in comp.get(side, {}).get(kind, {}).values():
                    entry.pop("description", None)
    for executor in ir.get("deploymentSpec", {}).get("executors", {}).values():
        command = executor.get("container", {}).get("command", [])
        executor["container"]["command"] = [_DOCSTRING.sub(r"\1", c, count=1) if "def " in c else c for c in command]
    k8s = ((platform.get("platforms") or {}).get("kubernetes") or {}).get("deploymentSpec", {}).get("executors", {})
    for config in k8s.values():
        for entry in config.get("secretAsEnv", []):
            if entry.get("secretNameParameter"):
                entry.pop("secretName", None)
        for entry in config.get("configMapAsEnv", []):
            if entry.get("configMapNameParameter"):
                entry.pop("configMapName", None)
    _drop_default_arguments(ir)
    _share_identical_components(ir, k8s)
    with open(path, "w") as fh:
        fh.write(header)
        yaml.dump_all(docs, fh, Dumper=dumper, sort_keys=True)
    return ir, platform


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values: ``1`` is ``1.0`` (protobuf numbers are doubles), ``False`` is not ``0``."""
    def norm(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return [norm(x) for x in v] if isinstance(v, list) else (
                {k: norm(x) for k, x in v.items()} if isinstance(v, dict) else v)
        return float(v)

    return json.dumps(norm(a), sort_keys=True) == json.dumps(norm(b), sort_keys=True)


def _drop_default_arguments(ir: dict) -> None:
    """Remove constant task arguments equal to their optional input's default (the component applies it)."""
    components = ir.get("components", {})

    def tasks_of(dag: dict) -> Iterable[dict]:
        return dag.get("tasks", {}).values()

    dags = [ir.get("root", {}).get("dag", {})] + [c["dag"] for c in components.values() if "dag" in c]
    for dag in dags:
        for task in tasks_of(dag):
            inputs = components.get(task.get("componentRef", {}).get("name"), {}).get("inputDefinitions", {})
            params = task.get("inputs", {}).get("parameters", {})
            for name in list(params):
                spec = inputs.get("parameters", {}).get(name, {})
                value = params[name].get("runtimeValue", {})
                if spec.get("isOptional") and "defaultValue" in spec and "constant" in value \
                        and _same(value["constant"], spec["defaultValue"]):
                    del params[name]
            if "parameters" in task.get("inputs", {}) and not params:
                del task["inputs"]["parameters"]


def _share_identical_components(ir: dict, k8s: dict) -> None:
    """Point tasks whose component, container and Kubernetes config are equal at one copy; drop the others."""
    components = ir.get("components", {})
    executors = ir.get("deploymentSpec", {}).get("executors", {})
    first: dict[str, str] = {}
    rename: dict[str, str] = {}
    for name in sorted(components, key=lambda n: (re.sub(r"-\d+$", "", n), _suffix(n))):
        comp = components[name]
        label = comp.get("executorLabel")
        if label is None or label not in executors:
            continue
        identity = json.dumps([{k: v for k, v in comp.items() if k != "executorLabel"}, executors[label],
                               k8s.get(label)], sort_keys=True)
        if identity in first:
            rename[name] = first[identity]
        else:
            first[identity] = name
    if not rename:
        return
    for comp in [ir.get("root", {})] + list(components.values()):
        for task in comp.get("dag", {}).get("tasks", {}).values():
            ref = task.get("componentRef", {})
            if ref.get("name") in rename:
                ref["name"] = rename[ref["name"]]
    for name in rename:
        label = components.pop(name)["executorLabel"]
        executors.pop(label, None)
        k8s.pop(label, None)


def _suffix(name: str) -> int:
    match = re.search(r"-(\d+)$", name)
    return int(match.group(1)) if match else 1


class StudyFiles(list):
    """The compiled pipeline files of a study, in submission order (the aggregation run last), and what they hold.

    Attributes: ``shards`` (runs the study is split into), ``sizes``
    (:class:`pipelines.workflow_size.RunSize` per file), ``plan_file`` (the
    sealed plan, to upload to the store), ``plan_key`` (its store key).
    """

    def __init__(self, paths: Iterable[str] = ()) -> None:
        super().__init__(paths)
        self.shards: int = 1
        self.sizes: list = []
        self.plan_file = ""
        self.plan_key = ""


class WorkflowTooLarge(ValueError):
    """A run whose Argo workflow is expected to exceed the budget (``cluster.workflow_budget_bytes``)."""


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB"


def too_large_message(size: Any, budget: int, fitting: Optional[int], predicted: bool = False) -> str:
    """One line: the run, its expected size, the budget, and the ``--shards`` that would fit."""
    from shared.cluster import ARGO_MAX_WORKFLOW_BYTES

    fix = (f"use --shards {fitting} (cluster.shards: {fitting}, or auto)" if fitting
           else "no number of shards fits: split the study into several specs")
    created = "" if predicted else f" ({_kib(size.created_bytes)} on creation)"
    about = "about " if predicted else ""
    return (f"shards: run {size.name} ({size.tasks} tasks) is expected to reach {about}{_kib(size.end_bytes)} at the "
            f"end of its run{created}, over the budget of {_kib(budget)} (cluster.workflow_budget_bytes; Argo errors "
            f"a workflow over {ARGO_MAX_WORKFLOW_BYTES / 2**20:g} MiB): {fix}")


def run_names(spec: ExperimentSpec, shards: int) -> list[str]:
    """The file stems of a study's runs in submission order (shards, then the aggregation run)."""
    if shards == 1:
        return [spec.name]
    return [f"{spec.name}.shard-{i + 1}-of-{shards}" for i in range(shards)] + [f"{spec.name}.aggregate"]


def measure_run(
    spec: ExperimentSpec, store_uri: str, cluster: ClusterConfig, plan: Plan, shards: int, index: int,
) -> Any:
    """Compile run ``index`` of ``spec`` split into ``shards`` runs and model its size (``index == shards``: the
    aggregation run)."""
    import tempfile

    from pipelines.workflow_size import measure

    kwargs: dict[str, Any] = {}
    if shards > 1:
        kwargs = {"aggregate_only": True} if index == shards else {"shard": (index, shards)}
    with tempfile.TemporaryDirectory() as tmp:
        ir, platform = compile_pipeline(spec, store_uri, f"{tmp}/run.yaml", cluster, plan=plan, **kwargs)
    return measure(ir, platform, run_names(spec, shards)[index])


def _largest(plan: Plan, shards: int) -> tuple[int, int]:
    """(index, tasks) of the run of ``shards`` with the most tasks."""
    from shared.planner import shard_tasks

    tasks = shard_tasks(plan, shards)
    top = max(tasks)
    return tasks.index(top), top


class SizePredictor:
    """Expected end-of-run size of a run from its task count: a line through the runs of this study measured so far.

    Before two runs of different sizes are measured, the slope is the
    per-task size of the paper studies' runs (:data:`PER_TASK_BYTES`).
    """

    #: bytes per task and fixed bytes at the end of a run, from the paper studies' compiled runs (docs/cost-model.md)
    PER_TASK_BYTES = 6_500
    FIXED_BYTES = 30_000

    def __init__(self) -> None:
        self.points: dict[int, int] = {}

    def add(self, tasks: int, end_bytes: int) -> None:
        self.points[tasks] = max(end_bytes, self.points.get(tasks, 0))

    def __call__(self, tasks: int) -> float:
        pts = sorted(self.points.items())
        if len(pts) >= 2:
            (t0, b0), (t1, b1) = pts[0], pts[-1]
            slope = (b1 - b0) / (t1 - t0)
            if slope > 0:
                return b1 + slope * (tasks - t1)
        if pts:
            t1, b1 = pts[-1]
            return b1 + self.PER_TASK_BYTES * (tasks - t1)
        return self.FIXED_BYTES + self.PER_TASK_BYTES * tasks


def fitting_shards(plan: Plan, predict: Any, budget: int, at_least: int = 1) -> Optional[int]:
    """The fewest shards (from ``at_least``) whose largest run is predicted to fit ``budget``; None if none does."""
    from shared.planner import max_shards

    limit = max_shards(plan)
    for n in range(max(at_least, 1), limit + 1):
        if predict(_largest(plan, n)[1]) <= budget:
            return n
    return None


def choose_shards(
    spec: ExperimentSpec, store_uri: str, cluster: ClusterConfig, plan: Plan,
    progress: Optional[Callable[[str], None]] = None,
) -> tuple[int, Any]:
    """``cluster.shards: auto``: the fewest runs whose largest run is expected to fit the budget.

    Compiles and measures the largest run of a candidate count (by tasks),
    predicts the others from the sizes measured (:class:`SizePredictor`),
    and confirms the answer by measuring it: usually two or three compiled
    runs.  Returns the count and the measured size of its largest run.
    Raises :class:`WorkflowTooLarge` if even the most shards do not fit.
    """
    say = progress or (lambda _line: None)
    budget = cluster.workflow_budget_bytes
    predict = SizePredictor()
    measured: dict[int, Any] = {}

    def probe(n: int) -> Any:
        if n not in measured:
            index, _tasks = _largest(plan, n)
            measured[n] = measure_run(spec, store_uri, cluster, plan, n, index)
            predict.add(measured[n].tasks, measured[n].end_bytes)
            say(f"sizing: {n} run(s): the largest ({measured[n].tasks} tasks) is expected to reach "
                f"{_kib(measured[n].end_bytes)} at its end")
        return measured[n]

    from shared.planner import max_shards

    limit = max_shards(plan)
    n = fitting_shards(plan, predict, budget) or limit
    for _ in range(8):
        size = probe(n)
        if size.end_bytes <= budget:
            if n == 1 or (n - 1 in measured and measured[n - 1].end_bytes > budget):
                return n, size
            smaller = fitting_shards(plan, predict, budget)
            if smaller is not None and smaller < n:
                n = smaller
                continue
            if n - 1 not in measured and predict(_largest(plan, n - 1)[1]) <= budget * 1.02:
                n -= 1  # predicted right at the edge: measure it
                continue
            return n, size
        if n >= limit:
            raise WorkflowTooLarge(too_large_message(size, budget, None))
        n = max(n + 1, fitting_shards(plan, predict, budget, at_least=n + 1) or limit)
    best = min((k for k, v in measured.items() if v.end_bytes <= budget), default=None)
    if best is None:
        raise WorkflowTooLarge(too_large_message(measured[max(measured)], budget, None))
    return best, measured[best]


def _suggest(spec: ExperimentSpec, store_uri: str, cluster: ClusterConfig, plan: Plan) -> Optional[int]:
    """The shard count ``auto`` would choose, or None if none fits."""
    try:
        return choose_shards(spec, store_uri, cluster, plan)[0]
    except WorkflowTooLarge:
        return None


def _precheck(spec: ExperimentSpec, store_uri: str, cluster: ClusterConfig, plan: Plan, n: int) -> None:
    """Refuse ``n`` shards without compiling when the largest run is far over the budget (e.g. ``shards: 1``)."""
    from pipelines.workflow_size import RunSize

    index, tasks = _largest(plan, n)
    expected = SizePredictor()(tasks)
    if expected > 1.5 * cluster.workflow_budget_bytes:
        size = RunSize(run_names(spec, n)[index], tasks, 0, int(expected), 0)
        fitting = _suggest(spec, store_uri, cluster, plan)
        raise WorkflowTooLarge(too_large_message(size, cluster.workflow_budget_bytes, fitting, predicted=True))


def size_runs(
    spec: ExperimentSpec, store_uri: str, cluster: ClusterConfig, plan: Plan,
    progress: Optional[Callable[[str], None]] = None,
) -> tuple[int, Any, Any]:
    """(shards, size of the largest run, size of the aggregation run or None), compiling only those runs.

    ``cluster.shards: auto`` chooses the count (:func:`choose_shards`); a
    given count whose largest run is over the budget raises
    :class:`WorkflowTooLarge` with the count that would fit.
    """
    from shared.planner import partition

    if cluster.shards == "auto":
        n, largest = choose_shards(spec, store_uri, cluster, plan, progress=progress)
    else:
        n = int(cluster.shards)
        partition(plan, n)  # names the most shards the plan allows
        _precheck(spec, store_uri, cluster, plan, n)
        largest = measure_run(spec, store_uri, cluster, plan, n, _largest(plan, n)[0])
        if largest.end_bytes > cluster.workflow_budget_bytes:
            raise WorkflowTooLarge(too_large_message(largest, cluster.workflow_budget_bytes,
                                                     _suggest(spec, store_uri, cluster, plan)))
    aggregation = measure_run(spec, store_uri, cluster, plan, n, n) if n > 1 else None
    return n, largest, aggregation


def compile_study(
    spec: ExperimentSpec, store_uri: str, out_dir: str, cluster: Optional[ClusterConfig] = None,
    progress: Optional[Callable[[str], None]] = None, output_file: Optional[str] = None,
) -> StudyFiles:
    """Compile every run of a study: one file, or one file per shard plus the aggregation run.

    ``cluster.shards`` (``auto``: :func:`choose_shards`) says how many runs.
    Every run's workflow size is modelled (:mod:`pipelines.workflow_size`);
    a run over ``cluster.workflow_budget_bytes`` raises
    :class:`WorkflowTooLarge` naming the run and the ``--shards`` that would
    fit -- with ``auto``, the study is compiled again with one more shard.
    The plan the aggregator reads is written beside the files as
    ``<name>.plan.json`` (the sealed document the store holds).

    ``output_file`` writes a study that is one run to that file instead (and
    refuses one that is several, as a file cannot hold them).

    Returns the paths in submission order (the aggregation run last), with
    the sizes (:class:`StudyFiles`).  ``progress`` receives a line per file
    written (a 40-shard study takes tens of seconds).
    """
    say = progress or (lambda _line: None)
    from pathlib import Path

    from pipelines.workflow_size import measure
    from shared.plan_store import plan_key, sealed_plan_bytes
    from shared.planner import partition

    cluster = cluster or spec.cluster_config()
    plan = build_plan(spec)
    budget = cluster.workflow_budget_bytes
    out = Path(output_file).parent if output_file else Path(out_dir)
    auto = cluster.shards == "auto"

    def one_file(n: int) -> None:
        if output_file and n > 1:
            raise ValueError(f"shards: the study is split into {n} runs plus an aggregation run"
                             f"{' (cluster.shards: auto)' if auto else ''}; -o must name a folder for their files, "
                             f"not {output_file}")

    if not auto:
        n = int(cluster.shards)
        one_file(n)
        partition(plan, n)  # fails early, naming the number of subtrees, if n is too large
        _precheck(spec, store_uri, cluster, plan, n)
    else:
        n, _largest_size = choose_shards(spec, store_uri, cluster, plan, progress=say)
        one_file(n)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(output_file).name.removesuffix(".yaml").removesuffix(".yml").removesuffix(".json") \
        .removesuffix(".pipeline") if output_file else spec.name
    plan_file = out / f"{stem}.plan.json"
    plan_file.write_bytes(sealed_plan_bytes(plan.to_json()))
    while True:
        one_file(n)
        paths, sizes = [], []
        for index, name in enumerate(run_names(spec, n)):
            path = Path(output_file) if output_file else out / f"{name}.pipeline.yaml"
            kwargs: dict[str, Any] = {}
            if n > 1:
                kwargs = {"aggregate_only": True} if index == n else {"shard": (index, n)}
            ir, platform = compile_pipeline(spec, store_uri, str(path), cluster, plan=plan, **kwargs)
            size = measure(ir, platform, name)
            paths.append(str(path))
            sizes.append(size)
            say(f"compiled run {index + 1} of {len(run_names(spec, n))}: {path.name} ({size.tasks} tasks, "
                f"{_kib(size.created_bytes)} on creation, {_kib(size.end_bytes)} expected at the end)")
        over = [s for s in sizes if s.end_bytes > budget]
        if not over:
            break
        worst = max(over, key=lambda s: s.end_bytes)
        predict = SizePredictor()
        for s in sizes[:n] if n > 1 else sizes:
            predict.add(s.tasks, s.end_bytes)
        fitting = fitting_shards(plan, predict, budget, at_least=n + 1)
        if not auto or fitting is None:
            for p in paths:
                Path(p).unlink(missing_ok=True)
            plan_file.unlink(missing_ok=True)
            raise WorkflowTooLarge(too_large_message(worst, budget, fitting))
        say(f"run {worst.name} is over the budget: compiling again with {fitting} shards")
        for p in paths:
            Path(p).unlink(missing_ok=True)
        n = fitting
    files = StudyFiles(paths)
    files.shards, files.sizes = n, sizes
    files.plan_file, files.plan_key = str(plan_file), plan_key(plan.to_json())
    return files

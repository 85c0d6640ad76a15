"""How large the Argo Workflow of a compiled pipeline is, on creation and at the end of its run.

Kubeflow Pipelines (KFP) runs a pipeline by compiling its IR (the YAML
``lmcompose compile`` writes) into one Argo ``Workflow`` object, which
Kubernetes keeps in etcd.  Two limits apply to that object on a stock
installation, and a run that crosses either ends in Error -- possibly after
hours of GPU time:

* **etcd**: a write is refused above its request limit, 1.5 MiB
  (``--max-request-bytes`` 1,572,864 B) -- the workflow cannot be created.
* **Argo**: the workflow controller errors a workflow whose JSON exceeds
  1 MiB (``MAX_WORKFLOW_SIZE``, 1,048,576 B) once it has gzip-compressed the
  node status into ``status.compressedNodes``; KFP's manifests configure no
  database to offload it to.  The status grows as tasks finish, so the size
  that matters is the one **at the end of the run**.

This module is a *model* of both sizes, computed from the IR:

* :func:`compile_workflow` re-implements, for the pipelines this project
  compiles (container tasks in the root DAG, with retries and Kubernetes
  settings), the Argo compiler of the KFP backend
  (``backend/src/v2/compiler/argocompiler``: ``argo.go``, ``dag.go``,
  ``container.go``) -- component specs and container implementations shared
  through ``spec.arguments`` by container hash, one Kubernetes config per
  component, a driver and an executor DAG task per task, each carrying the
  task's spec as JSON.  ``tests/test_workflow_size.py`` checks it against
  golden compiled workflows of the KFP repository (identical objects, so
  identical sizes).
* :func:`submitted_workflow` adds what the KFP API server and Kubernetes add
  on creation (run labels and annotations, the istio annotation on every
  template, server metadata).
* :func:`end_of_run_workflow` adds the status of a successful run: Argo's
  node entries (for each task a driver pod, the executor DAG, its retry node
  and the executor pod), whose inputs and outputs hold the *resolved*
  parameters -- the component spec, the container, the task spec, the
  Kubernetes config and the pod spec patch the driver writes (executor input
  with the input model's metadata, component spec, command) -- compressed
  as Argo compresses them (gzip, then base64).

Go's ``encoding/json`` writes what Kubernetes stores: compact, ``<``, ``>``
and ``&`` escaped as ``\\u003c`` etc. (:func:`go_json`); a JSON document held
in a string parameter is therefore escaped twice.

Calibration and uncertainty (docs/cost-model.md, "Workflow size"): the
creation size reproduces KFP 2.15.0's golden workflows exactly (2.16.0's
and 2.17.0's with a fixed 200 B and 1,379 B more per workflow); the server
additions are a fixed estimate (about 2 KB); the end-of-run status is a
model (node fields as Argo v3.7.3 writes them, a pod spec patch as the KFP
2.15 driver builds it, Python's zlib at level 6 standing in for Go's pgzip):
treat it as +-15 %.  :data:`DEFAULT_WORKFLOW_BUDGET_BYTES` leaves that margin below
Argo's 1 MiB.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

from shared.cluster import ARGO_MAX_WORKFLOW_BYTES, DEFAULT_WORKFLOW_BUDGET_BYTES, ETCD_MAX_REQUEST_BYTES

#: the KFP backend whose Argo compiler :func:`compile_workflow` follows, and the Argo it ships
CALIBRATED_FOR = "Kubeflow Pipelines backend 2.15.0 (Argo Workflows v3.7.3)"
__all__ = ["ARGO_MAX_WORKFLOW_BYTES", "DEFAULT_WORKFLOW_BUDGET_BYTES", "ETCD_MAX_REQUEST_BYTES", "CALIBRATED_FOR",
           "RunSize", "compile_workflow", "end_of_run_workflow", "go_json", "go_json_size", "measure", "measure_file",
           "read_ir", "submitted_workflow"]

DRIVER_IMAGE = "ghcr.io/kubeflow/kfp-driver:2.15.0"
LAUNCHER_IMAGE = "ghcr.io/kubeflow/kfp-launcher:2.15.0"
ML_PIPELINE_ADDRESS = ("ml-pipeline.kubeflow", "8887")
MLMD_ADDRESS = ("metadata-grpc-service.kubeflow.svc.cluster.local", "8080")


# --- Go's encoding/json ----------------------------------------------------------------------------


def _go_float(value: float) -> str:
    """A float64 as Go's encoding/json writes it (shortest repr; 'e' form below 1e-6 or from 1e21)."""
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"JSON cannot hold {value}")
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    if 1e-6 <= abs(value) < 1e21:
        text = format(Decimal(text), "f")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text
    mantissa, _, exponent = text.partition("e")
    sign = exponent[0] if exponent[0] in "+-" else "+"
    return f"{mantissa}e{sign}{int(exponent.lstrip('+-'))}"


_HTML = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_HTML_RE = re.compile("[<>&\u2028\u2029]")


_FLOAT_MARK = "\x00go-float:"
_FLOAT_RE = re.compile(r'"\\u0000go-float:([^"]*)"')


def _go_numbers(obj: Any) -> Any:
    """``obj`` with every float in Go's form: integral ones as ints, others as marked strings (see :func:`go_json`)."""
    if isinstance(obj, dict):
        return {k: _go_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_go_numbers(v) for v in obj]
    if isinstance(obj, float):
        text = _go_float(obj)
        return int(text) if re.fullmatch(r"-?\d+", text) else _FLOAT_MARK + text
    if isinstance(obj, (str, bool, int)) or obj is None:
        return obj
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def go_json(obj: Any) -> str:
    """``obj`` as Go's ``json.Marshal`` writes it: compact, sorted map keys, HTML characters escaped."""
    text = json.dumps(_go_numbers(obj), ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    if "go-float:" in text:
        text = _FLOAT_RE.sub(lambda m: m.group(1), text)
    return _HTML_RE.sub(lambda m: _HTML[m.group()], text) if _HTML_RE.search(text) else text


def go_json_size(obj: Any) -> int:
    """Bytes of :func:`go_json` (UTF-8)."""
    return len(go_json(obj).encode())


def _proto_json(obj: Any) -> str:
    """A proto message's JSON as the compiler's ``stablyMarshalJSON`` writes it (numbers become float64)."""
    return go_json(obj)


# --- the Argo compiler of the KFP backend -----------------------------------------------------------


def _driver_args(kind: str, pipeline_name: str, display_name: str, cache_disabled: bool) -> list[str]:
    """Arguments of the container driver (``kind`` CONTAINER) or DAG driver template (container.go, dag.go)."""
    if kind == "CONTAINER":
        args = ["--type", "CONTAINER", "--pipeline_name", pipeline_name, "--run_id", "{{workflow.uid}}",
                "--run_name", "{{workflow.name}}", "--run_display_name", display_name,
                "--dag_execution_id", "{{inputs.parameters.parent-dag-id}}",
                "--component", "{{inputs.parameters.component}}", "--task", "{{inputs.parameters.task}}",
                "--task_name", "{{inputs.parameters.task-name}}", "--container", "{{inputs.parameters.container}}",
                "--iteration_index", "{{inputs.parameters.iteration-index}}",
                "--cached_decision_path", "{{outputs.parameters.cached-decision.path}}",
                "--pod_spec_patch_path", "{{outputs.parameters.pod-spec-patch.path}}",
                "--condition_path", "{{outputs.parameters.condition.path}}",
                "--kubernetes_config", "{{inputs.parameters.kubernetes-config}}"]
    else:
        args = ["--type", "{{inputs.parameters.driver-type}}", "--pipeline_name", pipeline_name,
                "--run_id", "{{workflow.uid}}", "--run_name", "{{workflow.name}}", "--run_display_name", display_name,
                "--dag_execution_id", "{{inputs.parameters.parent-dag-id}}",
                "--component", "{{inputs.parameters.component}}", "--task", "{{inputs.parameters.task}}",
                "--task_name", "{{inputs.parameters.task-name}}",
                "--runtime_config", "{{inputs.parameters.runtime-config}}",
                "--iteration_index", "{{inputs.parameters.iteration-index}}",
                "--execution_id_path", "{{outputs.parameters.execution-id.path}}",
                "--iteration_count_path", "{{outputs.parameters.iteration-count.path}}",
                "--condition_path", "{{outputs.parameters.condition.path}}"]
    args += ["--http_proxy", "", "--https_proxy", "", "--no_proxy", "",
             "--ml_pipeline_server_address", ML_PIPELINE_ADDRESS[0],
             "--ml_pipeline_server_port", ML_PIPELINE_ADDRESS[1],
             "--mlmd_server_address", MLMD_ADDRESS[0], "--mlmd_server_port", MLMD_ADDRESS[1]]
    if cache_disabled:
        args.append("--cache_disabled")
    return args


_DRIVER_RESOURCES = {"limits": {"cpu": "500m", "memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "64Mi"}}


def _container_driver_template(pipeline_name: str, display_name: str, cache_disabled: bool, image: str) -> dict:
    return {
        "container": {"args": _driver_args("CONTAINER", pipeline_name, display_name, cache_disabled),
                      "command": ["driver"], "image": image, "name": "", "resources": copy.deepcopy(_DRIVER_RESOURCES)},
        "inputs": {"parameters": [
            {"name": "component"}, {"name": "task"}, {"name": "container"}, {"name": "task-name"},
            {"name": "parent-dag-id"}, {"default": "-1", "name": "iteration-index"},
            {"default": "", "name": "kubernetes-config"}]},
        "metadata": {},
        "name": "system-container-driver",
        "outputs": {"parameters": [
            {"name": "pod-spec-patch", "valueFrom": {"default": "", "path": "/tmp/outputs/pod-spec-patch"}},
            {"default": "false", "name": "cached-decision",
             "valueFrom": {"default": "false", "path": "/tmp/outputs/cached-decision"}},
            {"name": "condition", "valueFrom": {"default": "true", "path": "/tmp/outputs/condition"}}]},
    }


def _dag_driver_template(pipeline_name: str, display_name: str, cache_disabled: bool, image: str) -> dict:
    return {
        "container": {"args": _driver_args("DAG", pipeline_name, display_name, cache_disabled),
                      "command": ["driver"], "image": image, "name": "", "resources": copy.deepcopy(_DRIVER_RESOURCES)},
        "inputs": {"parameters": [
            {"name": "component"}, {"default": "", "name": "runtime-config"}, {"default": "", "name": "task"},
            {"default": "", "name": "task-name"}, {"default": "0", "name": "parent-dag-id"},
            {"default": "-1", "name": "iteration-index"}, {"default": "DAG", "name": "driver-type"}]},
        "metadata": {},
        "name": "system-dag-driver",
        "outputs": {"parameters": [
            {"name": "execution-id", "valueFrom": {"path": "/tmp/outputs/execution-id"}},
            {"name": "iteration-count", "valueFrom": {"default": "0", "path": "/tmp/outputs/iteration-count"}},
            {"name": "condition", "valueFrom": {"default": "true", "path": "/tmp/outputs/condition"}}]},
    }


_RETRY_PARAMS = ("retry-max-count", "retry-backoff-duration", "retry-backoff-factor", "retry-backoff-max-duration")
_SCRATCH = (("kfp-launcher", "/kfp-launcher"), ("gcs-scratch", "/gcs"), ("s3-scratch", "/s3"),
            ("minio-scratch", "/minio"), ("dot-local-scratch", "/.local"), ("dot-cache-scratch", "/.cache"),
            ("dot-config-scratch", "/.config"))


def _executor_templates(retry: bool, cache_disabled: bool, launcher_image: str) -> list[dict]:
    """The executor DAG template and the container implementation template (container.go)."""
    prefix = "retry-" if retry else ""
    retry_names = list(_RETRY_PARAMS) if retry else []
    executor = {
        "dag": {"tasks": [{
            "arguments": {"parameters": [{"name": "pod-spec-patch", "value": "{{inputs.parameters.pod-spec-patch}}"}]
                          + [{"name": n, "value": f"{{{{inputs.parameters.{n}}}}}"} for n in retry_names]},
            "name": "executor",
            "template": f"{prefix}system-container-impl",
            "when": "{{inputs.parameters.cached-decision}} != true",
        }]},
        "inputs": {"parameters": [{"name": "pod-spec-patch"}, {"default": "false", "name": "cached-decision"}]
                   + [{"default": "0", "name": n} for n in retry_names]},
        "metadata": {},
        "name": f"{prefix}system-container-executor",
        "outputs": {},
    }
    launcher_args = ["--copy", "/kfp-launcher/launch"] + (["--cache_disabled"] if cache_disabled else [])
    impl = {
        "container": {
            "command": ["should-be-overridden-during-runtime"],
            "env": [{"name": "KFP_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "KFP_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}],
            "envFrom": [{"configMapRef": {"name": "metadata-grpc-configmap", "optional": True}}],
            "image": "gcr.io/ml-pipeline/should-be-overridden-during-runtime",
            "name": "",
            "resources": {},
            "volumeMounts": [{"mountPath": path, "name": name} for name, path in _SCRATCH],
        },
        "initContainers": [{
            "args": launcher_args, "command": ["launcher-v2"], "image": launcher_image, "name": "kfp-launcher",
            "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": "100m"}},
            "volumeMounts": [{"mountPath": "/kfp-launcher", "name": "kfp-launcher"}],
        }],
        "inputs": {"parameters": [{"name": "pod-spec-patch"}] + [{"name": n} for n in retry_names]},
        "metadata": {},
        "name": f"{prefix}system-container-impl",
        "outputs": {},
        "podSpecPatch": "{{inputs.parameters.pod-spec-patch}}",
        "volumes": [{"emptyDir": {}, "name": name} for name, _ in _SCRATCH],
    }
    if retry:
        impl["retryStrategy"] = {"backoff": {"duration": "{{inputs.parameters.retry-backoff-duration}}",
                                             "factor": "{{inputs.parameters.retry-backoff-factor}}",
                                             "maxDuration": "{{inputs.parameters.retry-backoff-max-duration}}"},
                                 "limit": "{{inputs.parameters.retry-max-count}}"}
    return [executor, impl]


def _any_string(value: Any) -> str:
    """Go's ``fmt.Sprintf("%v", v)`` of a number (Argo's AnyStringPtr)."""
    return _go_float(float(value)) if isinstance(value, float) else str(value)


def _seconds(duration: str) -> str:
    return str(int(float(duration.rstrip("s"))))


class UnsupportedPipeline(ValueError):
    """The IR uses a construct the size model does not follow (nested DAGs, loops, conditions, importers)."""


def _with_implicit_dependencies(dag: dict) -> dict:
    """The compiler's ``addImplicitDependencies``: producers of a task's inputs become dependent tasks."""
    dag = copy.deepcopy(dag)
    for task in dag.get("tasks", {}).values():
        inputs = task.get("inputs", {})
        producers = [spec["taskOutputParameter"]["producerTask"] for spec in inputs.get("parameters", {}).values()
                     if "taskOutputParameter" in spec]
        producers += [spec["taskOutputArtifact"]["producerTask"] for spec in inputs.get("artifacts", {}).values()
                      if "taskOutputArtifact" in spec]
        for producer in producers:
            deps = task.setdefault("dependentTasks", [])
            if producer not in deps:
                deps.append(producer)
    return dag


def compile_workflow(
    ir: dict, platform: Optional[dict] = None, *, display_name: str = "", cache_disabled: bool = False,
    driver_image: str = DRIVER_IMAGE, launcher_image: str = LAUNCHER_IMAGE,
    runtime_parameters: Optional[dict] = None,
) -> dict:
    """The Workflow the KFP backend's Argo compiler makes of ``ir`` (and its Kubernetes ``platform`` spec).

    ``ir`` is the pipeline spec (the first YAML document ``lmcompose
    compile`` writes), ``platform`` the second (``{"platforms":
    {"kubernetes": ...}}``).  Raises :class:`UnsupportedPipeline` for
    constructs outside what this project compiles.
    """
    components = ir.get("components", {})
    if ((platform or {}).get("platforms", {}).get("kubernetes") or {}).get("pipelineConfig"):
        raise UnsupportedPipeline("pipeline-level Kubernetes config (workspaces) is not modelled")
    executors = ir.get("deploymentSpec", {}).get("executors", {})
    k8s_executors = (((platform or {}).get("platforms", {}).get("kubernetes") or {})
                     .get("deploymentSpec", {}).get("executors", {}))
    root = copy.deepcopy(ir["root"])
    root["dag"] = _with_implicit_dependencies(root.get("dag", {}))
    tasks = root["dag"].get("tasks", {})
    pipeline_name = ir["pipelineInfo"]["name"]

    arguments: list[dict] = []
    names: set[str] = set()

    def save(name: str, value: str) -> None:
        if name not in names:
            names.add(name)
            arguments.append({"name": name, "value": value})

    def container_hash(component_name: str) -> str:
        container = executors[components[component_name]["executorLabel"]]["container"]
        return hashlib.sha256(go_json(container).encode()).hexdigest()

    for key in sorted(tasks):  # the visitor's DFS: a component's Kubernetes spec, its spec, its implementation
        task = tasks[key]
        if "parameterIterator" in task or "artifactIterator" in task or task.get("triggerPolicy"):
            raise UnsupportedPipeline(f"task {key}: loops and conditions are not modelled")
        name = task["componentRef"]["name"]
        comp = components[name]
        label = comp.get("executorLabel")
        if not label or "container" not in executors.get(label, {}):
            raise UnsupportedPipeline(f"task {key}: only container components in the root DAG are modelled")
        if executors[label]["container"].get("image") in ("argostub/createpvc", "argostub/deletepvc"):
            raise UnsupportedPipeline(f"task {key}: PVC creation tasks are not modelled")
        if label in k8s_executors:
            if "podMetadata" in k8s_executors[label]:
                raise UnsupportedPipeline(f"task {key}: pod metadata is not modelled")
            save(f"kubernetes-{name}", _proto_json(k8s_executors[label]))
        digest = container_hash(name)
        save(f"components-{digest}", _proto_json(comp))
        save(f"implementations-{digest}", _proto_json(executors[label]["container"]))
    save("components-root", _proto_json(root))

    templates: list[dict] = []
    seen: set[str] = set()

    def add(template: dict) -> None:
        if template["name"] not in seen:
            seen.add(template["name"])
            templates.append(template)

    dag_tasks = []
    for key in sorted(tasks):
        task = tasks[key]
        name = task["componentRef"]["name"]
        digest = container_hash(name)
        params = [
            {"name": "component", "value": f"{{{{workflow.parameters.components-{digest}}}}}"},
            {"name": "task", "value": _proto_json(task)},
            {"name": "container", "value": f"{{{{workflow.parameters.implementations-{digest}}}}}"},
            {"name": "task-name", "value": key},
            {"name": "parent-dag-id", "value": "{{inputs.parameters.parent-dag-id}}"},
        ]
        if f"kubernetes-{name}" in names:
            params.append({"name": "kubernetes-config", "value": f"{{{{workflow.parameters.kubernetes-{name}}}}}"})
        driver = {"arguments": {"parameters": params}, "name": f"{key}-driver", "template": "system-container-driver"}
        if task.get("dependentTasks"):
            driver["depends"] = " && ".join(f"{d}.Succeeded" for d in task["dependentTasks"])
        add(_container_driver_template(pipeline_name, display_name, cache_disabled, driver_image))
        retry = task.get("retryPolicy")
        executor_params = [
            {"name": "pod-spec-patch", "value": f"{{{{tasks.{key}-driver.outputs.parameters.pod-spec-patch}}}}"},
            {"default": "false", "name": "cached-decision",
             "value": f"{{{{tasks.{key}-driver.outputs.parameters.cached-decision}}}}"},
        ]
        if retry is not None:
            executor_params.append({"name": "retry-max-count", "value": str(retry.get("maxRetryCount", 0))})
            if "backoffDuration" in retry:
                executor_params.append({"name": "retry-backoff-duration", "value": _seconds(retry["backoffDuration"])})
            executor_params.append({"name": "retry-backoff-factor",
                                    "value": _any_string(retry.get("backoffFactor", 0))})
            if "backoffMaxDuration" in retry:
                executor_params.append({"name": "retry-backoff-max-duration",
                                        "value": _seconds(retry["backoffMaxDuration"])})
        for template in _executor_templates(retry is not None, cache_disabled, launcher_image):
            add(template)
        executor = {"arguments": {"parameters": executor_params}, "depends": f"{key}-driver.Succeeded", "name": key,
                    "template": f"{'retry-' if retry is not None else ''}system-container-executor"}
        dag_tasks += [driver, executor]
    add({"dag": {"tasks": dag_tasks}, "inputs": {"parameters": [{"name": "parent-dag-id"}]}, "metadata": {},
         "name": "root", "outputs": {}})
    add(_dag_driver_template(pipeline_name, display_name, cache_disabled, driver_image))
    values: dict[str, Any] = {}
    for pname, spec in root.get("inputDefinitions", {}).get("parameters", {}).items():
        if "defaultValue" in spec:
            values[pname] = spec["defaultValue"]
        elif spec.get("isOptional"):
            values[pname] = None
    values.update(runtime_parameters or {})
    add({"dag": {"tasks": [
        {"arguments": {"parameters": [
            {"name": "component", "value": "{{workflow.parameters.components-root}}"},
            {"name": "runtime-config", "value": _proto_json({"parameterValues": values} if values else {})},
            {"name": "driver-type", "value": "ROOT_DAG"}]},
         "name": "root-driver", "template": "system-dag-driver"},
        {"arguments": {"parameters": [
            {"name": "parent-dag-id", "value": "{{tasks.root-driver.outputs.parameters.execution-id}}"},
            {"name": "condition", "value": ""}]},
         "depends": "root-driver.Succeeded", "name": "root", "template": "root"}]},
        "inputs": {}, "metadata": {}, "name": "entrypoint", "outputs": {}})
    name = pipeline_name.rsplit("/", 1)[-1]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"creationTimestamp": None, "generateName": f"{name}-"},
        "spec": {
            "arguments": {"parameters": arguments},
            "entrypoint": "entrypoint",
            "podMetadata": {"annotations": {"pipelines.kubeflow.org/v2_component": "true"},
                            "labels": {"pipelines.kubeflow.org/v2_component": "true"}},
            "serviceAccountName": "pipeline-runner",
            "templates": templates,
        },
        "status": {"finishedAt": None, "startedAt": None},
    }


# --- what the KFP API server and Kubernetes add --------------------------------------------------


def _pseudo_hex(seed: str, n: int) -> str:
    """Deterministic stand-in for a random identifier (uuids, hashes): incompressible like the real ones."""
    out = ""
    while len(out) < n:
        seed = hashlib.sha256(seed.encode()).hexdigest()
        out += seed
    return out[:n]


def _uuid(seed: str) -> str:
    h = _pseudo_hex(seed, 32)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


#: fixed timestamps of the model (their length is what matters)
_T0, _T1 = "2026-01-01T00:00:00Z", "2026-01-01T09:59:59Z"


def _managed_field(manager: str, fields: dict, subresource: Optional[str] = None) -> dict:
    entry = {"apiVersion": "argoproj.io/v1alpha1", "fieldsType": "FieldsV1", "fieldsV1": fields,
             "manager": manager, "operation": "Update", "time": _T0}
    if subresource:
        entry["subresource"] = subresource
    return entry


def submitted_workflow(workflow: dict, run_name: str = "", namespace: str = "kubeflow",
                       service_account: str = "pipeline-runner") -> dict:
    """``workflow`` as the KFP API server creates it and Kubernetes stores it (v2_template.go ``RunWorkflow``).

    The API server names the run, labels and annotates the workflow and its
    pods, annotates every template with ``sidecar.istio.io/inject: "false"``
    and replaces ``{{workflow.uid}}`` with the run's id; the API server of
    Kubernetes adds the object's name, uid, version and managed fields.
    """
    wf = copy.deepcopy(workflow)
    run_id = _uuid("run:" + run_name)
    name = wf["metadata"]["generateName"] + _pseudo_hex("name:" + run_name, 5)
    wf["metadata"] = {
        "annotations": {"pipelines.kubeflow.org/run_name": run_name},
        "creationTimestamp": _T0,
        "generateName": wf["metadata"]["generateName"],
        "generation": 1,
        "labels": {"pipeline/runid": run_id},
        "managedFields": [_managed_field("apiserver", {
            "f:metadata": {"f:annotations": {".": {}, "f:pipelines.kubeflow.org/run_name": {}}, "f:generateName": {},
                           "f:labels": {".": {}, "f:pipeline/runid": {}}},
            "f:spec": {}, "f:status": {}})],
        "name": name,
        "namespace": namespace,
        "resourceVersion": "123456789",
        "uid": _uuid("uid:" + run_name),
    }
    spec = wf["spec"]
    spec["serviceAccountName"] = service_account
    spec["podMetadata"]["labels"]["pipeline/runid"] = run_id
    for template in spec["templates"]:
        template.setdefault("metadata", {}).setdefault("annotations", {})["sidecar.istio.io/inject"] = "false"
    text = json.dumps(wf).replace("{{workflow.uid}}", run_id)
    wf = json.loads(text)
    wf["metadata"]["name"] = name
    return wf


# --- the status at the end of a successful run -----------------------------------------------------


def _fnv32a(text: str) -> int:
    h = 0x811C9DC5
    for byte in text.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def _node_id(workflow_name: str, node_name: str) -> str:
    """Argo's ``Workflow.NodeID``: the workflow's name and the FNV-32a hash of the node's name."""
    return workflow_name if node_name == workflow_name else f"{workflow_name}-{_fnv32a(node_name)}"


def _base_name(component: str) -> str:
    return re.sub(r"-\d+$", "", component.removeprefix("comp-")).replace("-", "_")


def _parameter_values(component: dict, task: dict) -> dict:
    """The executor input's parameter values of a task: its constants over the component's defaults."""
    values = {name: spec.get("defaultValue") for name, spec in
              component.get("inputDefinitions", {}).get("parameters", {}).items() if "defaultValue" in spec}
    for name, spec in task.get("inputs", {}).get("parameters", {}).items():
        if "runtimeValue" in spec:
            values[name] = spec["runtimeValue"].get("constant")
        elif "componentInputParameter" in spec:
            values[name] = "s3://bucket/prefix"
        else:
            values[name] = "[" + ", ".join(f"{{\"model\": \"{_pseudo_hex(name, 40)}\"}}" for _ in range(2)) + "]"
    return values


def _model_metadata(tasks: dict, components: dict, key: str, store: str) -> dict:
    """The metadata of the ``Model`` artifact task ``key`` writes (shared.model_ref.artifact_metadata)."""
    steps = []
    current: Optional[str] = key
    while current:
        task = tasks[current]
        method = _base_name(task["componentRef"]["name"])
        if method == "prepare_base":
            break
        params = {n: v for n, v in _parameter_values(components[task["componentRef"]["name"]], task).items()
                  if n not in ("trust_remote_code",) and not (isinstance(v, str) and v.startswith("s3://"))}
        steps.append({"method": method, "version": "1", "params": params})
        producer = task.get("inputs", {}).get("artifacts", {}).get("model", {}).get("taskOutputArtifact", {})
        current = producer.get("producerTask")
    steps.reverse()
    return {"lmcompose_format": 1, "store": store, "key": "ckpt/" + _pseudo_hex(key, 40),
            "base_source": "hf:meta-llama/Meta-Llama-3-8B", "base_digest": _pseudo_hex("base", 64),
            "num_steps": len(steps), "steps": steps,
            "composition": " > ".join(s["method"] for s in steps) or "base",
            "size_bytes": 16060522496, "num_files": 6}


def _pod_spec_patch(ir: dict, k8s: dict, key: str, pipeline_name: str, run_id: str, store: str) -> str:
    """The pod spec patch the KFP driver writes for task ``key`` (driver.go ``initPodSpecPatch`` and k8s.go)."""
    tasks, components = ir["root"]["dag"]["tasks"], ir["components"]
    task = tasks[key]
    component = components[task["componentRef"]["name"]]
    container = ir["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
    artifact_type = {"schemaTitle": "system.Model", "schemaVersion": "0.0.1"}
    root = f"s3://mlpipeline/v2/artifacts/{pipeline_name}/{run_id}"
    inputs: dict[str, Any] = {"parameterValues": _parameter_values(component, task)}
    artifacts = {}
    for name, spec in task.get("inputs", {}).get("artifacts", {}).items():
        producer = spec.get("taskOutputArtifact", {}).get("producerTask", "")
        artifacts[name] = {"artifacts": [{
            "name": str(_fnv32a(producer) % 100000), "type": artifact_type,
            "uri": f"{root}/{producer}/{_uuid(producer)}/{name}",
            "metadata": _model_metadata(tasks, components, producer, store) if producer in tasks else {}}]}
    if artifacts:
        inputs["artifacts"] = artifacts
    outputs: dict[str, Any] = {"outputFile": "/tmp/kfp_outputs/output_metadata.json"}
    out_defs = component.get("outputDefinitions", {})
    if out_defs.get("artifacts"):
        outputs["artifacts"] = {name: {"artifacts": [{"type": spec.get("artifactType", artifact_type),
                                                      "uri": f"{root}/{key}/{_uuid(key)}/{name}"}]}
                                for name, spec in out_defs["artifacts"].items()}
    if out_defs.get("parameters"):
        outputs["parameters"] = {name: {"outputFile": f"/tmp/kfp_outputs/{name}"} for name in out_defs["parameters"]}
    executor_input = go_json({"inputs": inputs, "outputs": outputs})
    command = ["/kfp-launcher/launch", "--pipeline_name", pipeline_name, "--run_id", run_id,
               "--execution_id", str(1000 + _fnv32a(key) % 9000), "--executor_input", executor_input,
               "--component_spec", go_json(component), "--pod_name", "$(KFP_POD_NAME)", "--pod_uid", "$(KFP_POD_UID)",
               "--mlmd_server_address", MLMD_ADDRESS[0], "--mlmd_server_port", MLMD_ADDRESS[1],
               "--publish_logs", "true", "--"]
    env = [{"name": e["name"], "value": e.get("value", "")} for e in container.get("env", [])]
    for secret in k8s.get("secretAsEnv", []):
        name = secret.get("secretName") or secret.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant")
        for pair in secret.get("keyToEnv", []):
            env.append({"name": pair["envVar"], "valueFrom": {"secretKeyRef": {
                "key": pair["secretKey"], "name": name, "optional": bool(secret.get("optional", False))}}})
    for cm in k8s.get("configMapAsEnv", []):
        name = cm.get("configMapName") or cm.get("configMapNameParameter", {}).get("runtimeValue", {}).get("constant")
        for pair in cm.get("keyToEnv", []):
            env.append({"name": pair["envVar"], "valueFrom": {"configMapKeyRef": {
                "key": pair["configMapKey"], "name": name, "optional": bool(cm.get("optional", False))}}})
    res = container.get("resources", {})
    limits, requests = {}, {}
    for key, target, unit in (("resourceCpuLimit", limits, "cpu"), ("resourceMemoryLimit", limits, "memory"),
                              ("resourceCpuRequest", requests, "cpu"),
                              ("resourceMemoryRequest", requests, "memory")):
        if key in res:
            target[unit] = res[key]
    accelerator = res.get("accelerator")
    if accelerator:
        limits[accelerator.get("resourceType") or accelerator.get("type")] = str(
            accelerator.get("resourceCount") or accelerator.get("count"))
    main: dict[str, Any] = {"args": list(container.get("command", [])) + list(container.get("args", [])),
                            "command": command, "image": container.get("image", ""), "name": "main",
                            "resources": {"limits": limits, "requests": requests}}
    if env:
        main["env"] = env
    pod: dict[str, Any] = {"containers": [main]}
    mounts = k8s.get("emptyDirMounts", [])
    if mounts:
        main["volumeMounts"] = [{"mountPath": m["mountPath"], "name": m["volumeName"]} for m in mounts]
        pod["volumes"] = [{"emptyDir": {"sizeLimit": m["sizeLimit"]} if "sizeLimit" in m else {},
                           "name": m["volumeName"]} for m in mounts]
    if k8s.get("nodeSelector", {}).get("labels"):
        pod["nodeSelector"] = k8s["nodeSelector"]["labels"]
    if k8s.get("tolerations"):
        pod["tolerations"] = k8s["tolerations"]
    if k8s.get("activeDeadlineSeconds"):
        pod["activeDeadlineSeconds"] = int(k8s["activeDeadlineSeconds"])
    if k8s.get("imagePullSecret"):
        pod["imagePullSecrets"] = [{"name": s.get("secretName", "")} for s in k8s["imagePullSecret"]]
    return go_json(pod)


def _main_logs(namespace: str, wf_name: str, pod: str) -> dict:
    return {"name": "main-logs", "s3": {
        "key": f"private-artifacts/{namespace}/{wf_name}/2026/01/01/{pod}/main.log"}}


def _node(wf_name: str, name: str, type_: str, template: str, boundary: Optional[str], **extra: Any) -> dict:
    node = {"id": _node_id(wf_name, name), "name": name, "displayName": name.rsplit(".", 1)[-1],
            "type": type_, "templateName": template, "templateScope": f"local/{wf_name}", "phase": "Succeeded",
            "startedAt": _T0, "finishedAt": _T1, "progress": "1/1",
            "resourcesDuration": {"cpu": 3600, "memory": 36000}}
    if boundary:
        node["boundaryID"] = boundary
    if type_ == "Pod":
        node["hostNodeName"] = "gpu-node-" + _pseudo_hex(name, 10)
        node["taskResultSynced"] = True
    node.update(extra)
    return node


def end_of_run_nodes(workflow: dict, ir: dict, platform: Optional[dict] = None) -> dict[str, dict]:
    """``status.nodes`` of a successful run of ``workflow`` (as :func:`submitted_workflow` returns it).

    Per task (``<task>`` in the root DAG): the driver pod, the executor DAG
    node, its retry node (tasks with retries) and the executor pod; every
    node records its inputs resolved (``{{workflow.parameters.*}}`` and task
    outputs substituted), pods their logs artifact.  One attempt per task (a
    retried task adds a pod node with the same inputs).
    """
    wf_name = workflow["metadata"]["name"]
    namespace = workflow["metadata"].get("namespace", "kubeflow")
    run_id = workflow["metadata"].get("labels", {}).get("pipeline/runid", _uuid("run"))
    globals_ = {p["name"]: p["value"] for p in workflow["spec"]["arguments"]["parameters"]}
    k8s_executors = (((platform or {}).get("platforms", {}).get("kubernetes") or {})
                     .get("deploymentSpec", {}).get("executors", {}))
    root_template = next(t for t in workflow["spec"]["templates"] if t["name"] == "root")
    store = (ir["root"].get("inputDefinitions", {}).get("parameters", {}).get("store_uri", {})
             .get("defaultValue", "s3://bucket/prefix"))
    pipeline_name = ir["pipelineInfo"]["name"]

    def resolve(value: str, task_outputs: dict) -> str:
        def sub(match: re.Match) -> str:
            ref = match.group(1)
            if ref.startswith("workflow.parameters."):
                return globals_[ref.removeprefix("workflow.parameters.")]
            if ref.startswith("tasks."):
                return task_outputs.get(ref, "")
            if ref == "inputs.parameters.parent-dag-id":
                return "1234"
            return match.group(0)
        return re.sub(r"\{\{([^{}]+)\}\}", sub, value)

    nodes: dict[str, dict] = {}

    def put(node: dict) -> dict:
        nodes[node["id"]] = node
        return node

    root_name = f"{wf_name}.root"
    root_id = _node_id(wf_name, root_name)
    entry = put(_node(wf_name, wf_name, "DAG", "entrypoint", None, displayName=wf_name, children=[]))
    root_driver_name = f"{wf_name}.root-driver"
    root_driver = put(_node(wf_name, root_driver_name, "Pod", "system-dag-driver", wf_name,
                            inputs={"parameters": [
                                {"name": "component", "value": globals_["components-root"]},
                                {"name": "runtime-config", "value": "{}"}, {"default": "", "name": "task", "value": ""},
                                {"default": "", "name": "task-name", "value": ""},
                                {"default": "0", "name": "parent-dag-id", "value": "0"},
                                {"default": "-1", "name": "iteration-index", "value": "-1"},
                                {"default": "DAG", "name": "driver-type", "value": "ROOT_DAG"}]},
                            outputs={"artifacts": [_main_logs(namespace, wf_name, root_driver_name)], "exitCode": "0",
                                     "parameters": [
                                         {"name": "execution-id", "value": "1234",
                                          "valueFrom": {"path": "/tmp/outputs/execution-id"}},
                                         {"name": "iteration-count", "value": "0",
                                          "valueFrom": {"default": "0", "path": "/tmp/outputs/iteration-count"}},
                                         {"name": "condition", "value": "true",
                                          "valueFrom": {"default": "true", "path": "/tmp/outputs/condition"}}]},
                            children=[root_id]))
    entry["children"] = [root_driver["id"]]
    root = put(_node(wf_name, root_name, "DAG", "root", wf_name,
                     inputs={"parameters": [{"name": "parent-dag-id", "value": "1234"}]}, children=[]))
    tasks = ir["root"]["dag"]["tasks"]
    dependents: dict[str, list[str]] = {k: [] for k in tasks}
    for key, task in tasks.items():
        for dep in task.get("dependentTasks", []):
            if dep in dependents:
                dependents[dep].append(key)
    outbound = []
    by_name = {t["name"]: t for t in root_template["dag"]["tasks"]}
    for key in sorted(tasks):
        driver_task, executor_task = by_name[f"{key}-driver"], by_name[key]
        if not tasks[key].get("dependentTasks"):
            root["children"].append(_node_id(wf_name, f"{root_name}.{key}-driver"))
        driver_inputs = [{"name": p["name"], "value": resolve(p["value"], {})}
                         for p in driver_task["arguments"]["parameters"]]
        if not any(p["name"] == "kubernetes-config" for p in driver_inputs):
            driver_inputs.append({"default": "", "name": "kubernetes-config", "value": ""})
        driver_inputs.append({"default": "-1", "name": "iteration-index", "value": "-1"})
        label = ir["components"][tasks[key]["componentRef"]["name"]]["executorLabel"]
        patch = _pod_spec_patch(ir, k8s_executors.get(label, {}), key, pipeline_name, run_id, store)
        driver_name = f"{root_name}.{key}-driver"
        executor_name = f"{root_name}.{key}"
        put(_node(wf_name, driver_name, "Pod", "system-container-driver", root_id,
                  inputs={"parameters": driver_inputs},
                  outputs={"artifacts": [_main_logs(namespace, wf_name, driver_name)], "exitCode": "0", "parameters": [
                      {"name": "pod-spec-patch", "value": patch,
                       "valueFrom": {"default": "", "path": "/tmp/outputs/pod-spec-patch"}},
                      {"default": "false", "name": "cached-decision", "value": "false",
                       "valueFrom": {"default": "false", "path": "/tmp/outputs/cached-decision"}},
                      {"name": "condition", "value": "",
                       "valueFrom": {"default": "true", "path": "/tmp/outputs/condition"}}]},
                  children=[_node_id(wf_name, executor_name)]))
        outputs = {f"tasks.{key}-driver.outputs.parameters.pod-spec-patch": patch,
                   f"tasks.{key}-driver.outputs.parameters.cached-decision": "false"}
        executor_inputs = [{k: (resolve(v, outputs) if k == "value" else v) for k, v in p.items()}
                           for p in executor_task["arguments"]["parameters"]]
        retry = executor_task["template"].startswith("retry-")
        impl_inputs = [p for p in executor_inputs if p["name"] != "cached-decision"]
        impl_inputs = [{"name": p["name"], "value": p["value"]} for p in impl_inputs]
        logs = {"artifacts": None, "exitCode": "0"}
        pod_name = f"{executor_name}.executor(0)" if retry else f"{executor_name}.executor"
        logs["artifacts"] = [_main_logs(namespace, wf_name, pod_name)]
        follow = [_node_id(wf_name, f"{root_name}.{d}-driver") for d in dependents[key]]
        pod = _node(wf_name, pod_name, "Pod", f"{'retry-' if retry else ''}system-container-impl",
                    _node_id(wf_name, executor_name), inputs={"parameters": impl_inputs}, outputs=logs,
                    resourcesDuration={"cpu": 28800, "memory": 3456000, "nvidia.com/gpu": 3600})
        if follow:
            pod["children"] = follow
        else:
            outbound.append(pod["id"])
        if retry:
            pod["nodeFlag"] = {"retried": True}
            retry_node = _node(wf_name, f"{executor_name}.executor", "Retry", "retry-system-container-impl",
                               _node_id(wf_name, executor_name), inputs={"parameters": impl_inputs},
                               outputs=copy.deepcopy(logs), children=[pod["id"]])
            put(retry_node)
            first = retry_node["id"]
        else:
            first = pod["id"]
        put(pod)
        put(_node(wf_name, executor_name, "DAG", executor_task["template"], root_id,
                  inputs={"parameters": executor_inputs}, children=[first], outboundNodes=[pod["id"]]))
    root["outboundNodes"] = outbound
    entry["outboundNodes"] = list(outbound)
    n = len(nodes)
    for node in (entry, root):
        node["progress"] = f"{n}/{n}"
    return nodes


def end_of_run_workflow(submitted: dict, ir: dict, platform: Optional[dict] = None) -> tuple[dict, int]:
    """The workflow at the end of a successful run, node status compressed, and the size of the uncompressed status.

    Argo compresses ``status.nodes`` into ``status.compressedNodes`` (gzip,
    base64) once the whole workflow exceeds 1 MiB, and errors the workflow
    if it is still larger: the compressed form is the one its limit applies
    to.  (Below 1 MiB Argo stores the nodes uncompressed, which is harmless.)
    """
    wf = copy.deepcopy(submitted)
    nodes = end_of_run_nodes(wf, ir, platform)
    pods = [n["id"] for n in nodes.values() if n["type"] == "Pod"]
    wf["metadata"]["labels"].update({"pipeline/persistedFinalState": "true", "workflows.argoproj.io/completed": "true",
                                     "workflows.argoproj.io/phase": "Succeeded"})
    wf["metadata"]["annotations"]["workflows.argoproj.io/pod-name-format"] = "v2"
    wf["metadata"]["managedFields"].append(_managed_field("workflow-controller", {
        "f:metadata": {"f:annotations": {"f:workflows.argoproj.io/pod-name-format": {}},
                       "f:labels": {"f:workflows.argoproj.io/completed": {}, "f:workflows.argoproj.io/phase": {}}},
        "f:status": {}}))
    wf["metadata"]["managedFields"].append(_managed_field("persistence_agent", {
        "f:metadata": {"f:labels": {"f:pipeline/persistedFinalState": {}}}}))
    namespace = wf["metadata"].get("namespace", "kubeflow")
    wf["status"] = {
        "artifactGCStatus": {"notSpecified": True},
        "artifactRepositoryRef": {"artifactRepository": {"archiveLogs": True, "s3": {
            "accessKeySecret": {"key": "accesskey", "name": "mlpipeline-minio-artifact"},
            "bucket": "mlpipeline", "endpoint": f"minio-service.{namespace}:9000", "insecure": True,
            "keyFormat": "private-artifacts/{{workflow.namespace}}/{{workflow.name}}/{{workflow.creationTimestamp.Y}}"
                         "/{{workflow.creationTimestamp.m}}/{{workflow.creationTimestamp.d}}/{{pod.name}}",
            "secretKeySecret": {"key": "secretkey", "name": "mlpipeline-minio-artifact"}}},
            "default": True, "namespace": namespace},
        "conditions": [{"status": "False", "type": "PodRunning"}, {"status": "True", "type": "Completed"}],
        "finishedAt": _T1, "phase": "Succeeded", "progress": f"{len(pods)}/{len(pods)}",
        "resourcesDuration": {"cpu": 28800 * len(pods), "memory": 3456000 * len(pods),
                              "nvidia.com/gpu": 3600 * len(pods)},
        "startedAt": _T0,
        "taskResultsCompletionStatus": {pod: True for pod in pods},
        "nodes": "",
    }
    nodes_text = go_json(nodes).encode()
    del wf["status"]["nodes"]
    wf["status"]["compressedNodes"] = base64.b64encode(gzip.compress(nodes_text, compresslevel=6, mtime=0)).decode()
    return wf, len(nodes_text)


# --- measuring compiled runs ------------------------------------------------------------------------


@dataclass
class RunSize:
    """The modelled sizes of one compiled run's workflow."""

    name: str  #: the run (file stem, e.g. ``llama3-edit-x-compress.shard-3-of-40``)
    tasks: int  #: KFP tasks in the run
    created_bytes: int  #: the workflow as created (etcd must accept it)
    end_bytes: int  #: at the end of a successful run, node status compressed as Argo does past 1 MiB
    end_uncompressed_bytes: int  #: the same with the node status uncompressed (what the UI's "Retry run" writes)

    def fits(self, budget: int) -> bool:
        return self.end_bytes <= budget and self.created_bytes <= ETCD_MAX_REQUEST_BYTES


def read_ir(path: str | Path) -> tuple[dict, Optional[dict]]:
    """The pipeline spec and platform spec of a compiled pipeline YAML."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    docs = [d for d in yaml.load_all(Path(path).read_text(), Loader=loader) if d]
    return docs[0], (docs[1] if len(docs) > 1 else None)


def measure(ir: dict, platform: Optional[dict] = None, run_name: str = "") -> RunSize:
    """Sizes of the workflow of one compiled run (``ir``, ``platform``: :func:`read_ir`)."""
    submitted = submitted_workflow(compile_workflow(ir, platform, display_name=run_name), run_name)
    created = go_json_size(submitted)
    end, raw = end_of_run_workflow(submitted, ir, platform)
    end_bytes = go_json_size(end)
    uncompressed = end_bytes - len(end["status"]["compressedNodes"]) - len('"compressedNodes":""') \
        + len('"nodes":') + raw
    return RunSize(run_name, len(ir["root"].get("dag", {}).get("tasks", {})), created, end_bytes, uncompressed)


def measure_file(path: str | Path) -> RunSize:
    """:func:`measure` of a compiled pipeline YAML, named after the file (``.pipeline.yaml`` removed)."""
    ir, platform = read_ir(path)
    return measure(ir, platform, Path(path).name.removesuffix(".yaml").removesuffix(".pipeline"))

"""Cluster settings of an experiment: what each task asks of Kubernetes.

An experiment spec may carry a ``cluster:`` block; a cluster-wide placement
file (``manifests/`` renders it as the ConfigMap ``lmcompose-placement``)
may carry the same block.  Both are optional: the defaults follow the model's size
(:func:`sized_resources`): a model under a billion parameters runs on CPU
nodes with a few GiB per task; a larger one -- or one whose size is not known
at compile time, e.g. a hub model without ``cluster.model_parameters`` -- gets
the sizing for an 8B model in bfloat16 (weights 16 GB) on one 80 GB GPU per
task.  ``cluster.accelerator`` overrides the choice (``gpu``/``none``).

Why the settings live here and not in the components: a component is reusable
in any pipeline and must not hard-code a cluster's node labels; the pipeline
builder applies these settings to each task when it compiles a spec, so the
compiled YAML carries GPU requests, retries, node selectors, tolerations and
the *names* of the Secret and ConfigMap whose values become environment
variables -- never a credential.

Precedence (lowest first): the defaults, the placement file, the spec's
``cluster`` block; mappings merge key by key (``resources.ft.memory`` in the
spec changes only that field of ``ft``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Kubernetes resource quantity, e.g. "8", "500m", "64Gi", "80G"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
#: Kubernetes label key (optional DNS prefix + name) and value
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_DURATION = re.compile(r"^[0-9]+(s|m|h)$")

#: task kinds besides the interventions and evaluators (their component names)
FIXED_TASKS = ("prepare_base", "aggregate", "collect_results")
#: keys of ``resources`` that apply to a whole family of tasks
FAMILY_KEYS = ("default", "edit", "unlearn", "compress", "evaluate")


class Resources(BaseModel):
    """What one task requests; ``None`` leaves a field to the next level down."""

    model_config = ConfigDict(extra="forbid")
    cpu: str | None = Field(None, description="CPU request and limit, e.g. '8'")
    memory: str | None = Field(None, description="memory request and limit, e.g. '64Gi'")
    accelerator_type: str | None = Field(None, description="the GPU resource name, e.g. 'nvidia.com/gpu'")
    accelerator_count: int | None = Field(None, ge=0, le=16, description="GPUs per task; 0 runs on CPU nodes")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not _QUANTITY.match(str(v)):
            raise ValueError(f"not a Kubernetes quantity: {v!r} (e.g. '8', '500m', '64Gi')")
        return None if v is None else str(v)

    def over(self, lower: "Resources") -> "Resources":
        """These settings with unset fields taken from ``lower``."""
        return Resources(**{k: v if v is not None else getattr(lower, k) for k, v in self.model_dump().items()})

    @property
    def uses_gpu(self) -> bool:
        return bool(self.accelerator_count)


class Toleration(BaseModel):
    """A Kubernetes toleration (the fields of ``core/v1 Toleration``)."""

    model_config = ConfigDict(extra="forbid")
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "Toleration":
        if self.operator == "Exists" and self.value:
            raise ValueError("operator 'Exists' takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("toleration_seconds needs effect 'NoExecute'")
        return self


def _default_resources() -> dict[str, Resources]:
    """Sizing for an 8B model in bfloat16: one GPU per model-touching task, CPU-only bookkeeping."""
    gpu = dict(accelerator_type="nvidia.com/gpu", accelerator_count=1)
    return {
        # the family defaults; a method or evaluator key overrides its family
        "default": Resources(cpu="8", memory="64Gi", **gpu),
        "edit": Resources(cpu="8", memory="64Gi", **gpu),
        "unlearn": Resources(cpu="8", memory="96Gi", **gpu),  # GA/GD hold optimizer state for half the layers
        "compress": Resources(cpu="8", memory="96Gi", **gpu),  # calibration activations are offloaded to host memory
        "evaluate": Resources(cpu="8", memory="48Gi", **gpu),
        # no GPU: counting zeros and grid points, converting/downloading the base model, building the report
        "evaluate_compression": Resources(cpu="4", memory="48Gi", accelerator_count=0),
        "prepare_base": Resources(cpu="4", memory="64Gi", accelerator_count=0),
        "aggregate": Resources(cpu="2", memory="8Gi", accelerator_count=0),
        "collect_results": Resources(cpu="1", memory="1Gi", accelerator_count=0),  # joins JSON strings
    }


#: Argo's limit on a workflow's JSON (MAX_WORKFLOW_SIZE of the controller KFP ships), node status compressed
ARGO_MAX_WORKFLOW_BYTES = 1_048_576
#: etcd's default request limit (--max-request-bytes): Kubernetes cannot store a larger workflow at all
ETCD_MAX_REQUEST_BYTES = 1_572_864
#: the default ``workflow_budget_bytes``: Argo's 1 MiB less 1/8 for the uncertainty of the size model
DEFAULT_WORKFLOW_BUDGET_BYTES = ARGO_MAX_WORKFLOW_BYTES * 7 // 8
#: the most runs a study may be split into
MAX_SHARDS = 1000

#: models below this many parameters run on CPU nodes by default (``accelerator: auto``)
SMALL_MODEL_PARAMETERS = 1_000_000_000
#: a small model's task memory as a multiple of its float32 weights, per family or task (then rounded up to GiB):
#: optimizer state and gradients for unlearning, calibration activations for compression, one load for the rest
_MEMORY_MULTIPLE = {"default": 8, "edit": 8, "unlearn": 10, "compress": 8, "evaluate": 6,
                    "evaluate_compression": 4, "prepare_base": 6}
#: the smallest memory request of a small model's task (the interpreter, torch and transformers alone take ~1 GiB)
_MIN_MEMORY_GI = 2


def sized_resources(num_parameters: int | None, accelerator: str = "auto") -> dict[str, Resources]:
    """Default resources for a model of ``num_parameters`` parameters (``None``: unknown, sized as large).

    ``accelerator``: ``auto`` puts models under :data:`SMALL_MODEL_PARAMETERS`
    on CPU nodes, others on one GPU per task; ``gpu`` always asks for GPUs;
    ``none`` never (memory still follows the model).
    """
    large = num_parameters is None or num_parameters >= SMALL_MODEL_PARAMETERS
    if large or accelerator == "gpu":
        out = _default_resources()
        if accelerator == "none":
            out = {k: r.model_copy(update={"accelerator_count": 0}) for k, r in out.items()}
        return out
    weights_gib = num_parameters * 4 / 2**30
    out = {}
    for key, multiple in _MEMORY_MULTIPLE.items():
        memory = max(_MIN_MEMORY_GI, int(-(-weights_gib * multiple // 1)))
        out[key] = Resources(cpu="2" if key == "evaluate_compression" else "4", memory=f"{memory}Gi",
                             accelerator_type="nvidia.com/gpu", accelerator_count=0)
    defaults = _default_resources()
    out["aggregate"], out["collect_results"] = defaults["aggregate"], defaults["collect_results"]
    return out


class ClusterConfig(BaseModel):
    """The ``cluster`` block of a spec (and of the placement file)."""

    model_config = ConfigDict(extra="forbid")
    resources: dict[str, Resources] = Field(default_factory=_default_resources)
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="labels a GPU node must carry, e.g. {'nvidia.com/gpu.product': 'NVIDIA-A100-SXM4-80GB'}"
    )
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="tolerations of GPU tasks (GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule)",
    )
    cpu_node_selector: dict[str, str] = Field(default_factory=dict, description="node labels for CPU-only tasks")
    retries: int = Field(2, ge=0, le=10, description="re-runs of a failed task (node loss, OOM kill, S3 hiccup)")
    retry_backoff: str = Field("2m", description="wait before the first retry; doubles each time")
    timeout_hours: float = Field(24, gt=0, description="a task running longer is stopped (and retried)")
    scratch_size: str = Field("200Gi", description="emptyDir at /scratch for the checkpoint cache of a task")
    s3_secret: str = Field("lmcompose-s3-credentials", description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    store_config_map: str = Field("lmcompose-store", description="ConfigMap with AWS_ENDPOINT_URL/AWS_REGION")
    hf_token_secret: str | None = Field(None, description="Secret with key HF_TOKEN, for gated hub models")
    image_pull_secrets: list[str] = Field(default_factory=list)
    shards: int | Literal["auto"] = Field(
        "auto", description="pipeline runs the study is split into (plus one aggregation run): a number, or auto -- "
        "the fewest runs whose workflows fit workflow_budget_bytes (pipelines/workflow_size.py)")
    workflow_budget_bytes: int = Field(
        DEFAULT_WORKFLOW_BUDGET_BYTES, ge=64 * 1024, le=64 * 2**20,
        description="largest expected size of a run's Argo workflow at the end of the run; compile refuses a "
        "larger run (default: Argo's 1 MiB less 1/8 for the size model's uncertainty)")
    accelerator: Literal["auto", "gpu", "none"] = Field(
        "auto", description="auto: GPUs for models of a billion parameters or more (or of unknown size), CPU nodes "
        "below; gpu: always; none: CPU nodes only")
    model_parameters: int | None = Field(
        None, ge=1, le=10**13, description="the model's parameter count, where compile cannot know it (hub and S3 "
        "models); sizes the tasks")

    @field_validator("shards", mode="before")
    @classmethod
    def _shards(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SHARDS:
            raise ValueError(f"expected 'auto' or a number of runs from 1 to {MAX_SHARDS}, got {v!r}")
        return v

    @field_validator("node_selector", "cpu_node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(f"{key!r} is not a valid node label key")
            if not _LABEL_VALUE.match(str(value)) or len(str(value)) > 63:
                raise ValueError(f"{key}: {value!r} is not a valid label value")
        return {k: str(v) for k, v in v.items()}

    @field_validator("s3_secret", "store_config_map", "hf_token_secret")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        if v is not None and not _DNS_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid Kubernetes object name (lowercase letters, digits, '-', '.')")
        return v

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            cls._object_name(name)
        return v

    @field_validator("retry_backoff")
    @classmethod
    def _duration(cls, v: str) -> str:
        if not _DURATION.match(v):
            raise ValueError(f"{v!r} is not a duration like '90s', '2m', '1h'")
        return v

    @field_validator("scratch_size")
    @classmethod
    def _size(cls, v: str) -> str:
        if not _QUANTITY.match(v):
            raise ValueError(f"not a Kubernetes quantity: {v!r} (e.g. '200Gi')")
        return v

    @field_validator("resources")
    @classmethod
    def _known_tasks(cls, v: dict[str, Resources]) -> dict[str, Resources]:
        allowed = task_names()
        for key in v:
            if key not in allowed:
                raise ValueError(f"resources.{key}: unknown task; allowed: {', '.join(allowed)}")
        return v

    def resources_for(self, task: str, family: str) -> Resources:
        """The settings of ``task`` (component name): its own, then its family's, then ``default``."""
        chain = [self.resources.get(task), self.resources.get(family), self.resources.get("default")]
        out = Resources()
        for level in chain:
            if level is not None:
                out = out.over(level)
        return out

    @property
    def backoff_seconds(self) -> int:
        n, unit = int(self.retry_backoff[:-1]), self.retry_backoff[-1]
        return n * {"s": 1, "m": 60, "h": 3600}[unit]


def task_names() -> list[str]:
    """Every key ``resources`` accepts: families, fixed tasks, methods, evaluator components."""
    from shared.evaluation import EVALUATORS
    from shared.interventions import available

    return [*FAMILY_KEYS, *FIXED_TASKS, *available(), *(f"evaluate_{e}" for e in EVALUATORS)]


def _merge(lower: Any, upper: Any) -> Any:
    """Deep merge of two raw YAML values: mappings key by key, anything else replaced."""
    if isinstance(lower, dict) and isinstance(upper, dict):
        out = dict(lower)
        for key, value in upper.items():
            out[key] = _merge(lower.get(key), value) if key in lower else value
        return out
    return upper


def merge_cluster(*layers: dict[str, Any] | None, num_parameters: int | None = None) -> ClusterConfig:
    """Validate the merged raw ``cluster`` blocks (lowest precedence first) over the model-sized defaults.

    ``num_parameters`` is the model's size where the caller knows it (built-in
    models, local folders); a ``model_parameters`` in the blocks wins.  The
    defaults of ``resources`` follow from it and from ``accelerator``
    (:func:`sized_resources`); resources given in the blocks override them,
    except that ``accelerator: none`` removes every GPU request.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer:
            merged = _merge(merged, layer)
    probe = {k: merged[k] for k in ("accelerator", "model_parameters") if k in merged}
    settings = ClusterConfig.model_validate(probe)  # names a bad accelerator / model_parameters first
    size = settings.model_parameters or num_parameters
    defaults = ClusterConfig().model_dump(mode="json", exclude_none=True)
    defaults["resources"] = {k: r.model_dump(mode="json", exclude_none=True)
                             for k, r in sized_resources(size, settings.accelerator).items()}
    config = ClusterConfig.model_validate(_merge(defaults, merged))
    if config.accelerator == "none":
        config = config.model_copy(update={"resources": {
            k: r.model_copy(update={"accelerator_count": 0}) for k, r in config.resources.items()}})
    return config


#: name of the ConfigMap in manifests/ that holds the cluster's placement, and its data key
PLACEMENT_CONFIG_MAP = "lmcompose-placement"
PLACEMENT_KEY = "cluster.yaml"


class PlacementError(ValueError):
    """A placement file that is not a cluster block or does not hold the placement ConfigMap."""


def load_placement(path: Path | str) -> dict[str, Any]:
    """The raw ``cluster`` block of a placement file.

    The file is either a plain YAML mapping (the ``cluster`` block itself) or
    a YAML stream of Kubernetes objects -- e.g. the output of ``kubectl
    kustomize manifests/overlays/<name>`` -- containing the ConfigMap
    ``lmcompose-placement`` whose ``cluster.yaml`` key holds the block.  The
    result is validated by :func:`merge_cluster` together with the spec.
    """
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise PlacementError(f"placement file {path}: {exc}") from None
    objects = [d for d in docs if isinstance(d, dict) and "apiVersion" in d and "kind" in d]
    if not objects:
        if len(docs) != 1 or not isinstance(docs[0], dict):
            raise PlacementError(f"placement file {path}: expected one mapping (a cluster block) or Kubernetes objects")
        return docs[0]
    for obj in objects:
        if obj.get("kind") == "ConfigMap" and obj.get("metadata", {}).get("name") == PLACEMENT_CONFIG_MAP:
            text = (obj.get("data") or {}).get(PLACEMENT_KEY)
            if text is None:
                raise PlacementError(f"placement file {path}: ConfigMap {PLACEMENT_CONFIG_MAP} has no key {PLACEMENT_KEY!r}")
            block = yaml.safe_load(text) or {}
            if not isinstance(block, dict):
                raise PlacementError(f"placement file {path}: {PLACEMENT_CONFIG_MAP}/{PLACEMENT_KEY} is not a mapping")
            return block
    raise PlacementError(f"placement file {path}: no ConfigMap named {PLACEMENT_CONFIG_MAP} among its {len(objects)} objects")


def describe_error(exc: Exception) -> str:
    """``resources.ft.memory: not a Kubernetes quantity ...`` from a pydantic error of :func:`merge_cluster`."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    err = exc.errors()[0]
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = err["msg"].removeprefix("Value error, ")
    head, sep, rest = msg.partition(": ")
    if sep and re.fullmatch(r"resources\.[\w-]+", head):  # the resources validator names its own key
        loc, msg = head, rest
    return f"{loc or 'cluster'}: {msg}"


#: the ConfigMap in manifests/ that names the store, and its key
STORE_CONFIG_MAP = "lmcompose-store"
STORE_KEY = "LMCOMPOSE_STORE"


def load_store_uri(path: Path | str) -> str | None:
    """``LMCOMPOSE_STORE`` of the ``lmcompose-store`` ConfigMap in a rendered manifest file, if there is one."""
    try:
        docs = list(yaml.safe_load_all(Path(path).read_text()))
    except (OSError, yaml.YAMLError):
        return None
    for obj in docs:
        if isinstance(obj, dict) and obj.get("kind") == "ConfigMap" and obj.get("metadata", {}).get("name") == STORE_CONFIG_MAP:
            return (obj.get("data") or {}).get(STORE_KEY)
    return None

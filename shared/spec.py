"""Experiment specs: the YAML a user writes, validated before anything runs.

Example (``pipelines/experiments/demo.yaml``)::

    name: demo
    model: builtin:smollm2-135m
    interventions:
      - method: ft
      - method: wanda
        sweep: {sparsity: [0.25, 0.5]}
    compositions: {mode: permutations}
    evaluation: {evaluators: [edit, utility, forget, perplexity, compression]}
    data: {num_edits: 10}

Every problem is reported as one :class:`SpecError` whose message names the
field (``interventions[1].sweep.sparsity[0]``) and, where there is a fixed
set, the allowed values.  Validation includes reading the data files, so a
missing or malformed file fails here, not an hour into a run.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from shared.data import DataConfig, DataError
from shared.evaluation import EVALUATORS as EVALUATOR_REGISTRY
from shared.interventions import available, get_intervention
from shared.models import ModelSourceError, parse_source

#: evaluators a spec may name (the evaluation registry, in its order)
EVALUATORS: tuple[str, ...] = tuple(EVALUATOR_REGISTRY)


class SpecError(ValueError):
    """An invalid experiment spec; the message names the offending field."""


class InterventionSpec(BaseModel):
    """One intervention of the experiment: fixed parameters and an optional sweep."""

    model_config = ConfigDict(extra="forbid")
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    label: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        names = list(available())
        if v not in names:
            raise ValueError(f"unknown method {v!r}; allowed: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _check_sweep_and_params(self) -> "InterventionSpec":
        method = get_intervention(self.method)
        fields = method.params_model.model_fields
        if len(self.sweep) > 1:
            raise ValueError(f"sweep: at most one parameter may be swept per intervention, got {list(self.sweep)}")
        for name, values in self.sweep.items():
            if name not in fields:
                raise ValueError(f"sweep.{name}: {self.method} has no parameter {name!r}; parameters: {', '.join(fields)}")
            if name in self.params:
                raise ValueError(f"sweep.{name}: also fixed in params; a parameter is either fixed or swept")
            if not values:
                raise ValueError(f"sweep.{name}: needs at least one value")
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"sweep.{name}: values must be distinct, got {values}")
        # validate every concrete setting, so a bad sweep value fails now
        for i, setting in enumerate(self.settings_raw()):
            try:
                method.parse_params(setting)
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                where = f"sweep.{loc}[{self.sweep[loc].index(setting[loc])}]" if loc in self.sweep else f"params.{loc}"
                msg = err["msg"].removeprefix("Value error, ")
                raise ValueError(f"{where}: {msg} (got {err.get('input')!r})") from None
        return self

    def settings_raw(self) -> list[dict[str, Any]]:
        """Raw parameter dicts: ``params`` combined with each sweep value."""
        if not self.sweep:
            return [dict(self.params)]
        (name, values), = self.sweep.items()
        return [{**self.params, name: v} for v in values]

    def steps(self) -> list[dict[str, Any]]:
        """Canonical steps (method + full parameters with defaults), one per sweep value."""
        method = get_intervention(self.method)
        return [
            {"method": self.method, "params": method.parse_params(raw).model_dump(mode="json")}
            for raw in self.settings_raw()
        ]

    @property
    def swept_param(self) -> str | None:
        return next(iter(self.sweep), None)

    @property
    def name(self) -> str:
        return self.label or self.method


class CompositionSpec(BaseModel):
    """Which orders to run.

    * ``permutations``: every order of all listed interventions (2 interventions
      -> both orders; 3 -> 6 orders).
    * ``cross``: every ordered pair (i, j) with i and j from different ``groups``
      (the paper's editor x compressor studies), both orders.
    * ``subsets``: every order of every set of ``sizes`` interventions (e.g.
      ``[2, 3]``: all pairs and all triples, each in all its orders); with
      ``groups``, a set takes at most one member of each group.  Shared
      prefixes are computed once, as always.
    Each intervention alone and the base model are always included unless
    switched off.  ``recompress`` is the re-compression policy (see
    :func:`shared.planner.with_recompression`).
    """

    model_config = ConfigDict(extra="forbid")
    mode: Literal["permutations", "cross", "subsets"] = "permutations"
    groups: list[list[str]] = Field(default_factory=list)
    sizes: list[int] = Field(
        default_factory=list,
        description="mode 'subsets': the sizes of the intervention sets to run in all their orders, e.g. [2, 3]",
    )
    recompress: Literal["reapply", "reproject", "none"] = Field(
        "reapply",
        description="when a compressor precedes an edit or unlearning step: 'reapply' runs the same "
        "compressor again after it (the paper), 'reproject' snaps the weights back onto the recorded "
        "grid and mask, 'none' leaves the model as the last step left it",
    )
    include_singles: StrictBool = True
    include_base: StrictBool = True
    max_compositions: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="refuse a spec that expands into more compositions than this (orders x sweep values, "
        "before edit batches) -- a guard against a typo'd sweep; the paper's largest study has 158",
    )


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    evaluators: list[str] = Field(default_factory=lambda: list(EVALUATORS))
    batch_size: int = Field(16, ge=1, le=512)
    limit: int | None = Field(None, ge=1, le=10**9, description="evaluate only the first N questions of each MCQ set")
    max_length: int = Field(256, ge=16, le=8192, description="perplexity window in tokens")
    parallelism: int = Field(0, ge=0, le=10_000, description="evaluation tasks running at once (0: no limit; kfp.local runs two)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16",
        description="precision every model is evaluated in, whatever the dtype its last step left "
        "(the reference code let it vary); bfloat16 halves CPU evaluation time here with the same answers",
    )
    mcq_format: Literal["cloze", "letters"] = Field(
        "cloze",
        description="how local multiple-choice sets are scored: cloze (each choice's text as the answer) or "
        "letters (choices listed, the letters A-D scored: the format of lm-eval's mmlu/wmdp tasks, so local "
        "and cluster numbers are comparable); lm-eval tasks always use their own format",
    )

    @field_validator("evaluators")
    @classmethod
    def _known_evaluators(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in EVALUATORS:
                raise ValueError(f"unknown evaluator {name!r}; allowed: {', '.join(EVALUATORS)}")
        if len(set(v)) != len(v):
            raise ValueError("evaluators must not repeat")
        return v


def _check_model_source(v: str) -> str:
    """A model source that can be found: parsed, and a local folder that exists and holds a config."""
    try:
        parsed = parse_source(v)
    except ModelSourceError as exc:
        raise ValueError(str(exc)) from None
    if parsed.kind == "local":  # found now, not by the first task
        folder = Path(parsed.name)
        if not folder.exists():
            raise ValueError(f"local model folder {folder} does not exist")
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json in it)")
    return v


def default_model_label(source: str) -> str:
    """A short name for a model in run names and report columns: ``hf:meta-llama/Meta-Llama-3-8B`` -> ``meta-llama-3-8b``."""
    parsed = parse_source(source)
    name = parsed.name.rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:24].strip("-") or "model"


class ModelEntry(BaseModel):
    """One base model of a multi-model study (``models:``), with per-model parameter overrides.

    ``params`` maps an intervention's name (its label, else its method) to
    parameters that replace the spec's for this model only -- e.g. MEMIT's
    ``layers`` for a model with fewer layers.  Everything else is the spec's.
    """

    model_config = ConfigDict(extra="forbid")
    source: str
    label: str | None = Field(None, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=24)
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _check_model_source(v)

    @property
    def name(self) -> str:
        return self.label or default_model_label(self.source)


class ExperimentSpec(BaseModel):
    """A whole experiment."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=60)
    description: str = ""
    model: str = "builtin:smollm2-135m"
    models: list[ModelEntry] = Field(
        default_factory=list,
        max_length=16,
        description="several base models (at most 16): the study runs once per model and a cross-model report "
        "compares them",
    )
    trust_remote_code: StrictBool = Field(False, description="run the model repository's own code (true/false only)")
    interventions: list[InterventionSpec] = Field(min_length=1)
    compositions: CompositionSpec = Field(default_factory=CompositionSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    data: DataConfig = Field(default_factory=DataConfig)
    store: str | None = Field(None, description="store URI; the CLI's --store overrides it")
    cluster: dict[str, Any] | None = Field(
        None, description="task placement in a Kubernetes cluster (shared/cluster.py); ignored by kfp.local"
    )

    @field_validator("store")
    @classmethod
    def _plain_store_uri(cls, v: str | None) -> str | None:
        """No credentials or options in the spec (they would reach compiled YAML); never echo them."""
        from shared.store import StoreError, check_store_uri

        if v:
            try:
                check_store_uri(v)
            except StoreError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        from shared.cluster import describe_error, merge_cluster

        if v is None:
            return v
        try:
            merge_cluster(v)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ValueError(describe_error(exc)) from None
        return v

    def cluster_config(self, placement: dict[str, Any] | None = None):
        """The validated cluster settings: defaults, then ``placement`` (a cluster-wide file), then this spec's block."""
        from shared.cluster import merge_cluster
        from shared.models import known_num_parameters

        return merge_cluster(placement, self.cluster, num_parameters=known_num_parameters(self.model))

    @field_validator("model")
    @classmethod
    def _model_source(cls, v: str) -> str:
        return _check_model_source(v)

    @field_validator("models", mode="before")
    @classmethod
    def _model_entries(cls, v: Any) -> Any:
        """``models: [builtin:smollm2-135m, {source: hf:..., params: {...}}]``: plain strings are sources."""
        if isinstance(v, list):
            return [{"source": e} if isinstance(e, str) else e for e in v]
        return v

    @model_validator(mode="after")
    def _check_compositions(self) -> "ExperimentSpec":
        names = [i.name for i in self.interventions]
        if len(set(names)) != len(names):
            raise ValueError(
                f"interventions: names must be unique, got {names}; give repeated methods a distinct 'label'"
            )
        comp = self.compositions
        if comp.mode == "subsets":
            if not comp.sizes:
                raise ValueError("compositions.sizes: mode 'subsets' needs the set sizes to run, e.g. [2, 3]")
            limit = len(comp.groups) if comp.groups else len(names)
            for size in comp.sizes:
                if not 2 <= size <= limit:
                    raise ValueError(f"compositions.sizes: {size} is not between 2 and {limit} "
                                     f"(the number of {'groups' if comp.groups else 'interventions'})")
            if len(set(comp.sizes)) != len(comp.sizes):
                raise ValueError("compositions.sizes: sizes must not repeat")
        elif comp.sizes:
            raise ValueError("compositions.sizes: only used with mode 'subsets'")
        if comp.mode == "cross" and len(comp.groups) < 2:
            raise ValueError("compositions.groups: mode 'cross' needs at least two groups")
        if comp.groups:
            if comp.mode == "permutations":
                raise ValueError("compositions.groups: only used with mode 'cross' or 'subsets'")
            seen: set[str] = set()
            for gi, group in enumerate(comp.groups):
                for member in group:
                    if member not in names:
                        raise ValueError(f"compositions.groups[{gi}]: {member!r} is not an intervention name; names: {', '.join(names)}")
                    if member in seen:
                        raise ValueError(f"compositions.groups[{gi}]: {member!r} is in two groups")
                    seen.add(member)
        if comp.mode == "permutations" and len(self.interventions) > 4:
            raise ValueError(
                f"compositions.mode: 'permutations' of {len(self.interventions)} interventions gives "
                f"{len(list(itertools.permutations(names)))} orders; use mode 'cross' with groups"
            )
        self._check_size()
        if self.models:
            self._check_models()
        else:
            self._check_against_model()
        return self

    def _check_models(self) -> None:
        if "model" in self.model_fields_set:
            raise ValueError("models: give either 'model' (one base model) or 'models' (several), not both")
        labels = [m.name for m in self.models]
        if len(self.models) < 2:
            raise ValueError("models: a multi-model study needs at least two models; use 'model' for one")
        if len(set(labels)) != len(labels):
            raise ValueError(f"models: model labels must be unique, got {labels}; give each entry a distinct 'label'")
        names = [i.name for i in self.interventions]
        for mi, entry in enumerate(self.models):
            for target in entry.params:
                if target not in names:
                    raise ValueError(f"models[{mi}].params.{target}: not an intervention name; names: {', '.join(names)}")
            if len(f"{self.name}-{entry.name}") > 60:
                raise ValueError(f"models[{mi}].label: run name {self.name}-{entry.name} is longer than 60 characters; "
                                 "give the model a shorter 'label'")
        for mi in range(len(self.models)):
            try:
                self.for_model(mi)
            except ValidationError as exc:
                raise ValueError(f"models[{mi}] ({labels[mi]}): {_format_validation_error(exc)}") from None

    def for_model(self, index: int) -> "ExperimentSpec":
        """The single-model study of ``models[index]``: its source, its parameter overrides, run name ``<name>-<label>``."""
        entry = self.models[index]
        raw = self.model_dump(mode="python", exclude={"models"}, exclude_unset=False)
        raw["model"], raw["name"] = entry.source, f"{self.name}-{entry.name}"
        raw["description"] = (self.description + " " if self.description else "") + f"[model {entry.name}]"
        for item in raw["interventions"]:
            name = item.get("label") or item["method"]
            if name in entry.params:
                item["params"] = {**item.get("params", {}), **entry.params[name]}
        return ExperimentSpec.model_validate(raw)

    def per_model(self) -> list["ExperimentSpec"]:
        """One single-model spec per entry of ``models`` (the spec itself when it names one model)."""
        return [self.for_model(i) for i in range(len(self.models))] if self.models else [self]

    def model_labels(self) -> list[str]:
        return [m.name for m in self.models] if self.models else [default_model_label(self.model)]

    def composition_count(self) -> int:
        """Compositions the spec expands into (base included), counted without expanding them."""
        from math import prod

        sizes = {i.name: max(1, len(i.settings_raw())) for i in self.interventions}
        return int(self.compositions.include_base) + sum(prod(sizes[n] for n in order) for order in self.orders())

    def _check_size(self) -> None:
        """The whole study's size against ``max_compositions``: every model's compositions count."""
        per_model = self.composition_count()
        n = per_model * max(1, len(self.models))
        limit = self.compositions.max_compositions
        if n > limit:
            what = f"{len(self.models)} models x {per_model} compositions" if self.models else "orders x sweep values"
            raise ValueError(
                f"compositions.max_compositions: the spec expands into {n} compositions ({what}), "
                f"more than the limit {limit}; shorten a sweep, or raise compositions.max_compositions if you mean it"
            )

    def _check_against_model(self) -> None:
        """Parameters that cannot work on this model (e.g. a group size that does not divide its widths)."""
        from shared.models import known_input_widths, known_num_layers

        num_layers = known_num_layers(self.model)
        if num_layers:
            for i, entry in enumerate(self.interventions):
                method = get_intervention(entry.method)
                for setting in entry.steps():
                    try:
                        method.check_layers(method.parse_params(setting["params"]), num_layers)
                    except ValueError as exc:
                        field, _, msg = str(exc).partition(": ")
                        where = "sweep" if field in entry.sweep else "params"
                        default = "" if field in entry.sweep or field in entry.params else " (the default)"
                        raise ValueError(f"interventions[{i}].{where}.{field}: {msg}{default} (model {self.model})") from None
        widths = known_input_widths(self.model)
        if not widths:
            return
        for i, entry in enumerate(self.interventions):
            method = get_intervention(entry.method)
            for setting in entry.steps():
                try:
                    method.check_model(method.parse_params(setting["params"]), widths)
                except ValueError as exc:
                    field = next((f for f in ("group_size",) if f in str(exc)), None)
                    where = f"interventions[{i}]" + (f".{'sweep' if field in entry.sweep else 'params'}.{field}" if field else "")
                    raise ValueError(f"{where}: {exc} (model {self.model})") from None

    def intervention(self, name: str) -> InterventionSpec:
        return next(i for i in self.interventions if i.name == name)

    def orders(self) -> list[tuple[str, ...]]:
        """Intervention-name sequences to run (before sweep expansion), singles included."""
        names = [i.name for i in self.interventions]
        out: list[tuple[str, ...]] = []
        if self.compositions.include_singles:
            out += [(n,) for n in names]
        if self.compositions.mode == "permutations":
            if len(names) > 1:
                out += list(itertools.permutations(names))
        elif self.compositions.mode == "subsets":
            group_of = {m: gi for gi, g in enumerate(self.compositions.groups) for m in g}
            pool = [n for n in names if n in group_of] if group_of else names
            for size in sorted(self.compositions.sizes):
                for subset in itertools.combinations(pool, size):
                    if group_of and len({group_of[m] for m in subset}) < size:
                        continue
                    out += list(itertools.permutations(subset))
        else:
            groups = self.compositions.groups
            for ga, gb in itertools.permutations(range(len(groups)), 2):
                out += [(a, b) for a in groups[ga] for b in groups[gb]]
        return out


def _format_validation_error(exc: ValidationError) -> str:
    errors = exc.errors()
    # an unknown key explains a "missing" one (a typo): report it first, with the likely intended name
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    if err["type"] == "extra_forbidden":
        import difflib

        *parent, key = [str(p) for p in err["loc"]]
        where = ".".join(parent)
        known = _known_keys(where)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else (f"; allowed: {', '.join(known)}" if known else "")
        return f"{where + '.' if where else ''}{key}: unknown key{hint}"
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = err["msg"].removeprefix("Value error, ")
    # validators of a whole entry report the sub-field first ("sweep.sparsity[1]: ..."): join the paths
    head, sep, rest = msg.partition(": ")
    if sep and loc and re.fullmatch(r"(sweep|params)\.[\w.\[\]]+", head):
        loc, msg = f"{loc}.{head}", rest
    elif sep and loc == "cluster" and re.fullmatch(r"[\w.\[\]-]+", head):
        loc, msg = f"{loc}.{head}", rest
    elif sep and not loc and re.fullmatch(r"(interventions\[\d+\]|compositions\.)[\w.\[\]]*", head):
        loc, msg = head, rest
    elif sep and not loc and re.fullmatch(r"models(\[\d+\][\w.\[\]]*( \([\w-]+\))?)?", head):
        loc, msg = head, rest
    extra = f" ({len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return f"{loc or 'spec'}: {msg}{extra}"


def _known_keys(where: str) -> list[str]:
    """The keys a section of the spec accepts (for typo hints)."""
    models: dict[str, Any] = {"": ExperimentSpec, "compositions": CompositionSpec, "evaluation": EvaluationSpec,
                              "data": DataConfig}
    model = models.get(re.sub(r"\[\d+\]$", "", where))
    if model is None and re.fullmatch(r"interventions\.\d+|interventions\[\d+\]", where):
        model = InterventionSpec
    if model is None and re.fullmatch(r"models\.\d+|models\[\d+\]", where):
        model = ModelEntry
    return list(model.model_fields) if model is not None else []


def parse_spec(raw: dict[str, Any], check_data: bool = True, fetch_remote: bool = True) -> ExperimentSpec:
    """Validate a spec dict; raise :class:`SpecError` naming the field.

    ``check_data`` reads every data file; ``fetch_remote=False`` leaves
    ``s3://`` inputs to the pipeline's steps (compiling on a machine that
    cannot read the cluster's bucket).
    """
    if not isinstance(raw, dict):
        raise SpecError("spec: the top level must be a mapping")
    from shared.finite import spec_number_problems

    # YAML's .inf/.nan are numbers: refused wherever they stand (.inf crashed the compiled pipeline's protobuf)
    non_finite, too_large = spec_number_problems(raw)
    if non_finite:
        raise SpecError("{}: {}".format(*non_finite[0]))
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc)) from None
    # a field's own bound names it best (above); what no bound caught, this does -- a string such as
    # 'inf' in a float field (cluster.timeout_hours) is a number only after validation
    if spec.cluster:
        cluster_non_finite, cluster_large = spec_number_problems(spec.cluster_config(), "cluster")
        too_large = cluster_non_finite + too_large + cluster_large
    if too_large:
        raise SpecError("{}: {}".format(*too_large[0]))
    if check_data:
        try:
            spec.data.check_files(fetch_remote=fetch_remote)
        except DataError as exc:
            raise SpecError(f"data: {exc}") from None
    return spec


def load_spec(path: Path | str, check_data: bool = True, fetch_remote: bool = True) -> ExperimentSpec:
    """Read and validate a YAML spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    return parse_spec(raw, check_data=check_data, fetch_remote=fetch_remote)

"""Execution of plan steps against the store: the library entry points behind every component.

Each function here does one unit of pipeline work -- prepare the base model,
apply one intervention, aggregate (evaluation is :mod:`shared.model_tasks`) -- reading its inputs from
and writing its outputs to the store under content-addressed keys.  Because
keys are content-addressed, each function first looks for its result and
returns it if present: re-running an experiment resumes instead of starting
over, and KFP's own cache is not needed.

The functions take and return plain strings / JSON so the KFP components that
wrap them stay one-liners.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.compression_state import STATE_FILE, load_state, read_grid, save_state
from shared.data import DataConfig, ExperimentData
from shared.interventions import get_intervention
from shared.store import Store, StoreError, checkpoint_key, open_store, result_key

log = logging.getLogger("lmcompose")

def _data(data_json: str | dict[str, Any]) -> ExperimentData:
    raw = json.loads(data_json) if isinstance(data_json, str) else data_json
    return ExperimentData(DataConfig.model_validate(raw))


def _temp_dir(store: Store) -> tempfile.TemporaryDirectory:
    """A scratch folder for writing a checkpoint before it is committed to the store."""
    return tempfile.TemporaryDirectory(dir=store.scratch_parent(), prefix="write-")


def keyed_steps(steps: list[dict[str, Any]], data: ExperimentData) -> list[dict[str, Any]]:
    """Steps as they enter checkpoint keys: method, version, parameters, data digests."""
    out = []
    for step in steps:
        method = get_intervention(step["method"])
        params = method.parse_params(step["params"]).model_dump(mode="json")
        out.append(
            {
                "method": step["method"],
                "version": method.version,
                "params": params,
                "data": {name: data.digest(name) for name in method.data_inputs},
            }
        )
    return out


def model_key_for(base_digest: str, steps: list[dict[str, Any]], data: ExperimentData) -> str:
    return checkpoint_key(base_digest, keyed_steps(steps, data))


def _alias_key(source: str) -> str:
    from shared.models import source_identity

    return f"alias/base-{source_identity(source)}.json"


def prepare_base(store_uri: str, model_source: str, trust_remote_code: bool = False) -> tuple[str, str]:
    """Make sure the base model is in the store; return ``(base_digest, model_key)``.

    The built-in GGUF is dequantized once; later runs find the cached
    safetensors through an alias keyed by the GGUF's own digest.  The digest
    covers the weights *and* the tokenizer (:func:`shared.models.base_content_digest`):
    every checkpoint key descends from it, so a base whose tokenizer changed
    (e.g. a corrected EOS) never reuses results computed with the old one.
    """
    from shared.lease import compute_once
    from shared.models import base_content_digest, load_model, materialize_base

    store = open_store(store_uri)
    alias = _alias_key(model_source)

    def stored() -> tuple[str, str] | None:
        if store.has_json(alias):
            digest = store.get_json(alias)["digest"]
            key = checkpoint_key(digest, [])
            if store.has_checkpoint(key):
                return digest, key
        return None

    found = stored()
    if found:
        log.info("base model %s found in store (%s)", model_source, found[1])
        return found

    def prepare() -> None:
        with _temp_dir(store) as tmp:
            materialize_base(model_source, Path(tmp))
            model, tokenizer = load_model(Path(tmp), trust_remote_code=trust_remote_code)
            from shared.finite import check_finite_tensors

            # a base with NaN/inf weights would give "results" for every composition made from it
            check_finite_tensors(model, f"base model {model_source} is not finite", "nothing stored")
            digest = base_content_digest(model, tokenizer)
            num_parameters = sum(p.numel() for p in model.parameters())  # tied weights once (the cross-model report's size)
            del model
            key = checkpoint_key(digest, [])
            if not store.has_checkpoint(key):
                store.put_checkpoint(key, Path(tmp), {"source": model_source, "model_digest": digest, "steps": [],
                                                      "records": [], "num_parameters": num_parameters})
        store.put_json(alias, {"digest": digest, "source": model_source})
        log.info("base model %s stored as %s", model_source, key)

    # one preparation per base model, however many runs start at once (a lease, like every step's)
    compute_once(store, alias, lambda: stored() is not None, prepare)
    found = stored()
    if found is None:
        raise StoreError(f"base model {model_source}: preparation finished but {alias} names no committed checkpoint")
    return found


def run_step(
    store_uri: str,
    base_digest: str,
    steps_json: str,
    data_json: str,
    parent_key: str = "",
    trust_remote_code: bool = False,
) -> str:
    """Apply the last of ``steps`` to the checkpoint of the others; return the new key.

    Returns at once if the result is already in the store.  The new checkpoint
    is written to a scratch folder and committed (manifest last) only after
    the intervention finished, so a failed or killed step leaves nothing a
    later step would trust.
    """
    steps = json.loads(steps_json)
    if not steps:
        raise ValueError("run_step needs at least one step")
    store = open_store(store_uri)
    data = _data(data_json)
    keyed = keyed_steps(steps, data)
    key = checkpoint_key(base_digest, keyed)
    if store.has_checkpoint(key):
        log.info("step %s already in store as %s; skipping", steps[-1]["method"], key)
        return key
    expected_parent = checkpoint_key(base_digest, keyed[:-1])
    if parent_key and parent_key != expected_parent:
        raise ValueError(f"parent key {parent_key} does not match the steps (expected {expected_parent})")
    from shared.lease import compute_once

    compute_once(store, key, lambda: store.has_checkpoint(key),
                 lambda: apply_step(store, base_digest, expected_parent, keyed, steps[-1], data, trust_remote_code))
    return key


def apply_step(
    store: Store,
    base_digest: str,
    parent_key: str,
    keyed: list[dict[str, Any]],
    step: dict[str, Any],
    data: ExperimentData,
    trust_remote_code: bool = False,
    source: str = "",
) -> str:
    """Apply ``step`` to the committed checkpoint ``parent_key``; commit the result under the key of ``keyed``.

    ``keyed`` is the keyed form of every step from the base model, ``step``
    the last of them.  The new checkpoint is written to a scratch folder and
    committed (manifest last) only after the intervention finished, so a
    failed or killed step leaves nothing a later step would trust.
    """
    import torch

    from shared.models import default_threads, load_model, save_model, step_dtype

    key = checkpoint_key(base_digest, keyed)
    folder, manifest = verified_checkpoint(store, parent_key, trust_remote_code)
    parent_meta = manifest["meta"]

    default_threads()
    model, tokenizer = load_model(folder, dtype=step_dtype(), trust_remote_code=trust_remote_code)
    method = get_intervention(step["method"])
    params = method.parse_params(step["params"])
    parent_state, parent_grid_args = load_state(folder)
    torch.manual_seed(0)
    started = time.time()
    extra: dict[str, Any] = {}
    if method.reads_compression_state:
        extra["state"] = (parent_state, parent_grid_args)
    content = ""
    if method.uses_tensor_cache or method.uses_lineage_state:
        from shared.models import model_digest

        content = model_digest(model)  # statistics belong to this exact model state, never to a name
    if method.uses_tensor_cache:
        extra["cache"] = _content_cache(store, content)
    if method.uses_lineage_state:
        from shared.lineage_state import Lineage, load_entry

        extra["lineage"] = Lineage(entry=load_entry(folder, method.name), parent_key=parent_key, model_digest=content,
                                   statistics_of=_lineage_statistics(store, trust_remote_code))
    record = method.apply(model, tokenizer, params, data, **extra) or {}
    seconds = time.time() - started
    log.info("applied %s in %.1f s", method.name, seconds)

    new_state = record.pop("state", None)
    new_lineage = record.pop("lineage_state", None)
    _check_output_finite(method.name, params.model_dump(mode="json"), parent_key, model, new_state)
    if new_lineage is not None:
        from shared.finite import check_finite_tensors

        check_finite_tensors(new_lineage.tensors, f"{method.name} on {parent_key} made its lineage state non-finite",
                             "nothing committed")
    compression = _next_compression(parent_meta.get("compression"), record.get("compression"), method.category.value)
    meta = {
        "base_digest": base_digest,
        "source": source or parent_meta.get("source", ""),
        # how to make this checkpoint again from its parent, should it be found corrupt (verified_checkpoint)
        "recipe": {"parent": parent_key, "step": step, "data": data.config.model_dump(mode="json")},
        "steps": keyed,
        "records": parent_meta.get("records", []) + [{"method": method.name, "record": record, "seconds": seconds}],
        "compression": compression,
    }
    with _temp_dir(store) as tmp:
        save_model(model, tokenizer, Path(tmp))
        _write_state(Path(tmp), folder, parent_meta.get("compression"), new_state)
        from shared.lineage_state import carry

        carry(folder, Path(tmp), method.name, new_lineage)  # e.g. AlphaEdit's protected keys, for later steps
        store.put_checkpoint(key, Path(tmp), meta)
    return key


def _content_cache(store: Store, digest: str) -> Any:
    """A ``cache(name, config, compute)`` callable bound to a model's content digest (``.model_digest``)."""
    from shared.cache import cached_tensors

    def cache(name: str, config: dict[str, Any], compute: Any) -> Any:
        return cached_tensors(store, name, digest, config, compute)

    cache.model_digest = digest  # type: ignore[attr-defined]
    return cache


class _CheckpointModel:
    """A stored checkpoint's model, loaded at its first use (a cache hit never loads it); its digest is checked."""

    def __init__(self, store: Store, key: str, digest: str, trust_remote_code: bool) -> None:
        self._args = (store, key, digest, trust_remote_code)
        self._model: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._model is None:
            from shared.models import load_model, model_digest, step_dtype

            store, key, digest, trust = self._args
            if not key:
                raise StoreError(f"the key statistics of model {digest[:12]} are not cached and no checkpoint key "
                                 "names that model")
            folder, _ = verified_checkpoint(store, key, trust)
            model, _tok = load_model(folder, dtype=step_dtype(), trust_remote_code=trust)
            if model_digest(model) != digest:
                raise StoreError(f"checkpoint {key} does not hold model {digest[:12]} (its content changed)")
            log.info("loaded %s to measure its key statistics", key)
            self._model = model
        return getattr(self._model, name)


def _lineage_statistics(store: Store, trust_remote_code: bool) -> Any:
    """``(digest, key, windows, layers) -> (covs, info)``: key statistics of an earlier checkpoint of a lineage.

    Through the content-keyed cache under that model's digest (what its own
    step stored); on a miss the checkpoint ``key`` is loaded and measured.
    """

    def statistics_of(digest: str, key: str, windows: list[list[int]], layers: list[int]) -> Any:
        from shared.interventions._memit_stats import cached_key_second_moments
        from shared.interventions.memit import STATS_CORPUS

        model = _CheckpointModel(store, key, digest, trust_remote_code)
        return cached_key_second_moments(model, windows, layers, STATS_CORPUS, _content_cache(store, digest))

    return statistics_of


def _check_output_finite(method: str, params: dict[str, Any], parent_key: str, model: Any,
                         state: dict[str, Any] | None) -> None:
    """Refuse to commit a step whose weights (or compression state) hold NaN or inf: one line naming the step.

    Raised before anything is written, so the store is left as it was; the
    step's parameters are in the message because they are what to change.
    """
    from shared.finite import check_finite_tensors

    what = f"{method} with params {json.dumps(params, sort_keys=True)} on {parent_key}"
    check_finite_tensors(model, f"{what} made the weights non-finite", "nothing committed")
    if state and state.get("tensors"):
        check_finite_tensors(state["tensors"], f"{what} made its compression state non-finite", "nothing committed")


def verified_checkpoint(store: Store, key: str, trust_remote_code: bool = False) -> tuple[Path, dict[str, Any]]:
    """:meth:`Store.get_checkpoint`, recomputing the checkpoint at once if it is found corrupt.

    A corrupt checkpoint is quarantined by the store; its manifest (read
    before) records how it was made -- the parent key, the step and the data
    (``recipe``), or the base model's source -- so the task that needed it
    makes it again (recursively, if the parent is corrupt too) instead of
    failing every run until someone intervenes.  A checkpoint without a recipe
    (made before recipes were recorded) is only quarantined; the next run's
    producing task recomputes it.
    """
    from shared.store import CorruptCheckpoint

    try:
        meta = store.checkpoint_meta(key)
    except StoreError:
        meta = None
    try:
        return store.get_checkpoint(key)
    except CorruptCheckpoint as exc:
        if "quarantined" not in str(exc) or meta is None:
            raise
        log.warning("%s -- recomputing it now", exc)
        recipe = meta.get("recipe")
        if recipe:
            from shared.lease import compute_once

            data = ExperimentData(DataConfig.model_validate(recipe["data"]))
            # apply_step reads the parent through verified_checkpoint again: a corrupt parent is remade first
            compute_once(store, key, lambda: store.has_checkpoint(key), lambda: apply_step(
                store, meta["base_digest"], recipe["parent"], meta["steps"], recipe["step"], data,
                trust_remote_code, source=meta.get("source", "")))
        elif not meta.get("steps") and meta.get("source"):  # the base model
            prepare_base(store.uri, meta["source"], trust_remote_code)
        else:
            raise
        return store.get_checkpoint(key)


def _next_compression(parent: dict[str, Any] | None, new: dict[str, Any] | None, category: str) -> dict[str, Any] | None:
    """The compression record of a new checkpoint, from its parent's and the step's own.

    * a compressor's record, with the compression it was applied on (if still
      intact) as ``previous`` -- e.g. Wanda then GPTQ is pruned *and* quantized;
    * a compressor without its own record (``reproject``) restores the parent's;
    * any other step marks the parent's as ``modified_after``: the weights have
      left their grid / mask until a re-compression step restores them.
    """
    if new is not None:
        if parent and not parent.get("modified_after"):
            return {**new, "previous": parent}
        return dict(new)
    if parent is None:
        return None
    if category == "compress":
        return {k: v for k, v in parent.items() if k != "modified_after"}
    return {**parent, "modified_after": True}


def _write_state(dest: Path, parent_folder: Path, parent_compression: dict[str, Any] | None,
                 new_state: dict[str, Any] | None) -> None:
    """Write the new checkpoint's compression state (scales, zero points, masks) beside its weights.

    A compressor's state is merged over its parent's when the parent's
    compression was still intact (pruned, then quantized: both mask and grid
    hold).  Other steps carry the parent's state unchanged, so a later
    ``reproject`` step finds what to restore.
    """
    parent_tensors, _ = load_state(parent_folder)
    parent_grid = read_grid(parent_folder)
    if new_state is None:
        if parent_tensors:
            shutil.copy2(Path(parent_folder) / STATE_FILE, dest / STATE_FILE)
        return
    intact = parent_compression is not None and not parent_compression.get("modified_after")
    tensors = {**(parent_tensors if intact else {}), **new_state["tensors"]}
    grid = new_state.get("grid") or (parent_grid if intact else None)
    if tensors:
        save_state(dest, tensors, grid)


#: evaluation options that are part of a result's key only when they differ from these defaults
OPTIONS_KEYED_ONLY_OFF_DEFAULT: dict[str, Any] = {"mcq_format": "cloze"}


def evaluation_config(evaluator: str, data: ExperimentData, options: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation result is keyed by besides the model: its options and its data's digests."""
    from shared.evaluation import EVALUATOR_DATA

    if evaluator not in EVALUATOR_DATA:
        raise KeyError(f"unknown evaluator {evaluator!r}; allowed: {', '.join(EVALUATOR_DATA)}")
    # options added after results were stored are left out at their default, so those results keep their keys
    keyed = {k: v for k, v in options.items() if OPTIONS_KEYED_ONLY_OFF_DEFAULT.get(k, object()) != v}
    config: dict[str, Any] = {"options": keyed, "data": {name: data.digest(name) for name in EVALUATOR_DATA[evaluator]}}
    version = EVALUATOR_VERSIONS.get(evaluator, 1)
    if version != 1:  # version 1 results keep the keys they were stored under
        config["version"] = version
    return config


#: bump an evaluator's version when what it computes changes, so results of the old code are not reused
#: (edit 2: generations are continued past space-only tokens and clipped to the kept target length)
EVALUATOR_VERSIONS = {"edit": 2}


def collect_results(store_uri: str, base_digest: str, plan_json: str, data_json: str, options_json: str = "{}"):
    """The results table (docs/results-schema.md) of a plan, read from the store: one row per composition.

    With several edit batches (``data.num_batches``) each criterion is the
    mean over the batches, ``model_key`` lists the batches' checkpoint keys
    joined by ``+``, and ``num_batches`` says how many were averaged; the rows
    of the single batches are :func:`collect_batch_results`.
    """
    from shared.criteria import CRITERIA

    by_batch = collect_batch_results(store_uri, base_digest, plan_json, data_json, options_json)
    return average_over_batches(by_batch, list(CRITERIA))


def average_over_batches(by_batch: Any, criteria: list[str]) -> Any:
    """One row per composition from per-batch rows: criteria averaged (the paper averaged 10 batches)."""
    first = by_batch.groupby("composition", sort=False).first()
    keys = by_batch.groupby("composition", sort=False)["model_key"].agg(lambda ks: "+".join(dict.fromkeys(ks)))
    means = by_batch.groupby("composition", sort=False)[criteria].mean()
    counts = by_batch.groupby("composition", sort=False)["edit_batch"].nunique()
    out = first.drop(columns=["edit_batch"])
    out[criteria] = means
    out["model_key"] = keys
    out["num_batches"] = counts
    return out.reset_index()[[c for c in by_batch.columns if c != "edit_batch"] + ["num_batches"]]


def collect_batch_results(store_uri: str, base_digest: str, plan_json: str, data_json: str, options_json: str = "{}",
                          items_out: list[Any] | None = None):
    """The per-batch results table: one row per composition and edit batch (column ``edit_batch``).

    A missing evaluation is an error: the aggregator runs after every
    evaluation task, so a gap means a task failed and the table would lie.
    ``items_out``, when given, receives one :class:`shared.uncertainty.ItemRecord`
    per (composition, batch) with the per-item scores of its evaluations.
    """
    import pandas as pd

    plan_obj = json.loads(plan_json)
    config = _data(data_json).config
    frames = []
    for b in range(plan_obj.get("num_batches", 1)):
        frame = _collect_one_batch(store_uri, base_digest, plan_json, ExperimentData(config.for_batch(b)), options_json,
                                   b, items_out)
        frame.insert(1, "edit_batch", b)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _collect_one_batch(store_uri: str, base_digest: str, plan_json: str, data: ExperimentData, options_json: str,
                       batch: int = 0, items_out: list[Any] | None = None):
    import math

    import pandas as pd

    from shared.criteria import CRITERIA
    from shared.item_scores import items_from_json
    from shared.planner import Plan
    from shared.uncertainty import ItemRecord

    store = open_store(store_uri)
    plan = Plan.from_json(json.loads(plan_json))
    options = json.loads(options_json) if isinstance(options_json, str) else options_json
    max_steps = max((len(c["steps"]) for c in plan.compositions), default=0)
    rows = []
    for comp in plan.compositions:
        node = plan.nodes[comp["node"]]  # the steps run: the composition's plus any re-compression
        key = model_key_for(base_digest, node.steps, data)
        steps = comp["steps"]
        row: dict[str, Any] = {
            "model_key": key,
            "n_steps": len(steps),
            "composition": comp["label"],
            "methods": ">".join(s["method"] for s in steps),
            "recompress": comp.get("recompress", ""),
        }
        for k in range(1, max_steps + 1):
            step = steps[k - 1] if k <= len(steps) else None
            row[f"step{k}_method"] = step["method"] if step else ""
            row[f"step{k}_params"] = json.dumps(step["params"], sort_keys=True) if step else ""
        sweep = comp.get("sweep")
        row["sweep_method"] = sweep["method"] if sweep else ""
        row["sweep_param"] = sweep["param"] if sweep else ""
        row["sweep_value"] = float(sweep["value"]) if sweep else math.nan
        for name in CRITERIA:
            row[name] = math.nan
        items: dict[str, Any] = {}
        for evaluator in plan.evaluators:
            rkey = result_key(key, evaluator, evaluation_config(evaluator, data, options))
            if not store.has_json(rkey):
                raise KeyError(f"evaluation {evaluator} of {comp['label']} ({key}) is missing from the store")
            stored = store.get_json(rkey)
            row.update(stored["criteria"])
            items.update(items_from_json(stored.get("items")))
        rows.append(row)
        if items_out is not None:
            items_out.append(ItemRecord(comp["label"], batch, key, items))
    return pd.DataFrame(rows)


def aggregate(
    store_uri: str,
    base_digest: str,
    plan_json: str,
    data_json: str,
    options_json: str,
    out_dir: str,
    title: str = "",
    model_info: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Build the results table and the composability report into ``out_dir``.

    ``model_info`` (the base model's source and parameter count, from its
    checkpoint) is written as ``model.json`` beside the report, for the
    cross-model comparison (:mod:`shared.cross_model`).

    The report is also committed to the store under a key that covers what
    it was built from -- the plan *and* the collected results and per-item
    scores (:func:`report_content_key`) -- and the plan's pointer
    (:func:`report_pointer_key`, overwritten each time) names it, so that a
    driver (``lmcompose run``) or a later user fetches this report.  Keyed by
    the plan alone, a report built after the data or the code changed would
    have found the earlier report committed under its key and been dropped.
    Returns the written paths and, under ``"report_key"``, the report's key.
    """
    from shared.criteria import CRITERIA
    from shared.interventions import available
    from shared.report import build_report
    from shared.store import CorruptCheckpoint

    item_records: list[Any] = []
    by_batch = collect_batch_results(store_uri, base_digest, plan_json, data_json, options_json, item_records)
    results = average_over_batches(by_batch, list(CRITERIA))
    categories = {name: m.category.value for name, m in available().items()}
    plan = json.loads(plan_json)
    paths = build_report(results, Path(out_dir), title=title or f"lm-compose report: {plan['spec_name']}",
                         categories=categories, items=item_records)
    if model_info is not None:
        from shared.cross_model import MODEL_INFO_FILE

        (Path(out_dir) / MODEL_INFO_FILE).write_text(json.dumps(model_info, indent=1, sort_keys=True) + "\n")
        paths["model_info"] = Path(out_dir) / MODEL_INFO_FILE
    if plan.get("num_batches", 1) > 1:  # the averaged rows are results.csv; keep what they average
        by_batch.to_csv(Path(out_dir) / "results_by_batch.csv", index=False)
        paths["results_by_batch"] = Path(out_dir) / "results_by_batch.csv"
    store = open_store(store_uri)
    rkey = report_content_key(report_key(base_digest, plan_json, data_json, options_json), Path(out_dir))
    store.put_checkpoint(rkey, Path(out_dir), {"spec_name": plan["spec_name"]})
    try:
        store.get_checkpoint(rkey)  # an earlier copy of this report may have rotted: quarantined, then replaced
    except CorruptCheckpoint:
        store.put_checkpoint(rkey, Path(out_dir), {"spec_name": plan["spec_name"]})
    store.put_json(report_pointer_key(report_key(base_digest, plan_json, data_json, options_json)), {"key": rkey})
    return {**{k: str(v) for k, v in paths.items()}, "report_key": rkey}


def report_key(base_digest: str, plan_json: str, data_json: str, options_json: str) -> str:
    """Key of one plan's report *slot*: same plan and inputs -> same key (the pointer names the report in it)."""
    from shared.store import digest_of

    return "reports/" + digest_of([base_digest, json.loads(plan_json), json.loads(data_json), json.loads(options_json)])[:40]


def report_content_key(plan_report_key: str, folder: Path) -> str:
    """Store key of a built report: its plan's key and the digest of what it holds (results, items)."""
    import hashlib

    h = hashlib.sha256(plan_report_key.encode())
    for name in ("results.csv", "results_by_batch.csv", "items.json"):
        path = folder / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-"))
    return f"{plan_report_key}-{h.hexdigest()[:16]}"


def report_pointer_key(plan_report_key: str) -> str:
    """JSON naming the latest report of a plan (overwritten by every aggregation)."""
    return plan_report_key.replace("reports/", "report-pointers/", 1)


def latest_report_key(store_uri: str, plan_report_key: str) -> str:
    """The key of the latest report built for a plan (KeyError if none was)."""
    return open_store(store_uri).get_json(report_pointer_key(plan_report_key))["key"]


def base_digest_in_store(store_uri: str, model_source: str) -> str:
    """Content digest of a base model already prepared in the store (KeyError if not)."""
    return open_store(store_uri).get_json(_alias_key(model_source))["digest"]


def completed_nodes(store_uri: str, spec: Any, plan: Any) -> set[str]:
    """Plan nodes whose checkpoint is already committed in the store (for ``lmcompose plan --store``)."""
    store = open_store(store_uri)
    try:
        digest = base_digest_in_store(store_uri, spec.model)
    except KeyError:
        return set()
    batches = [ExperimentData(spec.data.for_batch(b)) for b in range(spec.data.num_batches)]
    return {
        n.id
        for n in plan.nodes.values()
        if all(store.has_checkpoint(model_key_for(digest, n.steps, data)) for data in batches[: plan.batches_of(n)])
    }

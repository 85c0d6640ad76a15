"""Planner: expand a spec into compositions and fold them into a prefix tree.

A *composition* is a sequence of concrete steps (method + full parameters)
applied to the base model.  Compositions that share a prefix share the
models of that prefix, so the plan is a tree whose nodes are distinct step
sequences: each node is computed once (one intervention run) and evaluated
once.  ``ft -> wanda(0.25)`` and ``ft -> wanda(0.5)`` share the ``ft`` node,
so fine-tuning runs once however long the sparsity sweep is -- steps that do
not depend on a sweep value are hoisted out of the fan-out automatically.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from shared.spec import ExperimentSpec
from shared.store import canonical_json, digest_of


@dataclass
class Node:
    """A distinct model of the plan: the base model plus ``steps``."""

    id: str
    steps: list[dict[str, Any]]
    parent: str | None
    compositions: list[dict[str, Any]] = field(default_factory=list)  # compositions ending here

    @property
    def depth(self) -> int:
        return len(self.steps)

    @property
    def method(self) -> str | None:
        return self.steps[-1]["method"] if self.steps else None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "steps": self.steps, "parent": self.parent, "compositions": self.compositions}


@dataclass
class Plan:
    """The prefix tree of an experiment and its counts."""

    spec_name: str
    nodes: dict[str, Node]  # insertion order = topological (parents first)
    compositions: list[dict[str, Any]]
    evaluators: list[str]
    sweeps: dict[str, str] = field(default_factory=dict)  # method -> swept parameter
    num_batches: int = 1  # edit batches (data.num_batches): edit-dependent work is repeated per batch

    @property
    def step_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.steps]

    @property
    def evaluated_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.compositions]

    def batches_of(self, node: Node) -> int:
        """How many times ``node`` is computed: once per edit batch if a step on its path reads the edits."""
        return self.num_batches if reads_edits(node.steps) else 1

    def evaluation_batches(self, node: Node, evaluator: str) -> int:
        """How many times ``evaluator`` runs on ``node``: per batch if the model or the evaluator uses the edits."""
        from shared.evaluation import EVALUATOR_DATA

        return self.num_batches if "edits" in EVALUATOR_DATA[evaluator] else self.batches_of(node)

    def counts(self) -> dict[str, int]:
        """Work in this plan versus running every composition from scratch (every batch counted)."""
        n_eval = len(self.evaluators)
        return {
            "compositions": len(self.compositions),
            "batches": self.num_batches,
            "intervention_runs": sum(self.batches_of(n) for n in self.step_nodes),
            "intervention_runs_naive": self.num_batches * sum(self.nodes[c["node"]].depth for c in self.compositions),
            "evaluations": sum(self.evaluation_batches(n, e) for n in self.evaluated_nodes for e in self.evaluators),
            "evaluations_naive": self.num_batches * len(self.compositions) * n_eval,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "spec_name": self.spec_name,
            "evaluators": self.evaluators,
            "nodes": [n.to_json() for n in self.nodes.values()],
            "compositions": self.compositions,
            "sweeps": self.sweeps,
            "num_batches": self.num_batches,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Plan":
        nodes = {n["id"]: Node(n["id"], n["steps"], n["parent"], n["compositions"]) for n in obj["nodes"]}
        return cls(
            obj["spec_name"], nodes, obj["compositions"], obj["evaluators"], obj.get("sweeps", {}),
            obj.get("num_batches", 1),
        )


def _added_steps(steps: list[dict[str, Any]], run_steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The re-compression steps :func:`with_recompression` inserted (run_steps minus the composition's own)."""
    added, i = [], 0
    for s in run_steps:
        if i < len(steps) and s == steps[i]:
            i += 1
        else:
            added.append(s)
    return added


def node_id(steps: list[dict[str, Any]]) -> str:
    """Short stable id of a step sequence (data-independent; the store key adds data digests)."""
    return "n" + digest_of(steps)[:12] if steps else "base"


def describe_step(step: dict[str, Any], swept: str | None = None) -> str:
    """``wanda(sparsity=0.25)`` -- the swept parameter only, to keep labels short."""
    if swept and swept in step["params"]:
        return f"{step['method']}({swept}={step['params'][swept]})"
    return step["method"]


def reads_edits(steps: list[dict[str, Any]]) -> bool:
    """Whether any of ``steps`` reads the edit batch (then the model differs from batch to batch)."""
    from shared.interventions import get_intervention

    return any("edits" in get_intervention(s["method"]).data_inputs for s in steps)


def _is_compressor(step: dict[str, Any]) -> bool:
    from shared.interventions import get_intervention
    from shared.interventions.base import Category

    return get_intervention(step["method"]).category == Category.COMPRESS


def with_recompression(steps: list[dict[str, Any]], policy: str) -> list[dict[str, Any]]:
    """The steps actually run for a composition under a re-compression policy.

    When a compressor precedes an edit or unlearning step, that step moves the
    weights off the quantization grid and revives pruned weights.  The paper
    therefore re-applies the compressor at the end of the composition; the
    steps added here go right after the last non-compression step, so
    compressors that already follow it (e.g. ``wanda > ft > gptq``) still act
    on the re-compressed model:

    * ``reapply`` -- every earlier compressor again, same parameters, in order
      (``gptq > ft`` runs ``gptq > ft > gptq``; fresh calibration and grid);
    * ``reproject`` -- one ``reproject`` step restoring the recorded grid and
      mask (``gptq > ft > reproject``);
    * ``none`` -- nothing added.
    """
    if policy == "none":
        return list(steps)
    last_other = max((i for i, s in enumerate(steps) if not _is_compressor(s)), default=-1)
    if last_other < 0:
        return list(steps)
    earlier = [s for s in steps[:last_other] if _is_compressor(s)]
    if not earlier:
        return list(steps)
    if policy == "reproject":
        extra = [{"method": "reproject", "params": {}}]
    elif policy == "reapply":
        extra, seen = [], set()
        for s in earlier:
            if canonical_json(s) not in seen:
                seen.add(canonical_json(s))
                extra.append(s)
    else:
        raise ValueError(f"unknown recompress policy {policy!r}; allowed: reapply, reproject, none")
    return steps[: last_other + 1] + extra + steps[last_other + 1 :]


def build_plan(spec: ExperimentSpec) -> Plan:
    """Expand ``spec`` into compositions and fold them into a prefix tree."""
    if spec.models:
        raise ValueError(
            f"models: a multi-model spec is planned once per model ({', '.join(spec.model_labels())}); "
            "plan each of spec.per_model()"
        )
    compositions: list[dict[str, Any]] = []
    if spec.compositions.include_base:
        compositions.append({"names": [], "steps": [], "sweep": None})
    for order in spec.orders():
        entries = [spec.intervention(name) for name in order]
        for combo in itertools.product(*(e.steps() for e in entries)):
            steps = list(combo)
            swept = [(e, s) for e, s in zip(entries, steps) if e.swept_param and len(e.sweep[e.swept_param]) > 1]
            sweep = None
            if swept:
                # the integration axis: the last swept intervention in spec order
                entry, step = max(swept, key=lambda es: spec.interventions.index(es[0]))
                sweep = {"method": entry.method, "name": entry.name, "param": entry.swept_param,
                         "value": step["params"][entry.swept_param]}
            compositions.append({"names": list(order), "steps": steps, "sweep": sweep})

    sweeps = {i.method: i.swept_param for i in spec.interventions if i.swept_param}
    nodes: dict[str, Node] = {}
    seen_compositions: set[str] = set()
    unique: list[dict[str, Any]] = []
    for comp in compositions:
        key = canonical_json(comp["steps"])
        if key in seen_compositions:  # e.g. a one-value sweep duplicated by two orders
            continue
        seen_compositions.add(key)
        unique.append(comp)
        run_steps = with_recompression(comp["steps"], spec.compositions.recompress)
        comp["recompress"] = ">".join(s["method"] for s in _added_steps(comp["steps"], run_steps))
        parent = None
        for depth in range(len(run_steps) + 1):
            prefix = run_steps[:depth]
            nid = node_id(prefix)
            if nid not in nodes:
                nodes[nid] = Node(nid, prefix, parent)
            parent = nid
        comp["node"] = parent
        comp["label"] = " > ".join(describe_step(s, sweeps.get(s["method"])) for s in comp["steps"]) or "base"
        if comp["recompress"]:
            comp["label"] += f" (re-compressed: {comp['recompress'].replace('>', ', ')})"
        nodes[parent].compositions.append({k: comp[k] for k in ("names", "sweep", "label", "recompress")})
    # parents before children, base first, then by depth (stable within a depth)
    ordered = dict(sorted(nodes.items(), key=lambda kv: kv[1].depth))
    return Plan(spec.name, ordered, unique, list(spec.evaluation.evaluators), sweeps, spec.data.num_batches)


def format_plan(plan: Plan, done: set[str] | None = None) -> str:
    """Human-readable plan: the tree and the counts next to the naive count."""
    lines = [f"plan for experiment {plan.spec_name!r}"]
    children: dict[str | None, list[Node]] = {}
    for node in plan.nodes.values():
        children.setdefault(node.parent, []).append(node)

    def walk(node: Node, indent: str) -> None:
        label = "base model" if not node.steps else describe_step(node.steps[-1], plan.sweeps.get(node.steps[-1]["method"]))
        marks = " [evaluated]" if node.compositions else ""
        if done is not None and node.id in done:
            marks += " [done]"
        lines.append(f"{indent}{label}  ({node.id}){marks}")
        for child in children.get(node.id, []):
            walk(child, indent + "  ")

    for root in children.get(None, []):
        walk(root, "  ")
    c = plan.counts()
    saved = lambda a, b: f"{(1 - a / b) * 100:.0f}% saved" if b else "n/a"  # noqa: E731
    lines += [
        "",
        f"compositions:       {c['compositions']}"
        + (f" (x {c['batches']} edit batches; edit-dependent steps run once per batch)" if c["batches"] > 1 else ""),
        f"intervention runs:  {c['intervention_runs']} (naive, each composition from scratch: "
        f"{c['intervention_runs_naive']}; {saved(c['intervention_runs'], c['intervention_runs_naive'])})",
        f"evaluations:        {c['evaluations']} (naive: {c['evaluations_naive']}; "
        f"{saved(c['evaluations'], c['evaluations_naive'])}) with evaluators {', '.join(plan.evaluators)}",
    ]
    return "\n".join(lines)



def node_weight(plan: Plan, node: Node, batch: int | None = None) -> int:
    """Tasks a node costs in a pipeline: its intervention runs plus its evaluations (of one edit batch, or all)."""
    from shared.evaluation import EVALUATOR_DATA

    batches = range(plan.num_batches) if batch is None else [batch]
    runs = sum(1 for b in batches if node.steps and b < plan.batches_of(node))
    evals = 0
    if node.compositions:  # one evaluate task per model and batch (all its evaluators in one load)
        per_batch = any(plan.evaluation_batches(node, e) > 1 for e in plan.evaluators)
        evals = sum(1 for b in batches if b == 0 or per_batch)
    return runs + evals


def fan_in_tasks(outputs: int, fan_in: int = 16) -> int:
    """``collect_results`` tasks joining ``outputs`` evaluation results (a tree, ``fan_in`` inputs per task)."""
    tasks = 0
    while outputs > 1:
        outputs = -(-outputs // fan_in)
        tasks += outputs
    return tasks


def evaluation_tasks(plan: Plan, share: "Share | None" = None) -> int:
    """``evaluate`` tasks of the plan (or of one shard's share)."""
    total = 0
    for node in plan.evaluated_nodes:
        for b in range(plan.num_batches):
            if share is not None and (node.id, b) not in share:
                continue
            if b == 0 or any(plan.evaluation_batches(node, e) > 1 for e in plan.evaluators):
                total += 1
    return total


#: a shard's share of the plan: (node id, edit batch) pairs; a node computed once owns every batch's evaluations
Share = set[tuple[str, int]]


def partition(plan: Plan, shards: int) -> list[Share]:
    """Split the plan into ``shards`` shares that can run as separate pipeline runs.

    The units are whole subtrees under the base model (every model that starts
    with the same first step), so a step's parent is always computed in the
    same run and no two runs write the same checkpoint.  A subtree whose first
    step reads the edits is different for every edit batch, so it splits
    further into one unit per batch.  Units go to the lightest shard, heaviest
    first; the base model and its evaluations go to the first shard.  Raises
    ``ValueError`` when there are fewer units than shards.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    units = _units(plan)
    if shards > max(len(units), 1):
        raise ValueError(
            f"shards: {shards} requested but the plan has only {len(units)} independent unit(s) "
            f"(subtrees under the base model, split by edit batch where their first step reads the edits); "
            f"use at most {max(len(units), 1)}"
        )
    all_batches = range(plan.num_batches)
    bins: list[Share] = [set() for _ in range(shards)]
    weights = [0] * shards
    if "base" in plan.nodes:
        bins[0].update(("base", b) for b in all_batches)
        weights[0] += node_weight(plan, plan.nodes["base"])
    for weight, share in sorted(units, key=lambda u: -u[0]):
        i = min(range(shards), key=lambda k: (weights[k], k))
        bins[i] |= share
        weights[i] += weight
    return bins


def max_shards(plan: Plan) -> int:
    """The most runs the plan can be split into: its independent units (see :func:`partition`)."""
    return max(len(_units(plan)), 1)


def _units(plan: Plan) -> list[tuple[int, Share]]:
    """The units of :func:`partition`: (tasks, share) per subtree under the base model (per batch where split)."""
    children: dict[str | None, list[Node]] = {}
    for node in plan.nodes.values():
        children.setdefault(node.parent, []).append(node)

    def subtree(node: Node) -> list[Node]:
        out, stack = [], [node]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(reversed(children.get(n.id, [])))
        return out

    all_batches = range(plan.num_batches)
    units: list[tuple[int, Share]] = []  # (weight, share)
    for child in children.get("base", []):
        nodes = subtree(child)
        if plan.batches_of(child) > 1:  # every node below reads the edits too: one unit per batch
            for b in all_batches:
                units.append((sum(node_weight(plan, n, b) for n in nodes), {(n.id, b) for n in nodes}))
        else:
            units.append((sum(node_weight(plan, n) for n in nodes), {(n.id, b) for n in nodes for b in all_batches}))
    return units


def shard_tasks(plan: Plan, shards: int = 1) -> list[int]:
    """KFP tasks of each run of the plan split into ``shards`` runs (one run: every task, the report included).

    A shard run looks the base model up, then runs its steps and evaluations;
    the one run of an unsharded study also joins its evaluations
    (``collect_results``) and builds the report.  The aggregation run of a
    sharded study (2 tasks) is not listed.
    """
    parts = partition(plan, shards)
    per_shard = [1 + sum(node_weight(plan, plan.nodes[nid], b) for nid, b in part) for part in parts]
    if shards == 1:
        per_shard[0] += fan_in_tasks(evaluation_tasks(plan)) + 1
    return per_shard


def pipeline_counts(plan: Plan, shards: int = 1) -> dict[str, int]:
    """Pipeline runs and KFP tasks of the plan split into ``shards`` runs.

    Each shard run prepares the base model (a quick lookup once it is in the
    store) and runs its steps and evaluations; with more than one shard a
    separate aggregation run (base lookup + report) follows.  A run with the
    report also has the ``collect_results`` tasks joining its evaluations.
    """
    per_shard = shard_tasks(plan, shards)
    if shards == 1:
        per_shard[0] -= 1  # the report task, counted as the aggregation below
    aggregation = 1 if shards == 1 else 2
    return {
        "pipeline_runs": shards + (0 if shards == 1 else 1),
        "tasks": sum(per_shard) + aggregation,
        "largest_run_tasks": max(per_shard) + (1 if shards == 1 else 0),
    }

"""What a study will cost before it is submitted: GPU-hours, makespan on N GPUs, critical path.

The plan is turned into the task graph the pipeline builder compiles (one
task per distinct step and edit batch, one ``evaluate`` task per evaluated
model and batch fed by its model, the fan-in and the report) and the graph
is list-scheduled on N identical GPUs the way KFP runs it: a task becomes
ready when every task it takes data from has finished, and ready tasks start
in the order they became ready while a GPU is free.  CPU-only tasks
(``prepare_base``, ``collect_results``, the report) take no GPU.

``design="per_criterion"`` builds the graph of the earlier interface (before
Model artifacts) for comparison: one task per model and *criterion*, each
loading the checkpoint, all of them waiting for the last intervention of the
run; the compression criterion on a CPU node.

The durations come from a :class:`CostTable` (default: :data:`LLAMA3_8B_A100`,
documented in docs/cost-model.md with the source of every figure).  They are
estimates: the simulator's use is comparing designs and sizing a cluster,
not predicting a run to the minute.  ``benchmarks/gpu_check.sh`` measures
real figures on a GPU when one is available.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from shared.planner import Plan, partition


@dataclass(frozen=True)
class CostTable:
    """Seconds per task part on one GPU for one model size; ``sources`` says where each figure comes from."""

    name: str
    step_s: dict[str, float]
    evaluator_s: dict[str, float]
    load_s: float  # download (S3 -> node) and load one checkpoint onto the GPU
    save_s: float  # save and upload one checkpoint
    prepare_base_s: float
    collect_s: float
    aggregate_s: float
    sources: dict[str, str] = field(default_factory=dict)

    def step(self, method: str) -> float:
        if method not in self.step_s:
            raise KeyError(f"cost table {self.name!r} has no figure for method {method!r}")
        return self.step_s[method]

    def evaluator(self, name: str) -> float:
        if name not in self.evaluator_s:
            raise KeyError(f"cost table {self.name!r} has no figure for evaluator {name!r}")
        return self.evaluator_s[name]


#: Llama-3-8B in bfloat16 on one A100-80GB.  Sources: docs/cost-model.md ("published" figures name the
#: paper or project; every other figure is this project's estimate and is marked so there).
LLAMA3_8B_A100 = CostTable(
    name="llama3-8b-a100",
    step_s={
        "ft": 120.0, "lora": 300.0, "memit": 1200.0, "rome": 1200.0, "alphaedit": 1300.0,
        "ga": 600.0, "gd": 900.0, "rmu": 1200.0, "npo": 1000.0, "simnpo": 900.0,
        "wanda": 300.0, "sparsegpt": 900.0, "gptq": 1200.0, "awq": 900.0, "rtn": 120.0, "autoround": 2400.0,
        "reproject": 60.0,
    },
    evaluator_s={"edit": 120.0, "utility": 900.0, "forget": 300.0, "perplexity": 300.0, "compression": 30.0},
    load_s=90.0,
    save_s=90.0,
    prepare_base_s=600.0,
    collect_s=10.0,
    aggregate_s=120.0,
    sources={"all": "estimates; see docs/cost-model.md"},
)


def load_cost_table(path: str | Any) -> CostTable:
    """A :class:`CostTable` from a JSON file (``benchmarks/gpu_check.sh`` writes ``cost_table.json``).

    Every field of the dataclass must be there; ``step_s`` and ``evaluator_s``
    must name every figure the default table has, each a non-negative number.
    """
    import json
    from dataclasses import fields
    from pathlib import Path

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cost table {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"cost table {path}: expected a JSON object")
    names = {f.name for f in fields(CostTable)}
    missing = sorted(names - set(doc) - {"sources"})
    unknown = sorted(set(doc) - names)
    if missing or unknown:
        raise ValueError(f"cost table {path}: missing {missing}, unknown {unknown}")
    for part in ("step_s", "evaluator_s"):
        absent = sorted(set(getattr(LLAMA3_8B_A100, part)) - set(doc[part]))
        if absent:
            raise ValueError(f"cost table {path}: {part} has no figure for {', '.join(absent)}")
        for key, value in doc[part].items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"cost table {path}: {part}.{key} must be a non-negative number, got {value!r}")
    for key in names - {"name", "step_s", "evaluator_s", "sources"}:
        if not isinstance(doc[key], (int, float)) or doc[key] < 0:
            raise ValueError(f"cost table {path}: {key} must be a non-negative number, got {doc[key]!r}")
    return CostTable(
        name=str(doc["name"]),
        step_s={k: float(v) for k, v in doc["step_s"].items()},
        evaluator_s={k: float(v) for k, v in doc["evaluator_s"].items()},
        **{k: float(doc[k]) for k in ("load_s", "save_s", "prepare_base_s", "collect_s", "aggregate_s")},
        sources={str(k): str(v) for k, v in (doc.get("sources") or {}).items()},
    )


@dataclass
class SimTask:
    """One task of the simulated graph."""

    name: str
    seconds: float
    gpu: bool
    deps: list[str]
    loads: int = 0  # checkpoint downloads


def study_graph(plan: Plan, cost: CostTable = LLAMA3_8B_A100, design: str = "per_model",
                shards: int = 1) -> list[SimTask]:
    """The tasks of every run of the study (all shards, plus the aggregation run when sharded)."""
    if design not in ("per_model", "per_criterion"):
        raise ValueError(f"design must be 'per_model' or 'per_criterion', got {design!r}")
    parts = partition(plan, shards) if shards > 1 else [None]
    tasks: list[SimTask] = []
    for i, owned in enumerate(parts):
        tasks += _run_graph(plan, cost, design, owned, prefix=f"r{i}/", with_report=shards == 1)
    if shards > 1:
        tasks.append(SimTask("agg/base", cost.prepare_base_s * 0.05, False, []))
        tasks.append(SimTask("agg/report", cost.aggregate_s, False, ["agg/base"]))
    return tasks


def _run_graph(plan: Plan, cost: CostTable, design: str, owned: Any, prefix: str, with_report: bool) -> list[SimTask]:
    tasks: list[SimTask] = []
    base = prefix + "base"
    # the base model is converted once; every further run only looks it up (a few seconds)
    tasks.append(SimTask(base, cost.prepare_base_s if prefix == "r0/" else cost.prepare_base_s * 0.05, False, []))
    models = {("base", 0): base}
    steps = []
    for node in plan.step_nodes:
        method = node.steps[-1]["method"]
        for b in range(plan.batches_of(node)):
            if owned is not None and (node.id, b) not in owned:
                continue
            name = f"{prefix}{node.id}[{b}]"
            parent = models.get((node.parent, b), models.get((node.parent, 0)))
            tasks.append(SimTask(name, cost.load_s + cost.step(method) + cost.save_s, True, [parent], loads=1))
            models[(node.id, b)] = name
            steps.append(name)
    evaluations = []
    for node in plan.evaluated_nodes:
        for b in range(plan.num_batches):
            if owned is not None and (node.id, b) not in owned:
                continue
            evaluators = [e for e in plan.evaluators if b == 0 or plan.evaluation_batches(node, e) > 1]
            if not evaluators:
                continue
            model = models.get((node.id, b), models.get((node.id, 0)))
            if design == "per_model":
                seconds = cost.load_s + sum(cost.evaluator(e) for e in evaluators)
                tasks.append(SimTask(f"{prefix}eval/{node.id}[{b}]", seconds, True, [model], loads=1))
                evaluations.append(tasks[-1].name)
            else:  # one task per criterion, after every intervention of the run (the earlier barrier)
                barrier = prefix + "after-all-interventions"
                if not any(t.name == barrier for t in tasks[-1:]) and barrier not in {t.name for t in tasks}:
                    tasks.append(SimTask(barrier, 0.0, False, [base, *steps]))  # zero-cost join, not a real task
                for e in evaluators:
                    tasks.append(SimTask(f"{prefix}eval/{node.id}[{b}]/{e}", cost.load_s + cost.evaluator(e),
                                         e != "compression", [barrier], loads=1))
                    evaluations.append(tasks[-1].name)
    if with_report:
        joined = evaluations
        if design == "per_model":
            level, depth = evaluations, 0
            while len(level) > 1:
                nxt = []
                for i in range(0, len(level), 16):
                    name = f"{prefix}collect/{depth}/{i // 16}"
                    tasks.append(SimTask(name, cost.collect_s, False, level[i:i + 16]))
                    nxt.append(name)
                level, depth = nxt, depth + 1
            joined = level
        tasks.append(SimTask(f"{prefix}report", cost.aggregate_s, False, [base, *joined]))
    return tasks


def simulate(tasks: list[SimTask], gpus: int) -> float:
    """Makespan (seconds) of ``tasks`` on ``gpus`` GPUs, list-scheduled in the order tasks become ready."""
    if gpus < 1:
        raise ValueError("gpus must be at least 1")
    by_name = {t.name: t for t in tasks}
    waiting = {t.name: len(set(t.deps)) for t in tasks}
    children: dict[str, list[str]] = {}
    for t in tasks:
        for d in set(t.deps):
            children.setdefault(d, []).append(t.name)
    order = {t.name: i for i, t in enumerate(tasks)}
    ready: list[tuple[float, int, str]] = [(0.0, order[n], n) for n, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    running: list[tuple[float, str]] = []  # (end time, name) of GPU tasks
    events: list[tuple[float, int, str]] = []  # (end time, order, name) of every started task
    free = gpus
    now = 0.0
    finished = 0
    while finished < len(tasks):
        # start every ready task that can start now
        deferred = []
        while ready and ready[0][0] <= now:
            at, i, name = heapq.heappop(ready)
            task = by_name[name]
            if task.gpu and free == 0:
                deferred.append((at, i, name))
                continue
            if task.gpu:
                free -= 1
            heapq.heappush(events, (now + task.seconds, i, name))
        for item in deferred:
            heapq.heappush(ready, item)
        if not events:
            now = ready[0][0]
            continue
        end, _i, name = heapq.heappop(events)
        now = max(now, end)
        finished += 1
        if by_name[name].gpu:
            free += 1
        for child in children.get(name, []):
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, (now, order[child], child))
    return now


def critical_path(tasks: list[SimTask]) -> float:
    """The longest dependency chain (seconds): no number of GPUs finishes sooner."""
    by_name = {t.name: t for t in tasks}
    memo: dict[str, float] = {}
    for t in tasks:  # tasks are listed after their dependencies
        memo[t.name] = t.seconds + max((memo[d] for d in t.deps if d in by_name), default=0.0)
    return max(memo.values(), default=0.0)


def estimate(plan: Plan, gpus: tuple[int, ...] = (8, 64), cost: CostTable = LLAMA3_8B_A100,
             design: str = "per_model", shards: int = 1) -> dict[str, Any]:
    """GPU-hours, checkpoint downloads, tasks, makespan per GPU count and its lower bound."""
    tasks = study_graph(plan, cost, design, shards)
    gpu_seconds = sum(t.seconds for t in tasks if t.gpu)
    path = critical_path(tasks)
    out: dict[str, Any] = {
        "design": design,
        "cost_table": cost.name,
        "tasks": sum(1 for t in tasks if not t.name.endswith("after-all-interventions")),
        "checkpoint_downloads": sum(t.loads for t in tasks),
        "gpu_hours": gpu_seconds / 3600,
        "task_hours": sum(t.seconds for t in tasks) / 3600,  # GPU and CPU tasks
        "critical_path_h": path / 3600,
        "makespan_h": {},
        "lower_bound_h": {},
    }
    for n in gpus:
        out["makespan_h"][n] = simulate(tasks, n) / 3600
        out["lower_bound_h"][n] = max(path, gpu_seconds / n) / 3600
    return out


def format_estimate(result: dict[str, Any]) -> str:
    kind = "estimates, not measurements" if result["cost_table"] == LLAMA3_8B_A100.name else "its sources say what was measured"
    lines = [
        f"estimate ({result['cost_table']} cost table, docs/cost-model.md; {kind}):",
        f"  GPU-hours:          {result['gpu_hours']:.1f}",
        f"  checkpoint loads:   {result['checkpoint_downloads']}",
        f"  critical path:      {result['critical_path_h']:.1f} h",
    ]
    for n, hours in result["makespan_h"].items():
        lines.append(f"  makespan on {n:>3} GPUs: {hours:.1f} h (lower bound {result['lower_bound_h'][n]:.1f} h)")
    return "\n".join(lines)

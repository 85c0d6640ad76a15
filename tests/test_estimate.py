"""The study cost simulator: known schedules, and the same task graph the builder compiles."""

from __future__ import annotations

import pytest

from shared.estimate import LLAMA3_8B_A100, SimTask, critical_path, estimate, simulate, study_graph
from shared.planner import build_plan, pipeline_counts
from shared.spec import parse_spec
from tests.test_edit_batches import TINY_BATCHED
from tests.test_pipeline import TINY_SPEC


def test_list_scheduling_known_answers():
    # a -> b, and c, d independent; 10 s each on GPUs
    tasks = [SimTask("a", 10, True, []), SimTask("b", 10, True, ["a"]), SimTask("c", 10, True, []),
             SimTask("d", 10, True, [])]
    assert simulate(tasks, 1) == 40
    assert simulate(tasks, 2) == 20  # a+c, then b+d
    assert simulate(tasks, 4) == 20  # the chain a -> b bounds it
    assert critical_path(tasks) == 20
    # CPU-only tasks take no GPU: they overlap with GPU work even on one GPU
    assert simulate([SimTask("g", 10, True, []), SimTask("cpu", 10, False, [])], 1) == 10
    with pytest.raises(ValueError):
        simulate(tasks, 0)


@pytest.mark.parametrize("raw", [TINY_SPEC, TINY_BATCHED], ids=["tiny", "batched"])
def test_graph_has_the_compiled_pipelines_task_count(raw):
    plan = build_plan(parse_spec(raw))
    graph = study_graph(plan)
    assert len(graph) == pipeline_counts(plan)["tasks"]
    # each evaluate task loads one checkpoint; the per-criterion design one per criterion
    evals = [t for t in graph if "/eval/" in t.name]
    assert sum(t.loads for t in evals) == len(evals)
    before = estimate(plan, (1,), design="per_criterion")
    after = estimate(plan, (1,), design="per_model")
    assert before["checkpoint_downloads"] - after["checkpoint_downloads"] == plan.counts()["evaluations"] - len(evals)
    # fewer loads of the same checkpoints (GPU-hours alone may grow: the compression criterion ran on CPU nodes)
    assert after["task_hours"] < before["task_hours"]


def test_estimate_bounds_and_cost_table():
    plan = build_plan(parse_spec(TINY_SPEC))
    r = estimate(plan, (1, 4, 1000))
    for n in (1, 4, 1000):
        assert r["makespan_h"][n] >= r["lower_bound_h"][n] - 1e-9
    assert r["makespan_h"][1000] == pytest.approx(r["critical_path_h"])  # unlimited GPUs: the critical path
    assert r["makespan_h"][1] == pytest.approx(r["gpu_hours"] + 0, rel=0.2)  # one GPU: about the work itself
    with pytest.raises(KeyError, match="no figure for method"):
        LLAMA3_8B_A100.step("not-a-method")


def test_default_cost_table_covers_every_registered_method() -> None:
    """`lmcompose plan --estimate` works for a spec naming any method: the default table has a figure for each."""
    from shared.estimate import LLAMA3_8B_A100
    from shared.interventions import available

    missing = sorted(set(available()) - set(LLAMA3_8B_A100.step_s))
    assert not missing, f"no cost figure for {missing} (shared/estimate.py, docs/cost-model.md)"

"""Edit batches: disjoint seeded batches, batch-aware plans and pipelines, results averaged over batches."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from shared.data import DataConfig, ExperimentData, load_field
from shared.planner import build_plan, reads_edits
from shared.spec import SpecError, parse_spec

TINY_BATCHED = {
    "name": "tiny-batches",
    "model": "builtin:tiny-random",
    "interventions": [
        {"method": "ft", "params": {"steps": 2, "layers": [0, 1]}},
        {"method": "wanda", "params": {"num_calibration_samples": 4, "calibration_seq_len": 32, "sparsity": 0.5}},
    ],
    "compositions": {"recompress": "none"},
    "evaluation": {"evaluators": ["edit", "compression"], "batch_size": 4, "max_length": 32},
    "data": {"num_edits": 3, "num_batches": 2},
}


def _srcs(config: DataConfig) -> list[str]:
    return [e.src for e in ExperimentData(config).edits]


def test_batches_are_disjoint_seeded_and_independent_of_their_number() -> None:
    batches = [_srcs(DataConfig(num_edits=10, num_batches=4, edit_batch=b)) for b in range(4)]
    assert all(len(b) == 10 for b in batches)
    assert len({s for b in batches for s in b}) == 40  # disjoint
    # batch 0 is the batch of a one-batch experiment, and batch b does not depend on num_batches
    assert batches[0] == _srcs(DataConfig(num_edits=10))
    assert batches[2] == _srcs(DataConfig(num_edits=10, num_batches=3, edit_batch=2))
    # the seed chooses
    assert _srcs(DataConfig(num_edits=10, edit_seed=1)) != batches[0]
    assert _srcs(DataConfig(num_edits=10, edit_seed=1)) == _srcs(DataConfig(num_edits=10, edit_seed=1))


def test_edit_digest_distinguishes_batches_and_keeps_batch_zero() -> None:
    one = ExperimentData(DataConfig(num_edits=10)).digest("edits")
    assert ExperimentData(DataConfig(num_edits=10, num_batches=5)).digest("edits") == one
    digests = {ExperimentData(DataConfig(num_edits=10, num_batches=3, edit_batch=b)).digest("edits") for b in range(3)}
    assert len(digests) == 3 and one in digests
    # the other data inputs do not depend on the batch
    assert ExperimentData(DataConfig(num_batches=3, edit_batch=2)).digest("calibration") == ExperimentData().digest(
        "calibration"
    )


def test_spec_rejects_more_edits_than_records_and_bad_batch_fields() -> None:
    records = len(load_field("edits", "builtin"))
    batches = records // 10 + 1  # one batch more than the pack holds
    base = {"name": "b", "interventions": [{"method": "ft"}]}
    with pytest.raises(SpecError, match=rf"num_edits=10 x data.num_batches={batches} .* = {batches * 10} but .* "
                                        rf"has only {records}"):
        parse_spec({**base, "data": {"num_edits": 10, "num_batches": batches}})
    with pytest.raises(SpecError, match=r"data.num_batches"):
        parse_spec({**base, "data": {"num_batches": 0}})
    with pytest.raises(SpecError, match=r"edit_batch \(2\) must be below num_batches \(2\)"):
        parse_spec({**base, "data": {"num_batches": 2, "edit_batch": 2}})
    assert parse_spec({**base, "data": {"num_edits": 10, "num_batches": 6}}).data.num_batches == 6


def test_plan_repeats_only_edit_dependent_work_per_batch() -> None:
    plan = build_plan(parse_spec(TINY_BATCHED, check_data=False))
    assert plan.num_batches == 2
    by_methods = {">".join(s["method"] for s in n.steps): n for n in plan.step_nodes}
    assert set(by_methods) == {"ft", "wanda", "ft>wanda", "wanda>ft"}
    assert [plan.batches_of(by_methods[m]) for m in ("ft", "wanda", "ft>wanda", "wanda>ft")] == [2, 1, 2, 2]
    assert reads_edits(by_methods["wanda>ft"].steps) and not reads_edits(by_methods["wanda"].steps)
    counts = plan.counts()
    assert counts["intervention_runs"] == 2 + 1 + 2 + 2
    assert counts["intervention_runs_naive"] == 2 * (1 + 1 + 2 + 2)
    # edit evaluator: every model, every batch; compression: once for base and wanda, per batch otherwise
    assert counts["evaluations"] == 5 * 2 + (2 + 3 * 2)
    assert counts["evaluations_naive"] == 2 * 5 * 2
    # the plan (as handed to the aggregator) keeps the batch count
    from shared.planner import Plan

    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))).num_batches == 2


def test_compiled_pipeline_has_a_task_per_batch_for_edit_dependent_steps(tmp_path) -> None:
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines.builder import compile_pipeline

    spec = parse_spec(TINY_BATCHED)
    out = tmp_path / "p.yaml"
    compile_pipeline(spec, "s3://bucket/prefix", str(out))
    doc = next(yaml.safe_load_all(out.read_text()))
    pipeline = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(doc, pipeline)
    tasks = pipeline.root.dag.tasks

    def comp(task) -> str:
        return re.sub(r"-\d+$", "", task.component_ref.name)

    names = [comp(t) for t in tasks.values()]
    assert names.count("comp-ft") == 2 * 2  # ft and wanda>ft, once per batch
    assert names.count("comp-wanda") == 1 + 2  # wanda once; ft>wanda per batch

    def const(t, name):
        """The value the task's component receives: the task's constant, else (left out) the component's default."""
        if name not in t.inputs.parameters:
            return json_format.MessageToDict(
                pipeline.components[t.component_ref.name].input_definitions.parameters[name].default_value)
        value = t.inputs.parameters[name].runtime_value.constant
        return json_format.MessageToDict(value)

    # every edit-reading task names its batch; batch 1 appears only on edit-dependent tasks
    batches = sorted((comp(t), const(t, "edit_batch")) for t in tasks.values() if comp(t) == "comp-ft")
    assert batches == [("comp-ft", 0), ("comp-ft", 0), ("comp-ft", 1), ("comp-ft", 1)]
    assert all("edit_batch" not in t.inputs.parameters for t in tasks.values() if comp(t) == "comp-wanda")
    # evaluation: one task per model and batch; batch 0 every evaluator on all five models, batch 1 the
    # edited models (all evaluators) and the shared ones (only the edit evaluator)
    evals = [t for t in tasks.values() if comp(t) == "comp-evaluate"]
    by_batch = {}
    for t in evals:
        by_batch.setdefault(const(t, "edit_batch"), []).append(sorted(const(t, "evaluators")))
    assert len(by_batch[0]) == 5 and all(e == sorted(["edit", "compression"]) for e in by_batch[0])
    assert sorted(by_batch[1]) == sorted([["edit"], ["edit"], *[sorted(["edit", "compression"])] * 3])
    # each evaluation is fed by its model's task (an artifact edge), batch 1 by the batch-1 model where it exists
    for t in evals:
        producer = t.inputs.artifacts["model"].task_output_artifact.producer_task
        assert list(t.dependent_tasks) == [producer]


@pytest.mark.slow
def test_kfp_local_two_batches_are_averaged(tmp_path) -> None:
    import pandas as pd

    from pipelines.local import run_local
    from shared.report import load_results

    # the edit evaluator only (half the tasks): its criteria differ per batch even on the shared
    # wanda model, since each batch asks its own edits
    spec = parse_spec({**TINY_BATCHED, "evaluation": {**TINY_BATCHED["evaluation"], "evaluators": ["edit"]}})
    store = tmp_path / "store"
    report_dir = run_local(spec, str(store), tmp_path / "out")
    results = load_results(report_dir / "results.csv")
    by_batch = pd.read_csv(report_dir / "results_by_batch.csv")
    assert len(results) == 5 and (results["num_batches"] == 2).all()
    assert sorted(by_batch["edit_batch"].tolist()) == [0] * 5 + [1] * 5
    for criterion in ("edit_success", "edit_locality"):
        mean = by_batch.groupby("composition")[criterion].mean()
        for _, row in results.iterrows():
            assert row[criterion] == pytest.approx(mean[row["composition"]])
    # edit-dependent models exist once per batch, the others once
    plan = build_plan(spec)
    n_ckpt = len(list(store.glob("ckpt/*/manifest.json")))
    assert n_ckpt == 1 + sum(plan.batches_of(n) for n in plan.step_nodes)
    keys = results.set_index("composition")["model_key"]
    assert keys["ft"].count("+") == 1  # two checkpoints averaged
    assert "+" not in keys["wanda"]  # one checkpoint shared by both batches
    assert "2 disjoint edit batches" in (report_dir / "report.md").read_text()

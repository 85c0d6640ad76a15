"""The pipeline: compiled YAML parses with KFP's own protobuf; a kfp.local run on a tiny random model."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from shared.planner import build_plan, evaluation_tasks, fan_in_tasks, pipeline_counts
from shared.spec import parse_spec

TINY_SPEC = {
    "name": "tiny",
    "model": "builtin:tiny-random",
    "interventions": [
        {"method": "ft", "params": {"steps": 2, "layers": [0, 1]}},
        {"method": "wanda", "params": {"num_calibration_samples": 4, "calibration_seq_len": 32},
         "sweep": {"sparsity": [0.25, 0.5]}},
    ],
    # no re-compression here: this test checks that ft after wanda revives pruned weights
    # (tests/test_compression_pipeline.py covers the re-compression policies)
    "compositions": {"recompress": "none"},
    "evaluation": {"evaluators": ["compression", "perplexity"], "batch_size": 4, "max_length": 32},
    "data": {"num_edits": 4},
}


def test_compiled_pipeline_parses_with_kfp_protobuf(tmp_path):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines.builder import compile_pipeline

    spec = parse_spec(TINY_SPEC)
    out = tmp_path / "p.yaml"
    compile_pipeline(spec, "s3://bucket/prefix", str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    pipeline = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(docs[0], pipeline)  # raises on any field KFP does not know
    plan = build_plan(spec)
    tasks = pipeline.root.dag.tasks

    def comp(task) -> str:  # KFP suffixes repeated uses of a component: comp-wanda-2
        return re.sub(r"-\d+$", "", task.component_ref.name)

    n_steps = len(plan.step_nodes)
    n_evals = len(plan.evaluated_nodes)
    # root: base model, one task per distinct step, one evaluation per model, the fan-in, the aggregator
    assert len(tasks) == 1 + n_steps + n_evals + fan_in_tasks(n_evals) + 1 == pipeline_counts(plan)["tasks"]
    names = [comp(t) for t in tasks.values()]
    assert names.count("comp-ft") + names.count("comp-wanda") == n_steps
    assert names.count("comp-evaluate") == n_evals
    # the DAG follows data: every dependency of every task is the producer of one of its inputs (no .after())
    for name, t in tasks.items():
        producers = {a.task_output_artifact.producer_task for a in t.inputs.artifacts.values()}
        producers |= {p.task_output_parameter.producer_task for p in t.inputs.parameters.values()
                      if p.HasField("task_output_parameter")}
        assert set(t.dependent_tasks) == producers - {""}, name
    # children take their parent's Model artifact; every evaluation takes its own model's artifact
    child = next(t for t in tasks.values() if comp(t) == "comp-wanda"
                 and any(comp(tasks[d]) == "comp-ft" for d in t.dependent_tasks))
    assert child.inputs.artifacts["model"].task_output_artifact.output_artifact_key == "model"
    evaluated = sorted(comp(tasks[t.inputs.artifacts["model"].task_output_artifact.producer_task])
                       for t in tasks.values() if comp(t) == "comp-evaluate")
    assert evaluated.count("comp-prepare-base") == 1 and len(set(
        t.inputs.artifacts["model"].task_output_artifact.producer_task
        for t in tasks.values() if comp(t) == "comp-evaluate")) == n_evals  # exactly one evaluation per model
    # typed hyperparameters, not JSON strings; a value equal to the component's default (wanda's sparsity 0.5) is
    # left out of the task, and the component applies the same default (pipelines.builder.compact_compiled)
    sparsities = {json_format.MessageToDict(t.inputs.parameters["sparsity"].runtime_value.constant)
                  if "sparsity" in t.inputs.parameters else None
                  for t in tasks.values() if comp(t) == "comp-wanda"}
    assert sparsities == {0.25, None}
    wanda_default = pipeline.components["comp-wanda"].input_definitions.parameters["sparsity"].default_value
    assert json_format.MessageToDict(wanda_default) == 0.5
    # the aggregator gets every evaluation through the collect_results tree and the base model's artifact
    agg = next(t for t in tasks.values() if comp(t) == "comp-aggregate")
    assert comp(tasks[agg.inputs.parameters["evaluations"].task_output_parameter.producer_task]) == "comp-collect-results"
    assert comp(tasks[agg.inputs.artifacts["base_model"].task_output_artifact.producer_task]) == "comp-prepare-base"
    assert pipeline.root.input_definitions.parameters["store_uri"].default_value.string_value == "s3://bucket/prefix"
    assert comp(tasks["prepare-base"]) == "comp-prepare-base"
    assert tasks["prepare-base"].inputs.parameters["store_uri"].component_input_parameter == "store_uri"
    # S3 credentials reach every task from a Kubernetes Secret, never as parameters or values
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(platform) == len(pipeline.deployment_spec["executors"])
    for executor in platform.values():
        secret = executor["secretAsEnv"][0]
        assert secret["secretNameParameter"]["runtimeValue"]["constant"] == "lmcompose-s3-credentials"
        assert {kv["envVar"] for kv in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "AWS_ACCESS_KEY_ID" not in json.dumps(docs[0])  # nothing about credentials in the pipeline itself


# The kfp.local run of TINY_SPEC, its `plan --store` and its resume are in tests/test_pipeline_s3.py,
# on a real S3 server: one end-to-end run serves both checks.


EXPERIMENTS = sorted((__import__("pathlib").Path(__file__).resolve().parents[1] / "pipelines" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_experiments_plan_and_compile(path, tmp_path):
    """Every spec in pipelines/experiments validates, plans and compiles to YAML KFP's protobuf accepts."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines.builder import compile_pipeline
    from shared.spec import load_spec

    spec = load_spec(path)
    for one in spec.per_model():  # a multi-model study compiles one pipeline per model
        plan = build_plan(one)
        out = tmp_path / f"{one.name}.yaml"
        compile_pipeline(one, "s3://bucket/prefix", str(out))
        pipeline = pipeline_spec_pb2.PipelineSpec()
        json_format.ParseDict(next(yaml.safe_load_all(out.read_text())), pipeline)
        tasks = pipeline.root.dag.tasks
        assert len(tasks) == pipeline_counts(plan)["tasks"]
        # exactly one evaluation task per evaluated model (and edit batch), fed by an artifact edge from its model
        evals = [t for t in tasks.values() if re.sub(r"-\d+$", "", t.component_ref.name) == "comp-evaluate"]
        assert len(evals) == evaluation_tasks(plan)
        for t in evals:
            producer = t.inputs.artifacts["model"].task_output_artifact.producer_task
            assert list(t.dependent_tasks) == [producer]
        if plan.num_batches == 1:
            producers = [t.inputs.artifacts["model"].task_output_artifact.producer_task for t in evals]
            assert len(set(producers)) == len(plan.evaluated_nodes)


def _pairs(plan) -> set[tuple[str, ...]]:
    return {tuple(c["names"]) for c in plan.compositions if len(c["names"]) == 2}


def test_unlearning_experiments_cover_the_papers_grid():
    """unlearn_x_compress: 3 unlearners x {wanda, gptq} x 2 strengths x both orders; edit_x_unlearn: 3 x 3 x both."""
    from shared.spec import load_spec

    root = EXPERIMENTS[0].parent
    plan = build_plan(load_spec(root / "unlearn_x_compress.yaml"))
    unlearners, compressors = ("ga", "gd", "rmu"), ("wanda", "gptq")
    assert _pairs(plan) == {p for u in unlearners for c in compressors for p in ((u, c), (c, u))}
    two = [c for c in plan.compositions if len(c["names"]) == 2]
    assert len(two) == 3 * 2 * 2 * 2  # two strengths each
    # re-compression: a compressor that comes first runs again at the end
    first_compressed = [c for c in two if c["names"][0] in compressors]
    assert len(first_compressed) == 12 and all(c["recompress"] == c["names"][0] for c in first_compressed)
    assert all([s["method"] for s in plan.nodes[c["node"]].steps][-1] == c["names"][0] for c in first_compressed)
    assert set(plan.evaluators) >= {"forget", "utility", "perplexity"}

    plan = build_plan(load_spec(root / "edit_x_unlearn.yaml"))
    editors = ("ft", "lora", "memit")
    assert _pairs(plan) == {p for e in editors for u in unlearners for p in ((e, u), (u, e))}
    assert set(plan.evaluators) >= {"edit", "forget", "utility"}


def test_cluster_data_sources_compile_without_reading_them(tmp_path):
    """A spec with S3 corpora and lm-eval WMDP tasks compiles on a machine that cannot reach the bucket."""
    from pipelines.builder import compile_pipeline
    from shared.spec import parse_spec as parse

    raw = yaml.safe_load((EXPERIMENTS[0].parent / "unlearn_x_compress.yaml").read_text())
    raw["data"] = {
        "forget_corpus": "s3://nowhere-bucket/wmdp/bio-forget-corpus.jsonl",
        "retain_corpus": "s3://nowhere-bucket/wikitext/train.jsonl",
        "forget_mcq": "lm-eval:wmdp_bio,wmdp_cyber",
        "utility_mcq": "lm-eval:mmlu",
    }
    spec = parse(raw, fetch_remote=False)
    out = tmp_path / "p.yaml"
    compile_pipeline(spec, "s3://bucket/prefix", str(out))
    text = out.read_text()
    assert "s3://nowhere-bucket/wmdp/bio-forget-corpus.jsonl" in text and "wmdp_bio,wmdp_cyber" in text


def test_compiled_study_pipelines_are_compact_and_their_sources_still_compile(tmp_path):
    """Docstrings and descriptions are dropped from compiled studies (one copy per task); the code stays intact."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines.builder import compile_pipeline

    spec = parse_spec(TINY_SPEC)
    out = tmp_path / "p.yaml"
    compile_pipeline(spec, "s3://bucket/prefix", str(out))
    text = out.read_text()
    assert text.startswith("# PIPELINE DEFINITION")
    doc = next(yaml.safe_load_all(text))
    json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())
    for comp in doc["components"].values():
        for kind in ("parameters", "artifacts"):
            assert all("description" not in e for e in comp.get("inputDefinitions", {}).get(kind, {}).values())
    sources = [c for ex in doc["deploymentSpec"]["executors"].values() for c in ex["container"]["command"] if "def " in c]
    assert sources and all('"""' not in s for s in sources)
    for source in sources:
        compile(source, "<component>", "exec")  # still valid Python: only the docstring went
    assert any("run_intervention(" in s for s in sources) and any("run_evaluation(" in s for s in sources)

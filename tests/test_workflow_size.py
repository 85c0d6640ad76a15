"""The Argo workflow size of compiled runs (pipelines/workflow_size.py), the budget compile enforces, auto sharding,
the trims that keep behaviour, and the plan the aggregation run reads from the store (shared/plan_store.py).

The size model re-implements the KFP backend's Argo compiler for the pipelines this project compiles; it is checked
against golden workflows of KFP 2.15.0 (tests/data/kfp-2.15.0-golden) and against pipelines compiled by the builder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines.workflow_size import compile_workflow, go_json, go_json_size, measure, measure_file, read_ir
from shared.planner import build_plan
from shared.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "data" / "kfp-2.15.0-golden"
DEMO = ROOT / "pipelines" / "experiments" / "demo.yaml"
PAPER = ROOT / "pipelines" / "experiments" / "paper"


# --- the model against KFP's own golden workflows ---------------------------------------------------


def _hashes_named_by_order(obj: dict) -> dict:
    """The workflow with each container hash (``components-<sha256>``) replaced by its order of appearance.

    KFP names shared component specs by a hash of Go's struct encoding of the container; the model uses another
    hash of the same content (same length), so only the names differ.
    """
    text = json.dumps(obj, sort_keys=True)
    seen: list[str] = []
    for digest in re.findall(r"(?:components|implementations)-([0-9a-f]{64})", text):
        if digest not in seen:
            seen.append(digest)
    for i, digest in enumerate(seen):
        text = text.replace(digest, f"{i:064d}")
    return json.loads(text)


@pytest.mark.parametrize("name", sorted(p.name.removesuffix(".ir.yaml") for p in GOLDEN.glob("*.ir.yaml")))
def test_the_model_compiles_kfp_golden_workflows_exactly(name):
    ir, platform = read_ir(GOLDEN / f"{name}.ir.yaml")
    golden = yaml.safe_load((GOLDEN / f"{name}.workflow.yaml").read_text())
    # the goldens name the images of an unreleased build
    mine = compile_workflow(ir, platform, driver_image="ghcr.io/kubeflow/kfp-driver:latest",
                            launcher_image="ghcr.io/kubeflow/kfp-launcher:latest")
    assert _hashes_named_by_order(mine) == _hashes_named_by_order(golden)
    assert go_json_size(mine) == go_json_size(golden)


def test_go_json_writes_what_go_writes():
    # floats as Go's encoding/json: shortest form, 'e' only below 1e-6 and from 1e21; HTML characters escaped
    assert go_json([1.0, 0.25, 5e-05, 1e-07, 1e21, -0.5, 128, True, None]) == \
        "[1,0.25,0.00005,1e-7,1e+21,-0.5,128,true,null]"
    assert go_json({"b": "x > y & z", "a": "\u2028"}) == '{"a":"\\u2028","b":"x \\u003e y \\u0026 z"}'
    # a JSON document in a string is escaped twice: every quote costs two bytes, every '>' seven
    inner = go_json({"name": "ft > wanda"})
    assert go_json_size({"task": inner}) == len('{"task":""}') + len(inner) + inner.count('"') + inner.count("\\")


# --- the model against pipelines compiled by the builder -------------------------------------------


@pytest.fixture(scope="module")
def demo_sizes():
    """The demo compiled as one run and as three shards (+ the aggregation run), each run's modelled size."""
    from pipelines.builder import measure_run

    spec = load_spec(DEMO, fetch_remote=False)
    plan, cluster = build_plan(spec), spec.cluster_config()
    return {n: [measure_run(spec, "s3://bucket/prefix", cluster, plan, n, i) for i in range(n + (n > 1))]
            for n in (1, 3)}


def test_sizes_grow_with_the_tasks_of_a_run(demo_sizes):
    runs = sorted([*demo_sizes[1], *demo_sizes[3]], key=lambda s: s.tasks)
    assert [s.tasks for s in runs] == [2, 6, 7, 7, 20]  # aggregation run, three shards, the one run
    for smaller, larger in zip(runs, runs[1:]):
        if larger.tasks > smaller.tasks:
            assert larger.created_bytes > smaller.created_bytes and larger.end_bytes > smaller.end_bytes
        assert smaller.created_bytes < smaller.end_bytes < smaller.end_uncompressed_bytes
    # a line through the shards and the one run: a few KB per task on creation and at the end, a fixed part of
    # tens of KB (templates, the components' specs and sources, server metadata)
    one, shard = demo_sizes[1][0], max(demo_sizes[3][:3], key=lambda s: s.tasks)
    per_task_created = (one.created_bytes - shard.created_bytes) / (one.tasks - shard.tasks)
    per_task_end = (one.end_bytes - shard.end_bytes) / (one.tasks - shard.tasks)
    fixed = one.created_bytes - per_task_created * one.tasks
    assert 1_500 < per_task_created < 6_000, per_task_created
    assert 2_500 < per_task_end < 9_000, per_task_end
    assert 10_000 < fixed < 60_000, fixed


def test_a_workflow_holds_each_task_twice_and_each_distinct_component_once(tmp_path):
    """What the size is made of: a driver and an executor per task, the task spec in the root DAG too, one
    component spec, container and Kubernetes config per distinct component (trimmed IR: identical ones shared)."""
    from pipelines.builder import compile_pipeline

    spec = load_spec(DEMO, fetch_remote=False)
    ir, platform = compile_pipeline(spec, "s3://bucket/prefix", str(tmp_path / "p.yaml"))
    workflow = compile_workflow(ir, platform)
    tasks = ir["root"]["dag"]["tasks"]
    root = next(t for t in workflow["spec"]["templates"] if t["name"] == "root")
    assert sorted(t["name"] for t in root["dag"]["tasks"]) == sorted([*tasks, *(f"{k}-driver" for k in tasks)])
    args = {p["name"]: p["value"] for p in workflow["spec"]["arguments"]["parameters"]}
    assert sum(n.startswith("kubernetes-") for n in args) == len(ir["components"])
    assert sum(n.startswith("implementations-") for n in args) == len(ir["deploymentSpec"]["executors"])
    assert json.loads(args["components-root"])["dag"]["tasks"].keys() == tasks.keys()
    assert len(ir["components"]) < len(tasks)  # tasks share components


# --- trims: fewer bytes per task, the same behaviour ------------------------------------------------


def test_trims_keep_what_every_task_runs(tmp_path):
    """Raw KFP output vs the compacted pipeline: each task still gets the same container, Kubernetes settings and
    argument values (a left-out argument is the component's default); only docstrings, descriptions and the
    deprecated secret/config map name fields are gone."""
    from kfp import compiler

    from pipelines.builder import _DOCSTRING, build_pipeline, compact_compiled
    from tests.test_cluster import BATCHED

    spec = parse_spec({**BATCHED, "cluster": {"hf_token_secret": "hub-token", "accelerator": "gpu"}})
    raw_path, compact_path = tmp_path / "raw.yaml", tmp_path / "compact.yaml"
    compiler.Compiler().compile(build_pipeline(spec, "s3://b/p", kubernetes=True), str(raw_path))
    compact_path.write_text(raw_path.read_text())
    raw_ir, raw_platform = read_ir(raw_path)
    ir, platform = compact_compiled(str(compact_path))
    raw_k8s = raw_platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert raw_ir["root"]["dag"]["tasks"].keys() == ir["root"]["dag"]["tasks"].keys()
    assert len(ir["components"]) < len(raw_ir["components"])

    def received(doc, task):
        comp = doc["components"][task["componentRef"]["name"]]
        values = {n: s["defaultValue"] for n, s in comp.get("inputDefinitions", {}).get("parameters", {}).items()
                  if "defaultValue" in s}
        values.update({n: s.get("runtimeValue", {}).get("constant", s) for n, s in
                       task.get("inputs", {}).get("parameters", {}).items()})
        return json.loads(go_json(values))  # 1 and 1.0 alike, as the protobuf Value holds them

    for name, raw_task in raw_ir["root"]["dag"]["tasks"].items():
        task = ir["root"]["dag"]["tasks"][name]
        assert received(raw_ir, raw_task) == received(ir, task), name
        raw_label = raw_ir["components"][raw_task["componentRef"]["name"]]["executorLabel"]
        label = ir["components"][task["componentRef"]["name"]]["executorLabel"]
        raw_container = raw_ir["deploymentSpec"]["executors"][raw_label]["container"]
        raw_container["command"] = [_DOCSTRING.sub(r"\1", c, count=1) for c in raw_container["command"]]
        assert ir["deploymentSpec"]["executors"][label]["container"] == raw_container, name
        for entry in raw_k8s[raw_label].get("secretAsEnv", []):
            assert entry.pop("secretName") == entry["secretNameParameter"]["runtimeValue"]["constant"]
        for entry in raw_k8s[raw_label].get("configMapAsEnv", []):
            assert entry.pop("configMapName") == entry["configMapNameParameter"]["runtimeValue"]["constant"]
        assert k8s[label] == raw_k8s[raw_label], name
        assert {k: v for k, v in task.items() if k != "componentRef" and k != "inputs"} == \
               {k: v for k, v in raw_task.items() if k != "componentRef" and k != "inputs"}
    assert measure(ir, platform).created_bytes < 0.75 * measure(raw_ir, raw_platform).created_bytes


# --- the budget ---------------------------------------------------------------------------------------


def _demo_with(tmp_path: Path, **cluster) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({**raw, "cluster": {**(raw.get("cluster") or {}), **cluster}}))
    return path


def test_a_run_over_the_budget_is_refused_naming_it_and_the_shards_that_fit(tmp_path, capsys):
    from pipelines.cli import main

    spec = _demo_with(tmp_path, workflow_budget_bytes=100 * 1024, shards=1)
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out), "--store", "s3://b/p"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert re.match(r"error: cluster\.shards: run demo \(20 tasks\) is expected to reach .*over the budget of 100 KiB "
                    r"\(cluster\.workflow_budget_bytes; Argo errors a workflow over 1 MiB\): use --shards 2 ", err), err
    assert not out.exists() or not list(out.glob("*.pipeline.yaml"))


def test_auto_shards_are_the_fewest_runs_that_fit(tmp_path, capsys):
    from pipelines.cli import main

    spec = _demo_with(tmp_path, workflow_budget_bytes=100 * 1024)  # shards: auto is the default
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out), "--store", "s3://b/p"]) == 0
    stdout = capsys.readouterr().out
    files = sorted(p.name for p in out.glob("*.pipeline.yaml"))
    assert files == ["demo.aggregate.pipeline.yaml", "demo.shard-1-of-2.pipeline.yaml",
                     "demo.shard-2-of-2.pipeline.yaml"]
    for name in files:
        size = measure_file(out / name)  # the same model compile used, so the same figures
        assert size.end_bytes <= 100 * 1024
        assert f"{size.end_bytes / 1024:,.0f} KiB expected at the end" in stdout
    # one run would not fit (the refusal above), so two is the fewest
    assert (out / "demo.plan.json").is_file() and "lmcompose upload-plan" in stdout


def test_a_paper_study_in_one_run_is_refused_with_the_shards_that_fit(capsys):
    """``shards: 1`` on the paper's unlearning x compression study (394 tasks): refused before compiling it."""
    from pipelines.cli import main

    assert main(["plan", str(PAPER / "llama3_unlearn_x_compress.yaml"), "--shards", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: cluster.shards: run llama3-unlearn-x-compress (394 tasks) is expected to reach about")
    assert err.endswith("use --shards 3 (cluster.shards: 3, or auto)")


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.yaml")), ids=lambda p: p.stem)
def test_the_aggregation_run_of_every_paper_study_is_under_100_kb(path):
    """It carries the plan's store key and digest, not the plan: its size does not grow with the study."""
    from pipelines.builder import measure_run

    spec = load_spec(path, fetch_remote=False)
    size = measure_run(spec, "s3://studies/llama3", spec.cluster_config(), build_plan(spec), 3, 3)
    assert size.tasks == 2
    assert size.created_bytes < 100_000 and size.end_bytes < 100_000, size


@pytest.mark.slow
def test_auto_shards_of_the_paper_studies(capsys):
    """What docs/cost-model.md reports: the shard count auto chooses and the largest run, within the budget."""
    from pipelines.builder import choose_shards
    from tests.test_cluster import AUTO_SHARDS

    for name, expected in AUTO_SHARDS.items():
        spec = load_spec(PAPER / f"{name}.yaml", fetch_remote=False)
        cluster = spec.cluster_config()
        shards, largest = choose_shards(spec, "s3://studies/llama3", cluster, build_plan(spec))
        assert shards == expected, (name, shards, largest)
        assert largest.end_bytes <= cluster.workflow_budget_bytes


# --- the plan in the store --------------------------------------------------------------------------


def test_the_plan_goes_by_reference_and_is_checked(tmp_path):
    from shared.plan_store import PlanNotFound, plan_key, plan_reference, put_plan, resolve_plan
    from shared.store import open_store

    plan = build_plan(load_spec(DEMO, fetch_remote=False)).to_json()
    store = str(tmp_path / "store")
    ref = plan_reference(plan)
    with pytest.raises(PlanNotFound, match=r"plans/[0-9a-f]{64}\.json is not in the store .*lmcompose upload-plan"):
        resolve_plan(store, ref)
    assert put_plan(store, plan) == plan_key(plan) == json.loads(ref)["plan_key"]
    assert json.loads(resolve_plan(store, ref)) == plan
    inline = json.dumps(plan)
    assert resolve_plan(store, inline) is inline  # a plan passed as it is (kfp.local runs, older pipelines)
    # a stored plan that is not the one referenced (same key, other content) is refused
    changed = {**plan, "spec_name": "other"}
    open_store(store).put_json(plan_key(plan), changed)
    with pytest.raises(PlanNotFound, match="has sha256"):
        resolve_plan(store, ref)


def test_compile_writes_the_plan_and_upload_plan_puts_it_in_the_store(tmp_path, capsys):
    from pipelines.cli import main
    from shared.plan_store import resolve_plan

    out = tmp_path / "out"
    assert main(["compile", str(DEMO), "-o", str(out / "demo.yaml"), "--store", "s3://b/p"]) == 0
    ir, _ = read_ir(out / "demo.yaml")
    ref = ir["root"]["dag"]["tasks"]["aggregate"]["inputs"]["parameters"]["plan"]["runtimeValue"]["constant"]
    plan_file = out / "demo.plan.json"
    assert plan_file.is_file() and json.loads(ref)["plan_key"] in capsys.readouterr().out
    store = str(tmp_path / "store")
    assert main(["upload-plan", str(plan_file), "--store", store]) == 0
    assert json.loads(resolve_plan(store, ref)) == build_plan(load_spec(DEMO, fetch_remote=False)).to_json()
    edited = tmp_path / "edited.plan.json"
    edited.write_text(plan_file.read_text().replace('"demo"', '"other"', 1))
    assert main(["upload-plan", str(edited), "--store", store]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


@pytest.mark.slow
def test_kfp_local_run_reads_the_plan_from_the_store(tmp_path):
    """The compiled pipelines' path end to end on this machine: the aggregator gets only the plan's key and digest."""
    import kfp.local

    from pipelines.builder import build_pipeline, evaluation_options
    from shared.execution import base_digest_in_store, latest_report_key, report_key
    from shared.plan_store import plan_reference, put_plan
    from shared.store import open_store

    spec = parse_spec({
        "name": "by-reference", "model": "builtin:tiny-random",
        "interventions": [{"method": "wanda", "params": {"num_calibration_samples": 2, "calibration_seq_len": 16}}],
        "evaluation": {"evaluators": ["compression"]},
    })
    plan = build_plan(spec)
    store = str(tmp_path / "store")
    put_plan(store, plan.to_json())
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
                   enable_caching=False)
    build_pipeline(spec, store, plan, kubernetes=False, plan_arg=plan_reference(plan.to_json()))()
    key = report_key(base_digest_in_store(store, spec.model), json.dumps(plan.to_json(), sort_keys=True),
                     spec.data.for_batch(0).model_dump_json(), json.dumps(evaluation_options(spec), sort_keys=True))
    folder, _ = open_store(store).get_checkpoint(latest_report_key(store, key))
    assert (folder / "results.csv").is_file()

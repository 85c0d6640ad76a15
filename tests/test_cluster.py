"""Cluster settings, sharded studies and submission.

Compiled study pipelines are parsed with KFP's own protobuf and must carry
the GPU requests, retries, secrets-as-env and node selectors; shards must
cover the plan exactly once; ``lmcompose submit`` is exercised with the real
``kfp.Client`` against a local HTTP server that answers the KFP v2beta1 REST
calls it makes and records them (no live cluster here).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from shared.cluster import ClusterConfig, PlacementError, load_placement, load_store_uri, merge_cluster
from shared.planner import build_plan, evaluation_tasks, fan_in_tasks, partition, pipeline_counts
from shared.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "pipelines" / "experiments" / "paper").glob("*.yaml"))
#: the shard count ``cluster.shards: auto`` chooses for each paper study (docs/cost-model.md, "Workflow size";
#: tests/test_workflow_size.py checks it)
AUTO_SHARDS = {"llama3_edit_x_compress": 33, "llama3_edit_x_unlearn": 4, "llama3_unlearn_x_compress": 3}
BASE_SPEC = {"name": "c", "model": "builtin:tiny-random", "interventions": [{"method": "wanda"}]}

#: a small study with two edit batches: ft first (split per batch) and wanda first (shared by the batches)
BATCHED = {
    "name": "batched",
    "model": "builtin:tiny-random",
    "interventions": [
        {"method": "ft", "params": {"steps": 1, "layers": [0]}},
        {"method": "wanda", "sweep": {"sparsity": [0.25, 0.5]}},
        {"method": "gptq", "params": {"group_size": 32}},
    ],
    "compositions": {"mode": "cross", "groups": [["ft"], ["wanda", "gptq"]]},
    "evaluation": {"evaluators": ["edit", "perplexity"]},
    "data": {"num_edits": 2, "num_batches": 2},
}


def _load_paper(path: Path):
    return load_spec(path, fetch_remote=False)


# --- the cluster block -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block, field",
    [
        ({"resources": {"ft": {"memory": "lots"}}}, "cluster.resources.ft.memory"),
        ({"resources": {"fine-tune": {"cpu": "4"}}}, "cluster.resources.fine-tune"),
        ({"resources": {"ft": {"accelerator_count": -1}}}, "cluster.resources.ft.accelerator_count"),
        ({"node_selector": {"not a key!": "x"}}, "cluster.node_selector"),
        ({"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}, "cluster.tolerations[0]"),
        ({"retries": 11}, "cluster.retries"),
        ({"retry_backoff": "soon"}, "cluster.retry_backoff"),
        ({"s3_secret": "My_Secret"}, "cluster.s3_secret"),
        ({"shards": 0}, "cluster.shards"),
        ({"gpus": 2}, "cluster.gpus"),
    ],
)
def test_cluster_block_errors_name_the_field(block, field):
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE_SPEC, "cluster": block})
    assert str(err.value).startswith(f"{field}:"), str(err.value)


def test_unknown_resource_key_lists_the_allowed_tasks():
    with pytest.raises(SpecError, match=r"allowed: .*prepare_base.*\bft\b.*evaluate_forget"):
        parse_spec({**BASE_SPEC, "cluster": {"resources": {"fine-tune": {}}}})


def test_precedence_defaults_then_placement_then_spec():
    # a model of unknown size (a hub id) gets the large-model defaults: one GPU per model task
    spec = parse_spec({**BASE_SPEC, "model": "hf:meta-llama/Meta-Llama-3-8B",
                       "cluster": {"resources": {"ft": {"memory": "128Gi"}}, "retries": 5}})
    placement = {"node_selector": {"pool": "a100"}, "retries": 1, "resources": {"ft": {"cpu": "16"}}}
    cfg = spec.cluster_config(placement)
    ft = cfg.resources_for("ft", "edit")
    assert (ft.memory, ft.cpu, ft.accelerator_count) == ("128Gi", "16", 1)  # spec, placement, default
    assert cfg.retries == 5 and cfg.node_selector == {"pool": "a100"}
    # untouched defaults: a family value, and CPU-only bookkeeping tasks
    assert cfg.resources_for("rmu", "unlearn").memory == ClusterConfig().resources["unlearn"].memory
    assert not cfg.resources_for("aggregate", "default").uses_gpu
    assert not cfg.resources_for("evaluate_compression", "evaluate").uses_gpu
    assert cfg.resources_for("evaluate_forget", "evaluate").uses_gpu


def test_placement_file_forms(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("node_selector: {pool: gpu}\nretries: 3\n")
    assert load_placement(plain) == {"node_selector": {"pool": "gpu"}, "retries": 3}

    rendered = tmp_path / "rendered.yaml"
    objects = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "lmcompose-s3-credentials"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "lmcompose-store"},
         "data": {"LMCOMPOSE_STORE": "s3://studies/llama3"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "lmcompose-placement"},
         "data": {"cluster.yaml": "node_selector:\n  cloud.google.com/gke-accelerator: nvidia-a100-80gb\n"}},
    ]
    rendered.write_text(yaml.safe_dump_all(objects))
    block = load_placement(rendered)
    assert merge_cluster(block).node_selector == {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}
    assert load_store_uri(rendered) == "s3://studies/llama3"

    rendered.write_text(yaml.safe_dump_all(objects[:2]))
    with pytest.raises(PlacementError, match="no ConfigMap named lmcompose-placement"):
        load_placement(rendered)
    plain.write_text("- a\n- b\n")
    with pytest.raises(PlacementError, match="expected one mapping"):
        load_placement(plain)


# --- shards ------------------------------------------------------------------------------------


def _work_items(plan) -> set[tuple[str, int]]:
    """Every (node, batch) a plan computes or evaluates: per batch where the model or an evaluator needs it."""
    items = set()
    for node in plan.nodes.values():
        for b in range(plan.num_batches):
            items.add((node.id, b))
    return items


@pytest.mark.parametrize("raw_or_path", [BATCHED, *PAPER], ids=lambda p: getattr(p, "stem", "batched"))
def test_shards_cover_the_plan_exactly_once(raw_or_path):
    spec = parse_spec(raw_or_path) if isinstance(raw_or_path, dict) else _load_paper(raw_or_path)
    plan = build_plan(spec)
    shards = AUTO_SHARDS[raw_or_path.stem] if not isinstance(raw_or_path, dict) else 3
    parts = partition(plan, shards)
    assert len(parts) == shards and all(parts)
    union = set().union(*parts)
    assert union == _work_items(plan)
    assert sum(len(p) for p in parts) == len(union)  # disjoint
    owner = {item: i for i, part in enumerate(parts) for item in part}
    for (nid, b), i in owner.items():
        node = plan.nodes[nid]
        if node.parent in (None, "base"):
            continue
        parent = plan.nodes[node.parent]
        parent_batch = b if plan.batches_of(parent) > 1 else 0
        assert owner[(parent.id, parent_batch)] == i, f"{nid}[{b}] and its parent are in different runs"
    counts = pipeline_counts(plan, shards)
    single = pipeline_counts(plan, 1)
    # every shard looks the base model up once; the report run adds a lookup and the aggregator;
    # only a one-run study joins its evaluations with collect_results tasks (a report run reads the store)
    joins = fan_in_tasks(evaluation_tasks(plan)) if shards > 1 else 0
    assert counts["tasks"] == single["tasks"] - joins + (shards - 1) + (1 if shards > 1 else 0)
    assert counts["pipeline_runs"] == shards + (shards > 1)


def test_too_many_shards_names_the_limit():
    plan = build_plan(parse_spec(BATCHED))
    units = 2 + 3  # ft first, split into its 2 edit batches; wanda(0.25), wanda(0.5) and gptq first: 3 subtrees
    partition(plan, units)
    with pytest.raises(ValueError, match=rf"only {units} independent unit"):
        partition(plan, units + 1)


def _compiled_tasks(path: Path) -> dict[str, int]:
    """Component name -> how many tasks a compiled pipeline runs of it (loop bodies x their items)."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    pipeline = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(next(yaml.safe_load_all(path.read_text())), pipeline)
    counts: dict[str, int] = {}
    for task in pipeline.root.dag.tasks.values():
        name = re.sub(r"-\d+$", "", task.component_ref.name)
        if name.startswith("comp-for-loop"):
            items = len(json.loads(task.parameter_iterator.items.raw))
            for inner in pipeline.components[task.component_ref.name].dag.tasks.values():
                inner_name = re.sub(r"-\d+$", "", inner.component_ref.name)
                counts[inner_name] = counts.get(inner_name, 0) + items
        else:
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_sharded_runs_add_up_to_the_single_run(tmp_path):
    """Compiled shard runs + the report run do exactly the work of the one-run pipeline (plus base lookups)."""
    from pipelines.builder import compile_pipeline, compile_study

    spec = parse_spec(BATCHED)
    single = tmp_path / "single.yaml"
    compile_pipeline(spec, "s3://b/p", str(single))
    whole = _compiled_tasks(single)
    paths = compile_study(spec, "s3://b/p", str(tmp_path / "shards"), merge_cluster({"shards": 3}))
    assert [Path(p).name for p in paths] == [
        "batched.shard-1-of-3.pipeline.yaml", "batched.shard-2-of-3.pipeline.yaml",
        "batched.shard-3-of-3.pipeline.yaml", "batched.aggregate.pipeline.yaml",
    ]
    total: dict[str, int] = {}
    for p in paths:
        for name, n in _compiled_tasks(Path(p)).items():
            total[name] = total.get(name, 0) + n
    assert total.pop("comp-prepare-base") == 4 and whole.pop("comp-prepare-base") == 1
    # the one-run pipeline joins its evaluations for the aggregator; the report run of a sharded study reads the store
    assert whole.pop("comp-collect-results") == fan_in_tasks(evaluation_tasks(build_plan(spec)))
    assert total == whole
    assert _compiled_tasks(Path(paths[-1])) == {"comp-prepare-base": 1, "comp-aggregate": 1}
    joins = fan_in_tasks(evaluation_tasks(build_plan(spec)))
    assert sum(whole.values()) + 1 + joins == pipeline_counts(build_plan(spec), 1)["tasks"]


# --- compiled study pipelines ------------------------------------------------------------------


def _tasks_with_components(pipeline) -> list[tuple[str, object]]:
    out = [(t.component_ref.name, t) for t in pipeline.root.dag.tasks.values()]
    for t in list(pipeline.root.dag.tasks.values()):
        comp = pipeline.components[t.component_ref.name]
        if comp.HasField("dag"):
            out += [(i.component_ref.name, i) for i in comp.dag.tasks.values()]
    return [(n, t) for n, t in out if not n.startswith("comp-for-loop")]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_studies_compile_with_gpu_requests_retries_secrets_and_node_selectors(path, tmp_path, monkeypatch):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines.builder import compile_pipeline

    # values that must never reach a compiled pipeline
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-secret-value-1234")
    monkeypatch.setenv("HF_TOKEN", "hf_canarytoken5678")
    spec = _load_paper(path)
    placement = {
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"},
        "cpu_node_selector": {"pool": "cpu"},
    }
    cluster = spec.cluster_config(placement)
    assert cluster.shards == "auto"  # split into the fewest runs that fit Argo's limits
    shards = AUTO_SHARDS[path.stem]
    for label, kwargs in (("shard", {"shard": (0, shards)}), ("aggregate", {"aggregate_only": True})):
        out = tmp_path / f"{label}.yaml"
        compile_pipeline(spec, "s3://studies/llama3", str(out), cluster, **kwargs)
        text = out.read_text()
        assert "canary-secret-value-1234" not in text and "hf_canarytoken5678" not in text
        docs = list(yaml.safe_load_all(text))
        pipeline = pipeline_spec_pb2.PipelineSpec()
        json_format.ParseDict(docs[0], pipeline)  # KFP's own schema
        executors = docs[0]["deploymentSpec"]["executors"]
        platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert set(platform) == set(executors)
        gpu_seen = cpu_seen = 0
        for name, executor in executors.items():
            container, k8s = executor["container"], platform[name]
            resources = container.get("resources", {})
            # credentials and hub token by reference to Kubernetes Secrets, in the parameter form only (the
            # deprecated secretName is trimmed: KFP backends read secretNameParameter since 2.5.0)
            secrets = {s["secretNameParameter"]["runtimeValue"]["constant"]: s for s in k8s["secretAsEnv"]}
            assert all("secretName" not in s for s in k8s["secretAsEnv"])
            assert all("configMapName" not in c and c["configMapNameParameter"] for c in k8s["configMapAsEnv"])
            assert {e["envVar"] for e in secrets["lmcompose-s3-credentials"]["keyToEnv"]} == {
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            assert secrets["lmcompose-hf-token"]["keyToEnv"][0]["envVar"] == "HF_TOKEN"
            assert k8s["emptyDirMounts"][0]["mountPath"] == "/scratch"
            assert int(k8s["activeDeadlineSeconds"]) > 0
            if "accelerator" in resources:
                gpu_seen += 1
                assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
                assert int(resources["accelerator"]["resourceCount"]) >= 1
                assert resources["resourceMemoryLimit"].endswith("Gi")
                assert k8s["nodeSelector"]["labels"] == placement["node_selector"]
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
                assert container["image"].endswith("-cuda")
            else:
                cpu_seen += 1
                assert container["image"].endswith("-cpu")
                assert k8s["nodeSelector"]["labels"] == {"pool": "cpu"}
                assert "tolerations" not in k8s
        assert cpu_seen >= 1  # prepare_base (and the aggregator)
        if label == "shard":
            assert gpu_seen >= 1
        for name, task in _tasks_with_components(pipeline):
            assert task.retry_policy.max_retry_count == cluster.retries, name
            assert not task.caching_options.enable_cache, name


def test_local_runs_get_no_cluster_settings():
    """kfp.local ignores Kubernetes settings; the local driver builds without them."""
    from kfp import compiler

    from pipelines.builder import build_pipeline

    spec = parse_spec(BATCHED)
    pipeline = build_pipeline(spec, "/tmp/store", kubernetes=False)
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".yaml") as f:
        compiler.Compiler().compile(pipeline, f.name)
        docs = list(yaml.safe_load_all(Path(f.name).read_text()))
    assert len(docs) == 1  # no platform (Kubernetes) section
    assert all("accelerator" not in e["container"].get("resources", {}) for e in docs[0]["deploymentSpec"]["executors"].values())


# --- command line: plan, compile, submit -------------------------------------------------------


def test_plan_prints_runs_tasks_steps_and_naive_counts(capsys):
    from pipelines.cli import main

    path = ROOT / "pipelines" / "experiments" / "paper" / "llama3_edit_x_compress.yaml"
    assert main(["plan", str(path), "--shards", "40"]) == 0  # a given count: sizes one run, not the search of auto
    out = capsys.readouterr().out
    spec = _load_paper(path)
    plan = build_plan(spec)
    counts, runs = plan.counts(), pipeline_counts(plan, 40)
    assert f"compositions:       {counts['compositions']} (x 10 edit batches" in out
    assert f"intervention runs:  {counts['intervention_runs']} (naive, each composition from scratch: " \
           f"{counts['intervention_runs_naive']}" in out
    assert f"evaluations:        {counts['evaluations']} (naive: {counts['evaluations_naive']}" in out
    assert f"pipeline runs:      {runs['pipeline_runs']} (40 shards + 1 aggregation run)" in out
    assert f"KFP tasks:          {runs['tasks']} (largest run: {runs['largest_run_tasks']})" in out
    # the modelled Argo workflow sizes of the largest run and of the aggregation run (pipelines/workflow_size.py)
    assert re.search(r"workflow size:      largest run llama3-edit-x-compress\.shard-\d+-of-40: 102 tasks, "
                     r"[\d,]+ KiB on creation, [\d,]+ KiB expected at the end", out)
    assert "aggregation run llama3-edit-x-compress.aggregate: 2 tasks" in out
    # the paper's grid: 3 editors x (6 + 6 + 4 + 6 compressor settings) x both orders, plus singles and base
    assert counts["compositions"] == 1 + 3 + 22 + 3 * 22 * 2


def test_compile_with_too_many_shards_fails_cleanly(tmp_path, capsys):
    from pipelines.cli import main

    rc = main(["compile", str(ROOT / "pipelines" / "experiments" / "demo.yaml"), "-o", str(tmp_path / "out"),
               "--store", "s3://b/p", "--shards", "50"])
    assert rc == 2
    assert "cluster.shards: 50 requested" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


class _KfpApi:
    """Answers the KFP v2beta1 REST calls kfp.Client makes for a submission and records them."""

    def __init__(self, failed_runs: int = 0):
        self.calls: list[tuple[str, str, object, dict]] = []
        self.failed_runs = failed_runs
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, obj, code=200):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                api.calls.append(("GET", self.path, None, {k.lower(): v for k, v in self.headers.items()}))
                if self.path.startswith("/apis/v2beta1/healthz"):
                    return self._reply({"multi_user": False})
                if self.path.startswith("/apis/v2beta1/experiments"):
                    return self._reply({})
                if self.path.startswith("/apis/v2beta1/runs/"):
                    run_id = self.path.rsplit("/", 1)[1]
                    n = int(run_id.split("-")[1])
                    return self._reply({"run_id": run_id, "state": "FAILED" if n <= api.failed_runs else "SUCCEEDED"})
                self._reply({}, 404)

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.calls.append(("POST", self.path, body, {k.lower(): v for k, v in self.headers.items()}))
                if self.path == "/apis/v2beta1/experiments":
                    return self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
                if self.path == "/apis/v2beta1/runs":
                    n = sum(1 for c in api.calls if c[0] == "POST" and c[1] == "/apis/v2beta1/runs")
                    return self._reply({"run_id": f"run-{n}", "display_name": body["display_name"]})
                self._reply({}, 404)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def runs(self) -> list[dict]:
        return [c[2] for c in self.calls if c[0] == "POST" and c[1] == "/apis/v2beta1/runs"]

    def close(self):
        self.server.shutdown()


@pytest.fixture
def kfp_api(monkeypatch):
    """A recording KFP API; the plan uploads of ``submit`` are recorded too (``api.plans``), in the call order."""
    api = _KfpApi()
    api.plans = []

    def put_plan(store_uri, plan):
        from shared.plan_store import plan_key

        api.plans.append((store_uri, plan_key(plan)))
        api.calls.append(("PUT-PLAN", store_uri, None, {}))
        return plan_key(plan)

    monkeypatch.setattr("shared.plan_store.put_plan", put_plan)
    yield api
    api.close()


def test_submit_sends_every_shard_then_the_report(kfp_api, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.setenv("LMCOMPOSE_KFP_TOKEN", "token-abc")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-secret-value-1234")
    rc = main(["submit", str(ROOT / "pipelines" / "experiments" / "demo.yaml"), "--host", kfp_api.url,
               "--store", "s3://b/p", "--shards", "2", "--experiment", "composition-study", "--wait"])
    assert rc == 0
    runs = kfp_api.runs()
    assert [r["display_name"] for r in runs] == ["demo.shard-1-of-2", "demo.shard-2-of-2", "demo.aggregate"]
    for run in runs:
        spec = run["pipeline_spec"]
        assert spec["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]["store_uri"]["defaultValue"] == "s3://b/p"
        executors = spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert all(e["secretAsEnv"][0]["secretNameParameter"]["runtimeValue"]["constant"] == "lmcompose-s3-credentials"
                   for e in executors.values())
        assert "canary-secret-value-1234" not in json.dumps(run)
    experiments = [c for c in kfp_api.calls if c[0] == "POST" and c[1] == "/apis/v2beta1/experiments"]
    assert experiments[0][2]["display_name"] == "composition-study"
    # the report run is submitted only after both shard runs were seen finished
    order = [(c[0], c[1]) for c in kfp_api.calls]
    last_shard_poll = max(i for i, c in enumerate(order) if c == ("GET", "/apis/v2beta1/runs/run-2"))
    report_post = [i for i, c in enumerate(order) if c == ("POST", "/apis/v2beta1/runs")][-1]
    assert last_shard_poll < report_post
    # the report reads the plan from the store: it was uploaded before the first run was submitted, and every
    # compiled run carries only its key and digest
    from shared.plan_store import plan_key

    assert kfp_api.plans == [("s3://b/p", plan_key(build_plan(load_spec(ROOT / "pipelines" / "experiments" / "demo.yaml",
                                                                          fetch_remote=False)).to_json()))]
    assert order.index(("PUT-PLAN", "s3://b/p")) < order.index(("POST", "/apis/v2beta1/runs"))
    aggregate_args = runs[-1]["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]["aggregate"]["inputs"]["parameters"]
    assert json.loads(aggregate_args["plan"]["runtimeValue"]["constant"]) == {
        "plan_key": kfp_api.plans[0][1], "plan_sha256": kfp_api.plans[0][1].removeprefix("plans/").removesuffix(".json")}
    # the bearer token from the environment authenticates every call and is never printed
    assert all(c[3].get("authorization") == "Bearer token-abc" for c in kfp_api.calls if c[0] != "PUT-PLAN")
    assert "token-abc" not in capsys.readouterr().out


def test_submit_refuses_when_the_plan_cannot_reach_the_store(kfp_api, monkeypatch, capsys):
    """No run is submitted whose report could not find the plan: an unwritable store stops submit first."""
    from pipelines.cli import main
    from shared.store import StoreError

    def unreachable(store_uri, plan):
        raise StoreError(f"no usable AWS credentials for {store_uri}")

    monkeypatch.setattr("shared.plan_store.put_plan", unreachable)
    rc = main(["submit", str(ROOT / "pipelines" / "experiments" / "demo.yaml"), "--host", kfp_api.url,
               "--store", "s3://b/p", "--shards", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "the study's plan could not be written to the store s3://b/p" in err
    assert "lmcompose upload-plan FILE --store s3://b/p" in err
    assert kfp_api.runs() == []


def test_submit_stops_before_the_report_when_a_shard_fails(monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.setattr("shared.plan_store.put_plan", lambda store_uri, plan: "plans/x.json")
    api = _KfpApi(failed_runs=1)
    try:
        rc = main(["submit", str(ROOT / "pipelines" / "experiments" / "demo.yaml"), "--host", api.url,
                   "--store", "s3://b/p", "--shards", "2", "--wait"])
        assert rc == 1
        assert len(api.runs()) == 2  # no report run
        assert "run-1 (FAILED)" in capsys.readouterr().err
    finally:
        api.close()


def test_submit_without_wait_prints_the_report_command(kfp_api, capsys):
    from pipelines.cli import main

    spec = str(ROOT / "pipelines" / "experiments" / "demo.yaml")
    assert main(["submit", spec, "--host", kfp_api.url, "--store", "s3://b/p", "--shards", "3"]) == 0
    assert len(kfp_api.runs()) == 3
    assert f"lmcompose submit {spec} --host {kfp_api.url} --aggregate-only" in capsys.readouterr().out
    assert main(["submit", spec, "--host", kfp_api.url, "--store", "s3://b/p", "--shards", "3", "--aggregate-only"]) == 0
    assert kfp_api.runs()[-1]["display_name"] == "demo.aggregate"


def test_submit_needs_an_s3_store(kfp_api, capsys, monkeypatch):
    from pipelines.cli import main

    monkeypatch.delenv("LMCOMPOSE_STORE", raising=False)
    rc = main(["submit", str(ROOT / "pipelines" / "experiments" / "demo.yaml"), "--host", kfp_api.url,
               "--store", "/tmp/local-store"])
    assert rc == 2
    assert "a cluster run needs an s3:// store" in capsys.readouterr().err
    assert kfp_api.calls == []  # nothing was sent


def test_submit_from_a_pod_uses_the_projected_service_account_token(kfp_api, tmp_path, monkeypatch):
    """Inside a pod (manifests/examples/submit-job.yaml) KFP's projected token authenticates the calls."""
    from pipelines.cli import main

    token = tmp_path / "token"
    token.write_text("projected-token-1")
    monkeypatch.delenv("LMCOMPOSE_KFP_TOKEN", raising=False)
    monkeypatch.delenv("LMCOMPOSE_KFP_COOKIES", raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    rc = main(["submit", str(ROOT / "pipelines" / "experiments" / "demo.yaml"), "--host", kfp_api.url,
               "--store", "s3://b/p"])
    assert rc == 0 and len(kfp_api.runs()) == 1
    posted = [c for c in kfp_api.calls if c[0] == "POST"]
    assert posted and all(c[3].get("authorization") == "Bearer projected-token-1" for c in posted)


def test_kfp_setters_see_the_same_caller_without_source_lookups():
    """The compile speed-up keeps what kfp reads from the stack and restores kfp's module afterwards."""
    import inspect

    from kfp.dsl import pipeline_task

    from pipelines.kfp_speedups import kfp_setters_without_source_lookup

    def names(frames) -> list[tuple[str, int, str]]:
        return [(f.filename, f.lineno, f.function) for f in frames]

    with kfp_setters_without_source_lookup():
        cheap, full = pipeline_task.inspect.stack(), inspect.stack()
        assert pipeline_task.inspect.signature is inspect.signature  # everything else forwarded
    assert [n[2] for n in names(cheap)] == [n[2] for n in names(full)]
    assert [n[0] for n in names(cheap)] == [n[0] for n in names(full)]
    assert all(f.code_context is None for f in cheap)
    assert pipeline_task.inspect is inspect

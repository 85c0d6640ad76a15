"""A full kfp.local pipeline run with checkpoints in a real S3 server (SeaweedFS), then a resume that recomputes nothing.

This is also the suite's end-to-end check of a swept FT x Wanda experiment
(``tests/test_pipeline.TINY_SPEC``); the local-folder store is exercised end to
end by the other kfp.local tests (edit batches, re-compression, component YAMLs).
"""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from shared.planner import build_plan
from shared.spec import parse_spec
from tests.s3server import SeaweedS3
from tests.test_pipeline import TINY_SPEC

BUCKET = "lmcompose-pipeline"


def _objects(env: dict[str, str]) -> dict[str, tuple[str, int]]:
    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
    )
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["ETag"], int(obj["LastModified"].timestamp() * 1e6))
    return out


@pytest.mark.slow
def test_kfp_local_run_through_s3_store_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    import yaml

    from pipelines.cli import main
    from pipelines.local import run_local
    from shared.report import load_results

    with SeaweedS3(tmp_path / "weed", bucket=BUCKET) as server:
        env = server.env()
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_REGION"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        monkeypatch.setenv("LMCOMPOSE_CACHE", str(tmp_path / "cache"))  # the S3 download cache of the tasks
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        uri = f"s3://{BUCKET}/experiments"
        # the compression evaluator only: perplexity through kfp.local is covered by the component-YAML
        # pipeline (tests/test_component_yaml.py), and each task costs seconds of start-up here
        raw = {**TINY_SPEC, "evaluation": {**TINY_SPEC["evaluation"], "evaluators": ["compression"]}}
        spec = parse_spec(raw)
        plan = build_plan(spec)

        report = run_local(spec, uri, tmp_path / "out")
        results = load_results(report / "results.csv")
        assert len(results) == len(plan.compositions) == 8  # base, ft, 2x wanda, 2x ft>wanda, 2x wanda>ft
        by_label = results.set_index("composition")
        assert by_label.loc["base", "sparsity"] == pytest.approx(0.0, abs=1e-6)
        for s in (0.25, 0.5):
            assert by_label.loc[f"wanda(sparsity={s})", "sparsity"] == pytest.approx(s, abs=0.005)
            assert by_label.loc[f"ft > wanda(sparsity={s})", "sparsity"] == pytest.approx(s, abs=0.005)
            assert by_label.loc[f"wanda(sparsity={s}) > ft", "sparsity"] < s  # ft moved pruned weights again
        assert results["avg_bits"].notna().all()
        assert (report / "report.md").is_file()

        first = _objects(env)
        manifests = [k for k in first if k.startswith("experiments/ckpt/") and k.endswith("/manifest.json")]
        results_docs = [k for k in first if k.startswith("experiments/results/")]
        assert len(manifests) == 1 + len(plan.step_nodes)  # base + every distinct step, each committed
        assert len(results_docs) == len(plan.evaluated_nodes) * len(plan.evaluators)

        # `lmcompose plan SPEC --store` marks every step of the finished run as done
        spec_file = tmp_path / "tiny.yaml"
        spec_file.write_text(yaml.safe_dump(raw))
        capsys.readouterr()
        assert main(["plan", str(spec_file), "--store", uri]) == 0
        assert capsys.readouterr().out.count("[done]") == len(plan.nodes)

        # second run of the same spec: nothing is written outside the report and the pointer naming it
        # (counts, not timings)
        run_local(spec, uri, tmp_path / "out2")
        second = _objects(env)
        changed = {k for k in second if k not in first or second[k] != first[k]}
        report_objects = ("experiments/reports/", "experiments/report-pointers/")
        assert {k for k in changed if not k.startswith(report_objects)} == set()
        assert len(second) == len(first)


@pytest.mark.slow
def test_builtin_model_multi_shard_round_trip_through_s3(smollm2_dir: Path, s3_uri: str, tmp_path: Path):
    """The real built-in model, saved as several safetensors shards, survives S3 bit for bit."""
    from shared.models import load_model, model_digest, save_model
    from shared.store import checkpoint_key
    from shared.store_s3 import S3Store

    model, tokenizer = load_model(smollm2_dir)
    save_model(model, tokenizer, tmp_path / "ckpt", max_shard_size="100MB")
    shards = sorted((tmp_path / "ckpt").glob("*.safetensors"))
    assert len(shards) >= 5
    digest = model_digest(model)
    key = checkpoint_key(digest, [])
    manifest = S3Store(s3_uri, cache_dir=tmp_path / "dl-writer").put_checkpoint(key, tmp_path / "ckpt", {"d": digest})
    assert {p.name for p in shards} <= set(manifest["files"])
    # a different reader (empty cache) downloads, verifies and loads the same weights
    folder, read = S3Store(s3_uri, cache_dir=tmp_path / "dl-reader").get_checkpoint(key)
    assert read["files"] == manifest["files"]
    reloaded, _ = load_model(folder)
    assert model_digest(reloaded) == digest

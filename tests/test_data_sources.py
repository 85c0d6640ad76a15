"""Data sources beyond the built-in packs: S3 objects (against a real SeaweedFS server) and lm-eval task names."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import boto3
import pytest

from shared.data import DataConfig, DataError, ExperimentData, resolve_path
from shared.data.sources import harness_tasks
from shared.spec import SpecError, parse_spec
from tests.conftest import BUCKET

SPEC = {"name": "t", "model": "builtin:tiny-random", "interventions": [{"method": "rmu", "params": {"layer": 3}}]}


def _client(env: dict[str, str]):
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def _corpus(*texts: str) -> bytes:
    return "".join(json.dumps({"text": t, "doi": "x"}) + "\n" for t in texts).encode()


@pytest.fixture
def data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMCOMPOSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


# -- syntax, checked without any network ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "source", "message"),
    [
        ("forget_corpus", "lm-eval:wmdp_bio", "only stand for a 4-choice question set"),
        ("forget_mcq", "lm-eval:", "expected lm-eval:task"),
        ("forget_mcq", "lm-eval:wmdp_bio,,wmdp_cyber", "expected lm-eval:task"),
        ("forget_mcq", "lm-eval:wmdp bio", "invalid lm-eval task name"),
        ("forget_mcq", "lm-eval:wmdp_bio,wmdp_bio", "named twice"),
        ("retain_corpus", "s3://bucket", "not an object"),
        ("retain_corpus", "s3://bucket/prefix/", "not an object"),
        ("retain_corpus", "s3://key:secret@bucket/x.jsonl", "credentials come from the environment"),
        ("calibration", "  ", "must be 'builtin'"),
    ],
)
def test_bad_sources_are_named_in_the_spec_error(field: str, source: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as err:
        parse_spec({**SPEC, "data": {field: source}}, check_data=False)
    assert f"data.{field}" in str(err.value)


def test_harness_tasks_and_their_digest() -> None:
    assert harness_tasks("lm-eval:wmdp_bio, wmdp_cyber") == ["wmdp_bio", "wmdp_cyber"]
    data = ExperimentData(DataConfig(forget_mcq="lm-eval:wmdp_bio,wmdp_cyber", utility_mcq="lm-eval:mmlu"))
    assert data.harness_tasks("forget_mcq") == ["wmdp_bio", "wmdp_cyber"]
    assert data.harness_tasks("retain_corpus") is None
    other = ExperimentData(DataConfig(forget_mcq="lm-eval:wmdp_bio"))
    assert data.digest("forget_mcq") != other.digest("forget_mcq")
    assert data.digest("forget_mcq") != data.digest("utility_mcq")
    # the task fields are not files: checking the data skips them, resolving one is an error
    data.config.check_files()
    assert "forget_mcq" not in data.config.paths()
    with pytest.raises(DataError, match="names lm-eval tasks"):
        resolve_path("forget_mcq", "lm-eval:wmdp_bio")


# -- S3 objects, on a real S3 server ---------------------------------------------------------------


def test_s3_corpus_is_downloaded_once_and_follows_a_new_version(
    s3_env: dict[str, str], data_cache: Path
) -> None:
    client = _client(s3_env)
    key = f"corpora-{uuid.uuid4().hex[:8]}/bio-forget.jsonl"
    first = _corpus("Alpha text about the forget domain.", "Beta text.")
    client.put_object(Bucket=BUCKET, Key=key, Body=first)
    uri = f"s3://{BUCKET}/{key}"

    config = DataConfig(forget_corpus=uri)
    config.check_files()  # downloads and validates every row
    data = ExperimentData(config)
    assert data.texts("forget_corpus") == ["Alpha text about the forget domain.", "Beta text."]
    assert data.digest("forget_corpus") == hashlib.sha256(first).hexdigest()
    local = data.path("forget_corpus")
    assert local.is_relative_to(data_cache) and local.read_bytes() == first
    stamp = local.stat().st_mtime_ns
    assert ExperimentData(config).path("forget_corpus") == local and local.stat().st_mtime_ns == stamp  # cached
    assert not [p for p in local.parent.iterdir() if p.name.endswith(".part")]

    second = _corpus("Gamma, a new version of the corpus.")
    client.put_object(Bucket=BUCKET, Key=key, Body=second)
    fresh = ExperimentData(config)
    assert fresh.texts("forget_corpus") == ["Gamma, a new version of the corpus."]
    assert fresh.digest("forget_corpus") == hashlib.sha256(second).hexdigest()
    assert local.read_bytes() == first  # the old version's copy is untouched, the new one sits beside it


def test_s3_errors_name_the_field_and_the_object(s3_env: dict[str, str], data_cache: Path) -> None:
    client = _client(s3_env)
    missing = f"s3://{BUCKET}/nothing-{uuid.uuid4().hex[:8]}.jsonl"
    with pytest.raises(SpecError, match=rf"data: data\.retain_corpus: {missing} does not exist"):
        parse_spec({**SPEC, "data": {"retain_corpus": missing}})
    # compiling for a cluster leaves S3 inputs to the pipeline's steps
    assert parse_spec({**SPEC, "data": {"retain_corpus": missing}}, fetch_remote=False).data.retain_corpus == missing

    key = f"bad-{uuid.uuid4().hex[:8]}.jsonl"
    client.put_object(Bucket=BUCKET, Key=key, Body=b'{"text": "fine"}\n{"title": "no text field"}\n')
    with pytest.raises(SpecError, match=r"bad-.*\.jsonl:2: not a valid TextDoc record"):
        parse_spec({**SPEC, "data": {"forget_corpus": f"s3://{BUCKET}/{key}"}})


def test_s3_without_credentials_is_a_clear_error(
    s3_env: dict[str, str], data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"c-{uuid.uuid4().hex[:8]}.jsonl"
    _client(s3_env).put_object(Bucket=BUCKET, Key=key, Body=_corpus("x"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(DataError) as err:
        ExperimentData(DataConfig(forget_corpus=f"s3://{BUCKET}/{key}")).texts("forget_corpus")
    assert "data.forget_corpus" in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert "wrong-secret-value" not in str(err.value)

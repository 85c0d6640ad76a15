"""Shared fixtures: the real built-in model and the tiny random model, materialized once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.models import BUILTIN_SMOLLM2, BUILTIN_TINY, materialize_base


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

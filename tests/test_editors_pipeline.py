"""Editors as pipeline steps on the tiny model: on compressed parents, and MEMIT's statistics cache in the store.

Each test chains :func:`shared.execution.run_step` calls against a local store,
exactly as the KFP components do (seconds per step on the two-layer random
model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.compression_state import grid_distance, load_state
from shared.data import DataConfig
from shared.evaluation.compression import measure_compression
from shared.execution import prepare_base, run_step
from shared.interventions._memit_stats import COV_CACHE_NAME
from shared.models import block_linear_weights, load_model
from shared.store import open_store

pytestmark = pytest.mark.slow  # a few real pipeline steps per test (10-20 s each)

_CALIB = {"num_calibration_samples": 4, "calibration_seq_len": 32}
WANDA = {"method": "wanda", "params": {"sparsity": 0.5, **_CALIB}}
GPTQ4 = {"method": "gptq", "params": {"bits": 4, "group_size": 64, **_CALIB}}
REPROJECT = {"method": "reproject", "params": {}}
LORA = {"method": "lora", "params": {"steps": 3, "r": 4, "target_r": 2, "lr": 0.01}}
MEMIT = {"method": "memit", "params": {"layers": [0, 1], "v_steps": 5, "stats_tokens": 512, "stats_seq_len": 64}}
#: which weights each editor may change in the two-layer model
EDITED = {"lora": (".self_attn.q_proj", ".self_attn.v_proj"), "memit": (".mlp.down_proj",)}


def _data(**kw) -> str:
    return DataConfig(num_edits=4, **kw).model_dump_json()


def _chain(store: str, steps: list[dict], data: str | None = None) -> list[str]:
    digest, key = prepare_base(store, "builtin:tiny-random")
    keys = [key]
    for i in range(len(steps)):
        keys.append(run_step(store, digest, json.dumps(steps[: i + 1]), data or _data(), keys[-1]))
    return keys


def _load(store: str, key: str):
    folder, manifest = open_store(store).get_checkpoint(key)
    model, _ = load_model(folder)
    return model, manifest["meta"], folder


@pytest.mark.parametrize("editor", [LORA, MEMIT], ids=lambda e: e["method"])
@pytest.mark.parametrize("compressor", [WANDA, GPTQ4], ids=lambda c: c["method"])
def test_editor_on_a_compressed_model_returns_dense_weights_and_reprojects(
    tmp_path: Path, editor: dict, compressor: dict
) -> None:
    store = str(tmp_path / "store")
    _, k_c, k_e, k_re = _chain(store, [compressor, editor, REPROJECT])
    m_c, _, folder_c = _load(store, k_c)
    m_e, meta_e, _ = _load(store, k_e)
    m_re, meta_re, _ = _load(store, k_re)
    state, args = load_state(folder_c)
    w_c, w_e = block_linear_weights(m_c), block_linear_weights(m_e)

    # the editor changed only its own modules, and wrote ordinary dense float weights
    changed = {n for n in w_c if not torch.equal(w_c[n], w_e[n])}
    assert changed and all(n.endswith(EDITED[editor["method"]]) for n in changed), changed
    assert all(w_e[n].dtype == torch.float32 and w_e[n].layout == torch.strided for n in changed)
    assert meta_e["compression"]["modified_after"] is True
    if compressor["method"] == "wanda":
        # pruned weights of the edited modules came back to life (a dense update)
        revived = sum(int(((w_c[n] == 0) & (w_e[n] != 0)).sum()) for n in changed)
        assert revived > 0
        assert measure_compression(m_e, meta_e["compression"])["sparsity"] < 0.5
    else:
        assert grid_distance(m_e, state, args) > 1e-5  # off the 4-bit grid

    # the re-compression policy applies: re-projection restores the mask / the grid
    assert "modified_after" not in meta_re["compression"]
    if compressor["method"] == "wanda":
        assert measure_compression(m_re, meta_re["compression"])["sparsity"] == pytest.approx(0.5, abs=0.01)
    else:
        assert grid_distance(m_re, state, args) < 1e-6


def _cov_entries(store: str) -> int:
    folder = Path(store) / "cache" / COV_CACHE_NAME
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def _statistics(store: str, key: str) -> dict:
    _, manifest = open_store(store).get_checkpoint(key)
    return manifest["meta"]["records"][-1]["record"]["edit"]["statistics"]


def test_memit_statistics_are_cached_by_model_content_in_the_store(tmp_path: Path) -> None:
    """Same model content -> hit (a different edit batch reuses them); after pruning -> miss."""
    store = str(tmp_path / "store")
    digest, base = prepare_base(store, "builtin:tiny-random")
    steps = json.dumps([MEMIT])

    first = run_step(store, digest, steps, _data(), base)
    assert _statistics(store, first)["cache_hit"] is False
    assert _statistics(store, first)["computed_layers"] == [0, 1]
    assert _cov_entries(store) == 2  # one entry per layer

    # another edit batch on the same base model: a new checkpoint, the same statistics
    other = run_step(store, digest, steps, _data(num_batches=2, edit_batch=1), base)
    assert other != first
    assert _statistics(store, other)["cache_hit"] is True
    assert _cov_entries(store) == 2

    # after pruning the model content differs: the statistics are measured again, on the pruned model
    pruned = run_step(store, digest, json.dumps([WANDA]), _data(), base)
    after = run_step(store, digest, json.dumps([WANDA, MEMIT]), _data(), pruned)
    assert _statistics(store, after)["cache_hit"] is False
    assert _cov_entries(store) == 4

    # and a second edit batch on the pruned model hits the pruned model's entries
    again = run_step(store, digest, json.dumps([WANDA, MEMIT]), _data(num_batches=2, edit_batch=1), pruned)
    assert _statistics(store, again)["cache_hit"] is True
    assert _cov_entries(store) == 4

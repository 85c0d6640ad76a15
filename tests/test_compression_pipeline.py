"""Compressors in the pipeline: re-compression policies end to end, state carried through the store, export.

The step-level tests run :func:`shared.execution.run_step` against a local
store on the tiny random model (seconds); one slow test runs a whole
FT x GPTQ experiment with re-compression through ``kfp.local``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.compression_state import STATE_FILE, grid_distance, load_state, mask_layers
from shared.data import DataConfig, ExperimentData
from shared.evaluation.compression import measure_compression
from shared.execution import prepare_base, run_step
from shared.export import export_compressed
from shared.models import block_linear_weights, load_model
from shared.store import open_store

_CALIB = {"num_calibration_samples": 4, "calibration_seq_len": 32}
FT = {"method": "ft", "params": {"steps": 3, "layers": [0, 1], "lr": 0.01}}
GPTQ4 = {"method": "gptq", "params": {"bits": 4, "group_size": 64, **_CALIB}}
WANDA = {"method": "wanda", "params": {"sparsity": 0.5, **_CALIB}}
REPROJECT = {"method": "reproject", "params": {}}
DATA = json.dumps(DataConfig(num_edits=4).model_dump(mode="json"))


def _chain(store_uri: str, steps: list[dict]) -> list[str]:
    """Run ``steps`` one after another from the tiny base model; return every checkpoint key."""
    digest, key = prepare_base(store_uri, "builtin:tiny-random")
    keys = [key]
    for i in range(len(steps)):
        keys.append(run_step(store_uri, digest, json.dumps(steps[: i + 1]), DATA, keys[-1]))
    return keys


def _checkpoint(store_uri: str, key: str):
    folder, manifest = open_store(store_uri).get_checkpoint(key)
    model, _ = load_model(folder)
    tensors, args = load_state(folder)
    return folder, manifest["meta"], model, tensors, args


def test_gptq_ft_reproject_restores_the_recorded_grid(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    _, k_q, k_ft, k_re = _chain(store, [GPTQ4, FT, REPROJECT])

    _, meta_q, m_q, state_q, args = _checkpoint(store, k_q)
    assert meta_q["compression"]["method"] == "gptq" and meta_q["compression"]["bits"] == 4
    assert grid_distance(m_q, state_q, args) < 1e-6
    assert measure_compression(m_q, meta_q["compression"])["avg_bits"] == pytest.approx(4 + 32 / 64)

    # the edit moves weights off the grid; the state is carried along unchanged for a later re-projection
    folder_ft, meta_ft, m_ft, state_ft, _ = _checkpoint(store, k_ft)
    assert (folder_ft / STATE_FILE).is_file()
    assert all(torch.equal(state_ft[k], state_q[k]) for k in state_q)
    assert meta_ft["compression"]["modified_after"] is True
    assert grid_distance(m_ft, state_ft, args) > 1e-4
    # off-grid weights are not stored at 4 bits: measured as an uncompressed (possibly sparse) model
    off_grid = measure_compression(m_ft, meta_ft["compression"])["avg_bits"]
    assert off_grid == measure_compression(m_ft)["avg_bits"] and off_grid > 8

    _, meta_re, m_re, state_re, _ = _checkpoint(store, k_re)
    assert grid_distance(m_re, state_re, args) < 1e-6
    assert "modified_after" not in meta_re["compression"]
    assert measure_compression(m_re, meta_re["compression"])["avg_bits"] == pytest.approx(4.5)
    # only the layers ft touched (down_proj of layers 0, 1) moved, and they moved back near their grid values
    moved = {n for n, w in block_linear_weights(m_re).items() if not torch.equal(w, block_linear_weights(m_q)[n])}
    assert moved and all(".mlp.down_proj" in n and n.split(".")[2] in ("0", "1") for n in moved)


def test_wanda_ft_reproject_restores_the_mask_and_reapply_prunes_again(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    _, k_w, k_ft, k_re = _chain(store, [WANDA, FT, REPROJECT])
    _, _, m_w, state_w, _ = _checkpoint(store, k_w)
    _, _, m_ft, _, _ = _checkpoint(store, k_ft)
    _, _, m_re, _, _ = _checkpoint(store, k_re)
    zeros = lambda m: {n: (w == 0) for n, w in block_linear_weights(m).items()}  # noqa: E731
    assert sorted(mask_layers(state_w)) == sorted(zeros(m_w))
    assert sum(int(z.sum()) for z in zeros(m_ft).values()) < sum(int(z.sum()) for z in zeros(m_w).values())
    for name, z in zeros(m_re).items():
        assert torch.equal(z | zeros(m_w)[name], z), name  # every weight pruned by wanda is zero again

    # 'reapply' (the paper's policy): wanda runs again on the edited model, same exact sparsity
    k_again = run_step(store, open_store(store).get_checkpoint(k_ft)[1]["meta"]["base_digest"],
                       json.dumps([WANDA, FT, WANDA]), DATA, k_ft)
    _, meta_again, m_again, _, _ = _checkpoint(store, k_again)
    assert meta_again["compression"]["method"] == "wanda"
    assert measure_compression(m_again)["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_pruned_then_quantized_state_holds_mask_and_grid(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    _, _, k_wq, k_re = _chain(store, [WANDA, GPTQ4, REPROJECT])
    _, meta, model, state, args = _checkpoint(store, k_wq)
    assert mask_layers(state) and grid_distance(model, state, args) < 1e-6
    assert meta["compression"]["method"] == "gptq" and meta["compression"]["previous"]["method"] == "wanda"
    # GPTQ's error feedback updates not-yet-quantized columns, pruned zeros included:
    # it revives some pruned weights (a measured interaction, not a bug of ours)
    sparsity = measure_compression(model, meta["compression"])["sparsity"]
    assert 0.3 < sparsity < 0.5
    # re-projection restores both: the mask, then the grid (zero is on an asymmetric integer grid)
    _, _, m_re, _, _ = _checkpoint(store, k_re)
    assert measure_compression(m_re)["sparsity"] >= 0.5 - 0.005
    assert grid_distance(m_re, state, args) < 1e-6


def test_reproject_without_compression_state_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="records no compression state"):
        _chain(str(tmp_path / "store"), [FT, REPROJECT])


def test_export_packs_a_gptq_checkpoint_that_plain_transformers_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    store = str(tmp_path / "store")
    _, k_q, k_ft = _chain(store, [GPTQ4, FT])
    folder, _ = open_store(store).get_checkpoint(k_q)
    facts = export_compressed(folder, tmp_path / "packed")
    assert facts["format"] == "pack-quantized" and facts["packed_layers"] == len(block_linear_weights(load_model(folder)[0]))
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    # the packed file stores int32 words, not the float weights
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "packed").glob("*.safetensors"))), framework="pt") as f:
        keys = set(f.keys())
    assert any(k.endswith("q_proj.weight_packed") for k in keys) and not any(k.endswith("q_proj.weight") for k in keys)
    packed = AutoModelForCausalLM.from_pretrained(str(tmp_path / "packed"))
    dense, _ = load_model(folder)
    x = torch.tensor([[1, 5, 9, 200, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(packed(x).logits, dense(x).logits, atol=1e-4)
    # an edited (off-grid) checkpoint is refused rather than silently re-rounded
    folder_ft, _ = open_store(store).get_checkpoint(k_ft)
    with pytest.raises(ValueError, match="away from their recorded quantization grid"):
        export_compressed(folder_ft, tmp_path / "refused")


@pytest.mark.slow
def test_kfp_local_ft_x_gptq_with_reapply(tmp_path: Path) -> None:
    from pipelines.local import run_local
    from shared.report import load_results
    from shared.spec import parse_spec

    spec = parse_spec({
        "name": "tiny-ft-x-gptq",
        "model": "builtin:tiny-random",
        "interventions": [
            {"method": "ft", "params": {"steps": 2, "layers": [0, 1]}},
            {"method": "gptq", "params": {"group_size": 64, **_CALIB}, "sweep": {"bits": [4, 8]}},
        ],
        # edit: a bounded criterion, so the report has composability metrics for the pair
        "evaluation": {"evaluators": ["edit", "compression"], "batch_size": 4},
        "data": {"num_edits": 4},
    })
    store = str(tmp_path / "store")
    report_dir = run_local(spec, store, tmp_path / "out")
    results = load_results(report_dir / "results.csv").set_index("composition")
    for bits in (4, 8):
        label = f"gptq(bits={bits}) > ft (re-compressed: gptq)"
        assert results.loc[label, "recompress"] == "gptq"
        assert results.loc[label, "n_steps"] == 2 and results.loc[label, "methods"] == "gptq>ft"
        assert results.loc[label, "avg_bits"] == pytest.approx(bits + 0.5)
        assert results.loc[f"ft > gptq(bits={bits})", "avg_bits"] == pytest.approx(bits + 0.5)
        # the evaluated checkpoint is on its (new) grid
        _, _, model, state, args = _checkpoint(store, results.loc[label, "model_key"])
        assert grid_distance(model, state, args) < 1e-6
    import pandas as pd

    comp = pd.read_csv(report_dir / "composability.csv")
    edit = comp[(comp["pair"] == "ft+gptq") & (comp["criterion"] == "edit_success")]
    assert sorted(edit["sweep_value"]) == [4.0, 8.0]
    # the metrics compare ft > gptq with gptq > ft (re-compressed), the row of each order named
    assert edit["composition_second_then_first"].str.endswith("(re-compressed: gptq)").all()
    assert edit["order_sensitivity"].notna().all() and edit["order_free_error"].notna().all()

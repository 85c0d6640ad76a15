"""Tests of the lora (LoRA / AdaLoRA knowledge editing) intervention.

Fast tests run on the tiny random Llama (4 layers, hidden size 64); the
``slow`` test runs on the real built-in SmolLM2-135M.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest
import torch

from shared.data import DataConfig, ExperimentData
from shared.interventions import Category, available, get_intervention
from shared.interventions.ft import build_edit_batch, target_loss
from shared.interventions.lora import LoRAParams, adapted_module_names
from shared.models import load_model
from tests.conftest import utility_and_perplexity

FAST = {"steps": 8, "lr": 1e-2}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    after = model.state_dict()
    assert set(after) == set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def _assert_no_peft(model: torch.nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert not any("lora" in n for n, _ in model.named_modules())
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    assert "peft_config" not in vars(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- registry and params


def test_registry_metadata_and_defaults() -> None:
    lora = available()["lora"]
    assert get_intervention("lora") is lora
    assert (lora.name, lora.category, lora.sweep_axis, lora.needs_calibration, lora.data_inputs) == (
        "lora",
        Category.EDIT,
        "steps",
        False,
        ("edits",),
    )
    assert lora.params_model is LoRAParams
    assert lora.sweep_axis in lora.params_model.model_fields
    p = lora.parse_params(None)
    # the paper's setting (AdaLoRA on q/v, 70 steps, alpha 32) with lr scaled for the 135M model
    assert (p.variant, p.target_modules, p.layers, p.steps, p.lr, p.alpha) == (
        "adalora",
        ["q_proj", "v_proj"],
        None,
        70,
        1e-3,
        32.0,
    )
    assert p.target_r < p.r
    json.dumps(p.model_dump())
    assert all(f.description for f in LoRAParams.model_fields.values())


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"variant": "dora"}, "variant"),
        ({"r": 0}, "r"),
        ({"variant": "adalora", "r": 8, "target_r": 8}, "target_r"),
        ({"variant": "adalora", "r": 4, "target_r": 6}, "target_r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj", "q_proj"]}, "target_modules"),
        ({"target_modules": ["self_attn.q_proj"]}, "target_modules"),
        ({"target_modules": [".*proj"]}, "target_modules"),
        ({"layers": []}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({"steps": 0}, "steps"),
        ({"lr": 0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"rank": 8}, "rank"),
    ],
)
def test_params_rejected(raw: dict, field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        get_intervention("lora").parse_params(raw)
    assert field in str(err.value)


def test_params_accepted() -> None:
    lora = get_intervention("lora")
    p = lora.parse_params({"variant": "lora", "r": 4, "target_r": 8, "layers": [3, 1], "target_modules": ["v_proj", "o_proj"]})
    # plain LoRA ignores target_r; lists are normalized (sorted) so equal settings get equal keys
    assert (p.variant, p.r, p.layers, p.target_modules) == ("lora", 4, [1, 3], ["o_proj", "v_proj"])


def test_rejects_bad_layers_and_modules_on_the_model(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    lora = get_intervention("lora")
    data = ExperimentData(DataConfig(num_edits=1))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        lora.apply(model, tok, lora.parse_params({"layers": [99]}), data)
    with pytest.raises(ValueError, match="target_modules.*w_proj"):
        lora.apply(model, tok, lora.parse_params({"target_modules": ["w_proj"]}), data)
    assert _changed(before, model) == set()
    assert adapted_module_names(model, ["q_proj", "v_proj"], [1]) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


# ---------------------------------------------------------------- training on the tiny model


@pytest.mark.parametrize("variant", ["lora", "adalora"])
def test_changes_only_target_modules_and_lowers_loss(tiny_dir: Path, tmp_path: Path, variant: str) -> None:
    model, tok = load_model(tiny_dir)
    data = ExperimentData(DataConfig(num_edits=4))
    lora = get_intervention("lora")
    params = lora.parse_params({"variant": variant, "layers": [1, 2], **FAST})
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = {n: type(m) for n, m in model.named_modules()}
    config = model.config.to_dict()
    batch = build_edit_batch(tok, data.edits)
    with torch.no_grad():
        loss_before = float(target_loss(model, batch))

    record = lora.apply(model, tok, params, data)

    json.dumps(record)
    edit = record["edit"]
    assert (edit["method"], edit["variant"], edit["num_edits"]) == ("lora", variant, 4)
    assert edit["adapted_modules"] == 4 and edit["trainable_params"] > 0
    assert record["seconds"] >= 0
    # only q/v of the chosen layers changed (for AdaLoRA a matrix whose whole rank
    # budget was pruned away may stay as it was)
    allowed = {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (1, 2) for m in ("q", "v")}
    changed = _changed(before, model)
    assert changed <= allowed
    assert len(changed) >= (4 if variant == "lora" else 2)
    with torch.no_grad():
        loss_after = float(target_loss(model, batch))
    assert edit["initial_loss"] == pytest.approx(loss_before, rel=1e-5)
    assert loss_after < loss_before
    assert edit["final_loss"] == pytest.approx(loss_after, rel=1e-5)
    # the same object, with its own modules, flags and config: no peft left
    _assert_no_peft(model)
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.config.to_dict() == config
    assert not model.training
    # save_pretrained writes plain weights under the original names
    from safetensors.torch import load_file

    model.save_pretrained(str(tmp_path / "saved"))
    tok.save_pretrained(str(tmp_path / "saved"))
    saved = {}
    for f in sorted((tmp_path / "saved").glob("*.safetensors")):
        saved.update(load_file(str(f)))
    state = model.state_dict()
    assert set(saved) <= set(before) and not any("lora" in k or "base_layer" in k for k in saved)
    for k, v in saved.items():
        assert torch.equal(v, state[k]), k
    reloaded, _ = load_model(tmp_path / "saved")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_all_layers_by_default_and_other_target_modules(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    lora = get_intervention("lora")
    before = _snapshot(model)
    record = lora.apply(
        model, tok, lora.parse_params({"variant": "lora", "target_modules": ["down_proj"], **FAST}),
        ExperimentData(DataConfig(num_edits=2)),
    )
    n_layers = len(model.model.layers)
    assert record["edit"]["adapted_modules"] == n_layers
    assert _changed(before, model) == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(n_layers)}


@pytest.mark.parametrize("variant", ["lora", "adalora"])
def test_deterministic_given_seed(tiny_dir: Path, variant: str) -> None:
    lora = get_intervention("lora")
    data = ExperimentData(DataConfig(num_edits=2))
    states, records = [], []
    for seed in (0, 0, 1):
        model, tok = load_model(tiny_dir)
        # dropout on: the seed must also fix the dropout masks
        params = lora.parse_params({"variant": variant, "seed": seed, "dropout": 0.1, "layers": [0, 3], **FAST})
        torch.manual_seed(1234 + seed)  # the global RNG state must not matter
        records.append(lora.apply(model, tok, params, data)["edit"])
        states.append(_snapshot(model))
    assert records[0] == records[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_adalora_runs_the_rank_allocator(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.adalora import AdaLoraModel

    calls: list[tuple[int, int | None]] = []
    original = AdaLoraModel.update_and_allocate

    def spy(self: AdaLoraModel, global_step: int) -> None:
        calls.append((global_step, self.peft_config["default"].total_step))
        original(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    model, tok = load_model(tiny_dir)
    lora = get_intervention("lora")
    params = lora.parse_params({"variant": "adalora", "r": 6, "target_r": 2, "layers": [1, 2], **FAST})
    record = lora.apply(model, tok, params, ExperimentData(DataConfig(num_edits=2)))
    # called once per step, after the optimizer step, with total_step = steps
    assert calls == [(s, params.steps) for s in range(params.steps)]
    # the budget shrank from r to target_r per matrix on average
    assert record["edit"]["kept_rank"] == params.target_r * record["edit"]["adapted_modules"]
    _assert_no_peft(model)


def test_plain_lora_does_not_allocate(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.adalora import AdaLoraModel

    def fail(self: AdaLoraModel, global_step: int) -> None:  # pragma: no cover - must not run
        raise AssertionError("plain LoRA must not call the AdaLoRA allocator")

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", fail)
    model, tok = load_model(tiny_dir)
    lora = get_intervention("lora")
    record = lora.apply(model, tok, lora.parse_params({"variant": "lora", "layers": [0], **FAST}),
                        ExperimentData(DataConfig(num_edits=1)))
    assert record["edit"]["kept_rank"] is None


def test_failure_leaves_model_untouched(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.interventions.lora as lora_module

    model, tok = load_model(tiny_dir)
    before = _snapshot(model)
    modules = {n: type(m) for n, m in model.named_modules()}
    calls = 0

    def broken(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise RuntimeError("boom")
        return target_loss(m, batch)

    monkeypatch.setattr(lora_module, "target_loss", broken)
    lora = get_intervention("lora")
    with pytest.raises(RuntimeError, match="boom"):
        lora.apply(model, tok, lora.parse_params({"variant": "lora", **FAST}), ExperimentData(DataConfig(num_edits=1)))
    _assert_no_peft(model)
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert _changed(before, model) == set()
    assert all(p.requires_grad for p in model.parameters())


def test_pruned_model_comes_back_dense(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    q = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q[:, ::2] = 0.0
    lora = get_intervention("lora")
    lora.apply(model, tok, lora.parse_params({"variant": "lora", "layers": [0], **FAST}),
               ExperimentData(DataConfig(num_edits=2)))
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.float32 and not w.is_sparse
    assert float((w == 0).float().mean()) < 0.1  # the merged update is dense


# ---------------------------------------------------------------- slow: the real built-in model


@pytest.mark.slow
def test_lora_edit_success_smollm2(smollm2_dir: Path, smollm2_quality: dict) -> None:
    from shared.evaluation.edit import evaluate_edits

    model, tok = load_model(smollm2_dir)
    data = ExperimentData(DataConfig(num_edits=10))
    lora = get_intervention("lora")
    before = evaluate_edits(model, tok, data.edits, batch_size=16)
    record = lora.apply(model, tok, lora.parse_params(None), data)
    after = evaluate_edits(model, tok, data.edits, batch_size=16)
    edit = record["edit"]
    assert edit["variant"] == "adalora"
    assert edit["final_loss"] < edit["initial_loss"]
    assert before["edit_success"] < 0.5
    assert after["edit_success"] >= 0.9, (before, after, record)
    # collateral damage stays within the bounds measured for this editor (docs/editing.md)
    quality = utility_and_perplexity(model, tok)
    assert quality["utility_acc"] >= smollm2_quality["utility_acc"] - 0.08, (smollm2_quality, quality)
    assert quality["perplexity"] <= smollm2_quality["perplexity"] * 1.1, (smollm2_quality, quality)
    _assert_no_peft(model)

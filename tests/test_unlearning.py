"""Unlearning methods (GA, GD, RMU): parameters, batches, and the mechanism on the tiny random model."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import torch

from shared.data import ExperimentData
from shared.interventions import Category, get_intervention
from shared.interventions._unlearning import lm_loss, text_batches
from shared.interventions.rmu import RMUParams, control_vector, layer_output, rmu_optimizer
from shared.models import load_model
from tests.conftest import utility_and_perplexity

GA_FAST = {"steps": 4, "lr": 1e-3, "seq_len": 64}
RMU_FAST = {"layer": 2, "num_batches": 4, "lr": 1e-3, "seq_len": 64}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_registry_metadata() -> None:
    for name, inputs in (("ga", {"forget_corpus"}), ("gd", {"forget_corpus", "retain_corpus"}),
                         ("rmu", {"forget_corpus", "retain_corpus"})):
        method = get_intervention(name)
        assert method.category is Category.UNLEARN
        assert set(method.data_inputs) == inputs
        assert method.sweep_axis in method.params_model.model_fields
        assert all(f.description for f in method.params_model.model_fields.values()), name


@pytest.mark.parametrize(
    ("name", "raw", "field"),
    [
        ("ga", {"layers": [3, 3]}, "layers"),
        ("ga", {"lr": 0}, "lr"),
        ("gd", {"retain_weight": 0}, "retain_weight"),
        ("rmu", {"layer": 1}, "layer"),
        ("rmu", {"mlp_modules": ["o_proj"]}, "mlp_modules"),
        ("rmu", {"alpha": -1}, "alpha"),
    ],
)
def test_bad_params_name_the_field(name: str, raw: dict, field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as exc:
        get_intervention(name).parse_params(raw)
    assert field in str(exc.value)


def test_text_batches_mask_padding_and_truncate(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    texts = ExperimentData().texts("forget_corpus")
    batches = text_batches(tok, texts, batch_size=4, seq_len=48, num_batches=3, seed=0)
    assert len(batches) == 3
    for b in batches:
        assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] <= 48
        assert torch.equal(b["labels"] == -100, b["attention_mask"] == 0)
    assert text_batches(tok, texts, 4, 48, 3, 0)[2]["input_ids"].tolist() == batches[2]["input_ids"].tolist()
    # the masked loss of a padded row equals the loss of the row alone
    b = batches[0]
    short = int(b["attention_mask"].sum(1).argmin())
    n = int(b["attention_mask"][short].sum())
    alone = {k: v[short : short + 1, :n] for k, v in b.items()}
    padded = {k: v[short : short + 1] for k, v in b.items()}
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(model, padded), lm_loss(model, alone), rtol=1e-4, atol=1e-5)


def test_ga_raises_forget_loss_and_trains_only_the_upper_half(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    before = _snapshot(model)
    ga = get_intervention("ga")
    record = ga.apply(model, tok, ga.parse_params(GA_FAST), ExperimentData())["unlearn"]
    assert record["forget_loss_after"] > record["forget_loss_before"]
    n = len(model.model.layers)
    assert record["layers"] == list(range(n // 2, n))
    changed = _changed(before, model)
    assert changed and all(k.startswith(tuple(f"model.layers.{i}." for i in range(n // 2, n))) or k == "model.norm.weight"
                           for k in changed), changed
    assert "model.embed_tokens.weight" not in changed
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_rmu_optimizer_has_the_references_settings() -> None:
    weight = torch.nn.Parameter(torch.zeros(3))
    from shared.interventions._optim import TransformersAdamW

    group = rmu_optimizer([weight], RMUParams()).param_groups[0]
    assert isinstance(rmu_optimizer([weight], RMUParams()), TransformersAdamW)  # the reference's update rule
    assert group["eps"] == 1e-6 and group["weight_decay"] == 0.0 and group["lr"] == RMUParams().lr
    custom = rmu_optimizer([weight], RMUParams(adam_rule="torch", adam_eps=1e-8, weight_decay=0.01))
    assert isinstance(custom, torch.optim.AdamW)
    assert custom.param_groups[0]["eps"] == 1e-8 and custom.param_groups[0]["weight_decay"] == 0.01


def test_ga_accumulates_gradients_over_grad_accum_batches(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.interventions.ga as ga_module

    ga = get_intervention("ga")
    assert ga.parse_params({}).grad_accum == 2  # the reference's setting
    params = ga.parse_params({**GA_FAST, "steps": 1, "layers": [3], "train_final_norm": False})
    seen: list[int] = []
    real_loss = ga_module.lm_loss

    def spy(model, batch, cap=None):
        seen.append(id(batch))
        return real_loss(model, batch, cap=cap)

    import shared.interventions._unlearning as loop_module

    monkeypatch.setattr(ga_module, "lm_loss", spy)  # the ascent loss of each batch
    monkeypatch.setattr(loop_module, "lm_loss", spy)  # the before / after losses of the shared loop
    model, tok = load_model(tiny_dir)
    reference, _ = load_model(tiny_dir)
    ga.apply(model, tok, params, ExperimentData())
    # forget[0] before, then two batches for the one step, then forget[0] after
    assert len(seen) == 4 and seen[0] == seen[-1] and len(set(seen[1:3])) == 2

    # the same step by hand: one Adam step on the mean of the two batches' ascent losses
    batches = text_batches(tok, ExperimentData().texts("forget_corpus"), params.batch_size, params.seq_len, 2, params.seed)
    trained = [p for n, p in reference.named_parameters() if n.startswith("model.layers.3.")]
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=params.lr)
    ((-real_loss(reference, batches[0]) - real_loss(reference, batches[1])) / 2).backward()
    optimizer.step()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_gd_descends_the_retain_loss_while_ascending_the_forget_loss(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    gd = get_intervention("gd")
    params = {**GA_FAST, "retain_weight": 5.0, "layers": [0, 1, 2, 3], "forget_loss_cap": None}
    record = gd.apply(model, tok, gd.parse_params(params), ExperimentData())["unlearn"]
    assert record["retain_loss_after"] < record["retain_loss_before"]
    assert record["forget_loss_after"] - record["forget_loss_before"] > (
        record["retain_loss_after"] - record["retain_loss_before"]
    )


def test_rmu_aligns_forget_activations_with_the_control_vector_and_touches_only_its_mlps(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    before = _snapshot(model)
    rmu = get_intervention("rmu")
    params = rmu.parse_params({**RMU_FAST, "steering_coeff": 5.0, "num_batches": 20, "lr": 1e-2, "alpha": 1.0})
    record = rmu.apply(model, tok, params, ExperimentData())["unlearn"]
    assert record["control_alignment_after"] > record["control_alignment_before"] + 0.1
    assert record["forget_loss_last"] < record["forget_loss_first"]
    assert record["retain_loss_first"] == pytest.approx(0.0, abs=1e-9)  # the frozen copy starts equal
    assert _changed(before, model) == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)}
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_rmu_frozen_override_reproduces_the_original_activations(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    batch = text_batches(tok, ExperimentData().texts("retain_corpus"), 2, 32, 1, 0)[0]
    with torch.no_grad():
        original = layer_output(model, 2, batch).clone()
        w = model.model.layers[1].mlp.down_proj.weight
        saved = w.clone()
        w.add_(0.1)
        moved = layer_output(model, 2, batch)
        frozen = layer_output(model, 2, batch, overrides={"layers.1.mlp.down_proj.weight": saved})
    assert not torch.allclose(moved, original)
    torch.testing.assert_close(frozen, original)
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight, saved)  # the override left the model alone


def test_control_vector_is_seeded_unit_norm() -> None:
    u = control_vector(64, 0)
    assert u.norm() == pytest.approx(1.0)
    assert torch.equal(u, control_vector(64, 0)) and not torch.equal(u, control_vector(64, 1))


@pytest.mark.parametrize("name", ["ga", "gd", "rmu"])
def test_deterministic_and_layer_range_checked(tiny_dir: Path, name: str) -> None:
    method = get_intervention(name)
    fast = RMU_FAST if name == "rmu" else GA_FAST
    weights = []
    for _ in range(2):
        model, tok = load_model(tiny_dir)
        method.apply(model, tok, method.parse_params(fast), ExperimentData())
        weights.append(_snapshot(model))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    model, tok = load_model(tiny_dir)
    bad = {**fast, "layer": 40} if name == "rmu" else {**fast, "layers": [40]}
    with pytest.raises(ValueError, match="out of range"):
        method.apply(model, tok, method.parse_params(bad), ExperimentData())


# ---------------------------------------------------------------- slow: the real built-in model


def test_forget_loss_cap_stops_the_ascent_per_token(tiny_dir: Path) -> None:
    """Tokens past the cap give no gradient: far above every loss the cap changes nothing, below all it freezes."""
    model, tok = load_model(tiny_dir)
    batch = text_batches(tok, ExperimentData().texts("forget_corpus"), 2, 32, 1, 0)[0]
    with torch.no_grad():
        plain = lm_loss(model, batch)
        torch.testing.assert_close(lm_loss(model, batch, cap=1e3), plain)
        assert float(lm_loss(model, batch, cap=1e-3)) == pytest.approx(1e-3)
    loss = lm_loss(model, batch, cap=1e-3)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.zero_grad(set_to_none=True)

    before = _snapshot(model)
    ga = get_intervention("ga")
    record = ga.apply(model, tok, ga.parse_params({**GA_FAST, "forget_loss_cap": 1e-3}), ExperimentData())["unlearn"]
    assert not _changed(before, model)  # every token is past the cap: nothing to ascend
    assert record["forget_loss_after"] == pytest.approx(record["forget_loss_before"])
    assert get_intervention("gd").parse_params(None).forget_loss_cap == 6.0
    assert ga.parse_params(None).forget_loss_cap is None  # GA stays the paper's plain ascent


@pytest.mark.slow
def test_rmu_unlearns_the_forget_domain_of_smollm2(smollm2_dir: Path, smollm2_quality: dict) -> None:
    """Forget accuracy at least 15 points closer to chance (25 %), utility down by at most 5 points."""
    from shared.evaluation import EvalOptions, get_evaluator

    model, tok = load_model(smollm2_dir)
    data = ExperimentData()
    forget = get_evaluator("forget")
    before = forget(model, tok, data, EvalOptions())["forget_acc"]
    rmu = get_intervention("rmu")
    record = rmu.apply(model, tok, rmu.parse_params(None), data)["unlearn"]
    after = forget(model, tok, data, EvalOptions())["forget_acc"]
    quality = utility_and_perplexity(model, tok)
    print("rmu smollm2:", before, after, quality, record)
    assert record["control_alignment_after"] > 0.5  # the forget activations point along the control vector
    assert (before - 0.25) - (after - 0.25) >= 0.15, (before, after)
    assert quality["utility_acc"] >= smollm2_quality["utility_acc"] - 0.05, (smollm2_quality, quality)

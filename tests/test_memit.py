"""Tests of the MEMIT editor (shared/interventions/memit.py) and its key statistics cache.

Fast tests run on the tiny random Llama (4 layers, hidden 64, MLP 128); the
``slow`` test edits the real built-in SmolLM2-135M.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest
import torch

from shared.cache import cached_tensors
from shared.data import DataConfig, ExperimentData
from shared.interventions import Category, get_intervention
from shared.interventions._memit_stats import (
    COV_CACHE_NAME,
    cached_key_second_moments,
    key_second_moments,
    model_tensor_cache,
)
from shared.interventions.memit import (
    essence_kl,
    MEMIT,
    _pad_id,
    _Row,
    _Rows,
    edit_sites,
    memit_update,
    stats_windows,
    subject_last_token,
)
from shared.models import load_model, model_digest
from shared.store import LocalStore
from tests.conftest import utility_and_perplexity

#: fast settings for the tiny model
_FAST = {"v_steps": 5, "stats_tokens": 512, "stats_seq_len": 64}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- registry and params


def test_registry_metadata() -> None:
    memit = get_intervention("memit")
    assert isinstance(memit, MEMIT)
    assert memit.category is Category.EDIT
    assert memit.uses_tensor_cache is True
    assert set(memit.data_inputs) == {"edits", "retain_corpus"}
    assert memit.sweep_axis is None or memit.sweep_axis in memit.params_model.model_fields
    defaults = memit.parse_params(None)
    json.dumps(defaults.model_dump(mode="json"))
    assert defaults.layers == [3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"layers": [-1]}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": [2, 2]}, "layers"),
        ({"v_steps": 0}, "v_steps"),
        ({"v_lr": -1.0}, "v_lr"),
        ({"clamp_norm_factor": 0}, "clamp_norm_factor"),
        ({"kl_factor": -0.1}, "kl_factor"),
        ({"mom2_update_weight": 0}, "mom2_update_weight"),
        ({"stats_tokens": 10}, "stats_tokens"),
        ({"kl_template": "no slot"}, "kl_template"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_params_rejected(raw: dict, field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        get_intervention("memit").parse_params(raw)
    assert field in str(err.value)


def test_params_accepted() -> None:
    p = get_intervention("memit").parse_params({"layers": [5, 3]})
    assert p.layers == [3, 5]


# ---------------------------------------------------------------- edit positions and the cached forward


def test_subject_last_token(tiny_dir: Path) -> None:
    _, tok = load_model(tiny_dir)
    text = "Question: In which city is the Eiffel Tower located?\nAnswer:"
    ids, idx, found = subject_last_token(tok, text, "Eiffel Tower")
    assert found and ids == tok(text)["input_ids"]
    assert tok.decode(ids[: idx + 1]).endswith("Eiffel Tower")
    assert not tok.decode(ids[: idx]).endswith("Eiffel Tower")
    # case-insensitive fallback, then the last token when the subject is absent
    _, idx2, found2 = subject_last_token(tok, text, "eiffel tower")
    assert found2 and idx2 == idx
    ids3, idx3, found3 = subject_last_token(tok, text, "Big Ben")
    assert not found3 and idx3 == len(ids3) - 1


def test_edit_sites_use_the_evaluator_prompt(tiny_dir: Path) -> None:
    from shared.evaluation.edit import encode_edit_example

    _, tok = load_model(tiny_dir)
    edits = ExperimentData(DataConfig(num_edits=5)).edits
    for e, s in zip(edits, edit_sites(tok, edits, "{} is a"), strict=True):
        assert (s.prompt_ids, s.target_ids) == encode_edit_example(tok, e.src, e.alt)
        assert s.subject_found
        assert tok.decode(s.prompt_ids[: s.lookup + 1]).endswith(e.subject)
        assert tok.decode(s.kl_ids[: s.kl_lookup + 1]).endswith(e.subject)


def test_cached_prefix_forward_matches_full_forward(tiny_dir: Path) -> None:
    """The target optimization's forward (KV-cached prefixes, whole rows where a prefix is empty) is the plain forward."""
    model, tok = load_model(tiny_dir)
    sites = edit_sites(tok, ExperimentData(DataConfig(num_edits=4)).edits, "{} is a")
    rows = [_Row(s.prompt_ids[: s.lookup], s.prompt_ids[s.lookup :] + s.target_ids, i) for i, s in enumerate(sites)]
    rows.append(_Row([], sites[0].kl_ids, 0))  # an empty prefix: run uncached
    picks = [(r, o) for r, row in enumerate(rows) for o in range(len(row.suffix))]
    batches = _Rows(model, rows, picks, _pad_id(tok))
    assert [g[0].cache is not None for g in batches.groups] == [True, False]
    with torch.no_grad():
        first, second = batches.run(), batches.run()  # the cache is reusable
        expected = []
        for row in rows:
            full = model.model(input_ids=torch.tensor([row.prefix + row.suffix])).last_hidden_state[0]
            expected.append(full[len(row.prefix) :])
        expected = torch.cat(expected)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the closed form


def test_essence_kl_is_the_references_direction_on_a_hand_case() -> None:
    # two positions over a 2-token vocabulary
    edited = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    original = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    kl = essence_kl(edited.log(), original.log())
    # KL(edited || original) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.510826; identical rows -> 0
    assert kl.tolist() == pytest.approx([0.5 * (torch.tensor(5 / 9).log() + torch.tensor(5.0).log()).item(), 0.0], abs=1e-6)
    assert kl[0].item() == pytest.approx(0.510826, abs=1e-5)
    # the other direction, KL(original || edited) = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.368064, is not it
    assert kl[0].item() != pytest.approx(0.368064, abs=1e-3)
    # gradient flows into the edited distribution only (the original is a constant target)
    logits = torch.tensor([[0.0, 0.0]], requires_grad=True)
    essence_kl(torch.log_softmax(logits, -1), original[:1].log()).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_memit_update_closed_form() -> None:
    torch.manual_seed(0)
    d_in, d_out, n = 32, 16, 5
    a = torch.randn(d_in, 4 * d_in)
    cov = a @ a.T / a.shape[1]
    keys = torch.randn(n, d_in)
    resid = torch.randn(n, d_out)
    # the formula, written out
    for lam in (1e-6, 1.0, 100.0):
        upd = memit_update(keys, resid, cov, lam)
        k = keys.double().T
        explicit = resid.double().T @ k.T @ torch.linalg.inv(lam * cov.double() + k @ k.T)
        torch.testing.assert_close(upd, explicit, atol=1e-8, rtol=1e-6)
    # lambda -> 0: the update maps every edit key exactly onto its residual
    upd = memit_update(keys, resid, cov, 1e-6)
    assert float((keys.double() @ upd.T - resid.double()).norm() / resid.norm()) < 1e-4
    # larger lambda: the covariance term protects the usual keys and the residual is reached less
    reached = [float((keys.double() @ memit_update(keys, resid, cov, lam).T - resid.double()).norm()) for lam in (1e-3, 1.0, 10.0)]
    assert reached == sorted(reached)
    # keys x = C v with v orthogonal to every edit key are left exactly unchanged (ΔW x = 0)
    upd = memit_update(keys, resid, cov, 1.0)
    q, _ = torch.linalg.qr(keys.double().T)  # basis of the span of the edit keys
    v = torch.randn(d_in, 3, dtype=torch.float64)
    v = v - q @ (q.T @ v)
    assert float((upd @ (cov.double() @ v)).abs().max()) < 1e-8 * float(upd.abs().max())


# ---------------------------------------------------------------- apply on the tiny model


def test_apply_changes_only_chosen_down_proj(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    memit = get_intervention("memit")
    params = memit.parse_params({**_FAST, "layers": [1, 2]})
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    record = memit.apply(model, tok, params, ExperimentData(DataConfig(num_edits=4)))

    json.dumps(record)
    edit = record["edit"]
    assert edit["method"] == "memit" and edit["layers"] == [1, 2] and edit["num_edits"] == 4
    assert edit["target_loss_final"] < edit["target_loss_initial"]
    assert record["seconds"] > 0
    expected = {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == expected
    # no trace beyond the weights: grad flags restored, no grads, no hooks, eval mode kept
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_single_layer_update_reaches_the_targets(tiny_dir: Path) -> None:
    """With one layer and a tiny lambda, the edited layer maps each edit key onto its target value."""
    model, tok = load_model(tiny_dir)
    memit = get_intervention("memit")
    params = memit.parse_params({**_FAST, "layers": [2], "mom2_update_weight": 1e-6})
    record = memit.apply(model, tok, params, ExperimentData(DataConfig(num_edits=4)))
    assert record["edit"]["residual_remaining"] < 1e-3
    # with the paper-sized lambda the covariance holds the update back
    model, tok = load_model(tiny_dir)
    strong = memit.apply(model, tok, memit.parse_params({**_FAST, "layers": [2]}), ExperimentData(DataConfig(num_edits=4)))
    assert strong["edit"]["residual_remaining"] > record["edit"]["residual_remaining"]


def test_apply_on_pruned_model_returns_dense_weights(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w[:, : w.shape[1] // 2] = 0.0  # half of every down_proj pruned
    pruned = _snapshot(model)
    memit = get_intervention("memit")
    memit.apply(model, tok, memit.parse_params({**_FAST, "layers": [1]}), ExperimentData(DataConfig(num_edits=3)))
    edited = model.model.layers[1].mlp.down_proj.weight
    assert edited.dtype == torch.float32 and bool(torch.isfinite(edited).all())
    assert float((edited == 0).float().mean()) < 0.01  # the update is dense
    for name, w in model.state_dict().items():
        if name != "model.layers.1.mlp.down_proj.weight":
            assert torch.equal(w, pruned[name]), name


def test_rejects_layer_out_of_range(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    memit = get_intervention("memit")
    with pytest.raises(ValueError, match="out of range"):
        memit.apply(model, tok, memit.parse_params({"layers": [9]}), ExperimentData(DataConfig(num_edits=1)))


# ---------------------------------------------------------------- covariance statistics and their cache


def test_key_second_moments_match_direct_computation(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    windows = [w[:40] for w in stats_windows(tok, ExperimentData().texts("retain_corpus"), get_intervention("memit").parse_params(_FAST))[:3]]
    covs, count = key_second_moments(model, windows, [0, 2], batch_size=2)
    assert count == sum(len(w) for w in windows)
    keys = []
    hook = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda _m, a: keys.append(a[0][0]))
    with torch.no_grad():
        for w in windows:
            model.model(input_ids=torch.tensor([w]))
    hook.remove()
    k = torch.cat(keys).double()
    torch.testing.assert_close(covs[2].double(), k.T @ k / k.shape[0], atol=1e-5, rtol=1e-4)


def test_covariance_cache_is_keyed_by_model_content(tiny_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    model, tok = load_model(tiny_dir)
    windows = stats_windows(tok, ExperimentData().texts("retain_corpus"), get_intervention("memit").parse_params(_FAST))

    first, info = cached_key_second_moments(model, windows, [1, 2], "retain_corpus", model_tensor_cache(store, model))
    assert not info["cache_hit"] and info["computed_layers"] == [1, 2]
    assert len(list((store.root / "cache" / COV_CACHE_NAME).iterdir())) == 2  # one entry per layer

    # the same content (a fresh load of the same weights): hit, identical tensors
    same, _ = load_model(tiny_dir)
    again, info = cached_key_second_moments(same, windows, [1, 2], "retain_corpus", model_tensor_cache(store, same))
    assert info["cache_hit"] and info["computed_layers"] == []
    for layer in (1, 2):
        assert torch.equal(again[layer], first[layer])
    # an overlapping layer range computes only the missing layer
    _, info = cached_key_second_moments(same, windows, [2, 3], "retain_corpus", model_tensor_cache(store, same))
    assert info["computed_layers"] == [3]

    # prune half of one weight: new content, so a miss and different statistics
    with torch.no_grad():
        w = same.model.layers[0].mlp.up_proj.weight
        w[: w.shape[0] // 2] = 0.0
    assert model_digest(same) != model_digest(model)
    pruned, info = cached_key_second_moments(same, windows, [1, 2], "retain_corpus", model_tensor_cache(store, same))
    assert not info["cache_hit"] and info["computed_layers"] == [1, 2]
    assert not torch.equal(pruned[1], first[1])


def test_apply_uses_the_executor_cache(tiny_dir: Path, tmp_path: Path) -> None:
    """``apply(cache=...)`` bound the way the executor binds it: computed once, then read from the store."""
    store = LocalStore(tmp_path / "store")
    memit = get_intervention("memit")
    params = memit.parse_params({**_FAST, "layers": [1, 2]})
    data = ExperimentData(DataConfig(num_edits=2))
    records, weights = [], []
    for _ in range(2):
        model, tok = load_model(tiny_dir)
        digest = model_digest(model)
        cache = lambda name, config, compute, d=digest: cached_tensors(store, name, d, config, compute)  # noqa: E731
        records.append(memit.apply(model, tok, params, data, cache=cache))
        weights.append(model.model.layers[2].mlp.down_proj.weight.detach().clone())
    assert records[0]["edit"]["statistics"]["cache_hit"] is False
    assert records[1]["edit"]["statistics"]["cache_hit"] is True
    assert torch.equal(weights[0], weights[1])  # cached statistics give the identical edit
    # without a cache the statistics are computed directly, with the same result
    model, tok = load_model(tiny_dir)
    record = memit.apply(model, tok, params, data)
    assert record["edit"]["statistics"]["cache_hit"] is False
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, weights[0])


# ---------------------------------------------------------------- slow: the real built-in model


@pytest.mark.slow
def test_memit_edit_success_smollm2(smollm2_dir: Path, smollm2_quality: dict) -> None:
    from shared.evaluation.edit import evaluate_edits

    model, tok = load_model(smollm2_dir)
    data = ExperimentData(DataConfig(num_edits=10))
    memit = get_intervention("memit")
    before = evaluate_edits(model, tok, data.edits, batch_size=16)
    record = memit.apply(model, tok, memit.parse_params(None), data)
    after = evaluate_edits(model, tok, data.edits, batch_size=16)
    print("memit smollm2:", {"before": before, "after": after, "record": record["edit"], "seconds": record["seconds"]})
    assert record["edit"]["target_loss_final"] < record["edit"]["target_loss_initial"]
    assert before["edit_success"] < 0.5
    assert after["edit_success"] >= 0.8, (before, after, record)
    assert after["edit_locality"] >= before["edit_locality"] - 0.2, (before, after)
    # collateral damage stays within the bounds measured for this editor (docs/editing.md)
    quality = utility_and_perplexity(model, tok)
    assert quality["utility_acc"] >= smollm2_quality["utility_acc"] - 0.03, (smollm2_quality, quality)
    assert quality["perplexity"] <= smollm2_quality["perplexity"] * 1.02, (smollm2_quality, quality)

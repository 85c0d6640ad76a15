"""AlphaEdit along a model's lineage: the protected keys of earlier edits (K_p) and the projector from the root.

The reference (``AlphaEdit_main.py``) edits sequentially: after each batch it
adds the batch's keys to ``cache_c = Σ K_p K_pᵀ`` and solves
``(P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ`` with ``P`` from the unedited model.
Here that state travels with the checkpoint (``shared.lineage_state``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.data import DataConfig, ExperimentData
from shared.interventions import get_intervention
from shared.interventions.alphaedit import alphaedit_update, null_space_projector
from shared.lineage_state import LINEAGE_DIR, Lineage, load_entry
from shared.models import load_model

#: fast settings for the tiny model (layers 1-2; a threshold that leaves part of the key space protected)
_TINY = {"layers": [1, 2], "v_steps": 5, "stats_tokens": 512, "stats_seq_len": 64}


def _random_cov(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2.0, d, dtype=torch.float64)
    return x.T @ x / x.shape[0]


def test_closed_form_with_protected_keys_is_the_reference_and_keeps_old_keys() -> None:
    d_in, d_out = 16, 5
    cov = _random_cov(d_in)
    values, _ = torch.linalg.eigh(cov)
    p, dim = null_space_projector(cov, float(values[9]))
    assert dim == 9
    g = torch.Generator().manual_seed(3)
    old = torch.randn(3, d_in, generator=g, dtype=torch.float64)  # keys of an earlier batch
    keys = torch.randn(3, d_in, generator=g, dtype=torch.float64)
    resid = torch.randn(3, d_out, generator=g, dtype=torch.float64)
    l2 = 1e-4
    with_kp = alphaedit_update(keys, resid, p, l2, protected=old)
    # the reference's normal equations, written out
    k, kp = keys.T, old.T
    reference = torch.linalg.solve(p @ (k @ k.T + kp @ kp.T) + l2 * torch.eye(d_in, dtype=torch.float64), p @ k @ resid).T
    # cond(A) ~ 8e5: a solve's rounding is ~1e-10 here (estimate: cond x eps x |W|)
    assert torch.allclose(with_kp, reference, atol=1e-7)
    without = alphaedit_update(keys, resid, p, l2)
    assert torch.allclose(alphaedit_update(keys, resid, p, l2, protected=old[:0]), without)
    # both stay in the null space of the preserved keys ...
    preserved = torch.linalg.eigh(cov)[1][:, 9:]
    assert float((with_kp @ preserved).abs().max()) < 1e-6
    # ... but only the one with K_p leaves the earlier batch's outputs (nearly) where they were
    moved_with, moved_without = float((with_kp @ old.T).norm()), float((without @ old.T).norm())
    assert moved_with < 1e-2 * moved_without, (moved_with, moved_without)
    # and it still writes the new batch (its projected keys onto the residuals)
    assert torch.allclose(with_kp @ (p @ keys.T), resid.T, atol=1e-2)


@pytest.mark.parametrize("bad", ["wrong_width", "non_finite", "no_root"])
def test_a_lineage_state_that_does_not_fit_the_model_is_refused(bad: str) -> None:
    """Protecting keys of another model (or a damaged state) would silently change every later edit."""
    from shared.interventions.alphaedit import AlphaEditParams
    from shared.lineage_state import LineageEntry

    d = 16
    covs = {1: _random_cov(d)}
    keys = torch.randn(3, d + (4 if bad == "wrong_width" else 0), dtype=torch.float64)
    if bad == "non_finite":
        keys[0, 0] = float("nan")
    meta = {} if bad == "no_root" else {"root": {"digest": "ab" * 32, "key": ""}, "steps": 1}
    entry = LineageEntry({"keys.layer1": keys}, meta)
    method = get_intervention("alphaedit")
    params = AlphaEditParams(layers=[1], nullspace_threshold=1.0)
    context = {"lineage": Lineage(entry=entry)}
    with pytest.raises(ValueError, match="lineage state"):
        if bad == "no_root":
            method.key_statistics(None, [[1, 2]], [1], None, context)
        else:
            method.layer_solver(covs, params, "cpu", context)


def test_two_applications_in_memory_accumulate_keys_and_keep_the_root_projector(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    alpha = get_intervention("alphaedit")
    params = alpha.parse_params({**_TINY, "nullspace_threshold": 1e-3})
    first = ExperimentData(DataConfig(num_edits=3, num_batches=2, edit_batch=0))
    second = ExperimentData(DataConfig(num_edits=3, num_batches=2, edit_batch=1))
    rec1 = alpha.apply(model, tok, params, first)
    entry = rec1.pop("lineage_state")
    json.dumps(rec1)
    e1 = rec1["edit"]
    assert e1["previous_keys"] == {"1": 0, "2": 0} and e1["protected_previous_keys"] == 0
    assert e1["protected_keys_after"] == {"1": 3, "2": 3}
    assert {k: tuple(v.shape) for k, v in entry.tensors.items()} == {"keys.layer1": (3, 128), "keys.layer2": (3, 128)}
    assert entry.meta["root"]["digest"] == e1["projector_source"] and entry.meta["steps"] == 1

    rec2 = alpha.apply(model, tok, params, second, lineage=Lineage(entry=entry))
    entry2 = rec2.pop("lineage_state")
    e2 = rec2["edit"]
    assert e2["previous_keys"] == {"1": 3, "2": 3} and e2["protected_previous_keys"] == 6
    assert e2["protected_keys_after"] == {"1": 6, "2": 6} and entry2.meta["steps"] == 2
    # P comes from the unedited model's statistics (not measured again on the edited one)
    assert e2["projector_source"] == e1["projector_source"]
    assert e2["nullspace_dim"] == e1["nullspace_dim"]
    assert e2["statistics"]["computed_layers"] == []
    # the first batch's keys are kept as they were
    assert torch.equal(entry2.tensors["keys.layer1"][:3], entry.tensors["keys.layer1"])

    # switched off, the keys are still recorded for later steps but not used
    off = alpha.parse_params({**_TINY, "nullspace_threshold": 1e-3, "protect_previous_edits": False})
    rec3 = alpha.apply(model, tok, off, first, lineage=Lineage(entry=entry2))
    assert rec3["edit"]["previous_keys"] == {"1": 6, "2": 6} and rec3["edit"]["protected_previous_keys"] == 0
    assert rec3["lineage_state"].meta["keys"] == {"1": 9, "2": 9}

    # an entry read from a store (no root statistics in memory) needs a way to read the root's
    bare = type(entry)(entry.tensors, entry.meta)
    with pytest.raises(ValueError, match="lineage's root"):
        alpha.apply(model, tok, params, second, lineage=Lineage(entry=bare))


def test_lineage_state_is_written_carried_and_read_through_the_store(tmp_path: Path) -> None:
    from shared.execution import prepare_base, run_step
    from shared.store import open_store

    store = str(tmp_path / "store")
    ae = {"method": "alphaedit", "params": {**_TINY, "v_steps": 3, "nullspace_threshold": 1e-3}}
    wanda = {"method": "wanda", "params": {"sparsity": 0.5, "num_calibration_samples": 4, "calibration_seq_len": 32}}
    data = DataConfig(num_edits=2).model_dump_json()
    digest, key = prepare_base(store, "builtin:tiny-random")
    steps = [ae, wanda, ae]
    keys = [key]
    for i in range(len(steps)):
        keys.append(run_step(store, digest, json.dumps(steps[: i + 1]), data, keys[-1]))
    s = open_store(store)
    folders, records = [], []
    for k in keys[1:]:
        folder, manifest = s.get_checkpoint(k)
        folders.append(folder)
        records.append(manifest["meta"]["records"][-1]["record"])
    assert not (Path(s.get_checkpoint(keys[0])[0]) / LINEAGE_DIR).exists()  # the base has none
    first, carried, last = (load_entry(f, "alphaedit") for f in folders)
    assert first is not None and first.meta["keys"] == {"1": 2, "2": 2}
    assert first.meta["root"]["key"] == keys[0]
    # the pruning step carries the state unchanged
    assert carried is not None and all(torch.equal(carried.tensors[n], first.tensors[n]) for n in first.tensors)
    # the second AlphaEdit step used the first one's keys and the root's statistics from the store's cache
    e1, e3 = records[0]["edit"], records[2]["edit"]
    assert "lineage_state" not in records[2]
    assert e3["previous_keys"] == {"1": 2, "2": 2} and e3["protected_previous_keys"] == 4
    assert e3["projector_source"] == e1["projector_source"] == first.meta["root"]["digest"]
    assert e3["statistics"]["cache_hit"] is True and e3["nullspace_dim"] == e1["nullspace_dim"]
    assert last is not None and last.meta["keys"] == {"1": 4, "2": 4} and last.meta["steps"] == 2
    assert torch.equal(last.tensors["keys.layer2"][:2], first.tensors["keys.layer2"])
    # the lineage file is no weight file: the model folder still loads and sizes as before
    from shared.models import safetensors_num_parameters

    assert safetensors_num_parameters(Path(folders[2])) == safetensors_num_parameters(Path(s.get_checkpoint(keys[0])[0]))


def test_root_statistics_are_measured_on_the_root_checkpoint_after_a_cache_loss(tmp_path: Path) -> None:
    """With the cached statistics gone, the root checkpoint is loaded and measured (not the edited model)."""
    from shared.execution import _lineage_statistics, prepare_base, run_step
    from shared.interventions._memit_stats import key_second_moments
    from shared.interventions.memit import stats_windows
    from shared.store import open_store

    store = str(tmp_path / "store")
    ae = {"method": "alphaedit", "params": {**_TINY, "v_steps": 2, "nullspace_threshold": 1e-3}}
    data = DataConfig(num_edits=1)
    digest, key = prepare_base(store, "builtin:tiny-random")
    k1 = run_step(store, digest, json.dumps([ae]), data.model_dump_json(), key)
    s = open_store(store)
    entry = load_entry(s.get_checkpoint(k1)[0], "alphaedit")
    root = entry.meta["root"]
    root_model, tok = load_model(s.get_checkpoint(key)[0])
    # other windows than the step's: not in the cache, so measured on the loaded root checkpoint
    windows = stats_windows(tok, ExperimentData(data).texts("retain_corpus"), get_intervention("alphaedit").parse_params(
        {**_TINY, "stats_tokens": 256}))
    covs, info = _lineage_statistics(s, False)(root["digest"], root["key"], windows, [1])
    assert info["computed_layers"] == [1]
    assert torch.allclose(covs[1], key_second_moments(root_model, windows, [1])[0][1], atol=1e-6)
    with pytest.raises(Exception, match="does not hold model"):
        _lineage_statistics(s, False)("0" * 64, root["key"], windows, [2])


@pytest.mark.slow
def test_two_sequential_batches_keep_the_first_better_with_protected_keys(smollm2_dir: Path) -> None:
    """Built-in model, 3 + 3 edits: with K_p the second batch moves the first batch's layer outputs far less.

    ``‖ΔW₂ K₁‖ / ‖ΔW₂‖`` over the edited layers; the first batch's target NLL
    drifts no more than without.  (MEMIT's faster target settings, to stay
    within a minute; ``benchmarks/alphaedit_sequential.py`` measures 5 + 5
    with the defaults: 0.15 vs 0.69, success 1.0 either way.)
    """
    from shared.interventions.memit import edit_sites, edited_check, keys_and_values

    alpha = get_intervention("alphaedit")
    fast = {"v_steps": 12, "v_lr": 0.5, "stats_tokens": 4096}
    params = alpha.parse_params(fast)
    first = ExperimentData(DataConfig(num_edits=3, num_batches=2, edit_batch=0))
    second = ExperimentData(DataConfig(num_edits=3, num_batches=2, edit_batch=1))
    model, tok = load_model(smollm2_dir)
    entry = alpha.apply(model, tok, params, first)["lineage_state"]
    sites = edit_sites(tok, first.edits, params.kl_template)
    keys = {layer: keys_and_values(model, tok, sites, layer, layer)[0].double() for layer in params.layers}
    _, nll_first = edited_check(model, tok, sites, params.layers[-1])
    after_first = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    for protect in (True, False):
        model.load_state_dict(after_first)
        p = alpha.parse_params({**fast, "protect_previous_edits": protect})
        rec = alpha.apply(model, tok, p, second, lineage=Lineage(entry=entry))
        assert rec["edit"]["protected_previous_keys"] == (3 * len(params.layers) if protect else 0)
        moved = total = 0.0
        for layer in params.layers:
            delta = model.model.layers[layer].mlp.down_proj.weight.detach().double() - after_first[
                f"model.layers.{layer}.mlp.down_proj.weight"].double()
            moved += float((delta @ keys[layer].T).norm())
            total += float(delta.norm())
        _, nll = edited_check(model, tok, sites, params.layers[-1])
        out[protect] = {"moved": moved / total, "nll_drift": sum(nll) / 3 - sum(nll_first) / 3,
                        "second_nll": rec["edit"]["edited_target_loss"]}
    print("alphaedit sequential 3+3:", out)
    assert out[True]["moved"] < 0.5 * out[False]["moved"], out
    assert out[True]["nll_drift"] <= out[False]["nll_drift"] + 1e-3, out
    assert out[True]["second_nll"] < 1.0, out  # the second batch is still written

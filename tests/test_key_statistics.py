"""Key statistics of the locate-then-edit editors: sample count, split-half stability, shrinkage (issue 29, item 3).

The convergence curve behind the defaults is ``benchmarks/key_statistics.py``
(docs/benchmarks/key_statistics.json, docs/editing.md "Key statistics").
Fast tests use synthetic data and the tiny random Llama.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from shared.cache import cached_tensors
from shared.data import DataConfig, ExperimentData
from shared.interventions import get_intervention
from shared.interventions._memit_stats import (
    COV_VERSION,
    KeySums,
    cached_key_second_moments,
    key_moment_sums,
    key_second_moments,
    ledoit_wolf_intensity,
    model_tensor_cache,
    shrink,
    split_half_stability,
)
from shared.interventions.memit import stats_windows
from shared.models import load_model, model_digest
from shared.store import LocalStore

_FAST = {"v_steps": 5, "stats_tokens": 512, "stats_seq_len": 64}


def _gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Samples with an anisotropic second moment (eigenvalues 1 ... 1/d), as rows."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scale = torch.linspace(1.0, 1.0 / d, d, dtype=torch.float64).sqrt()
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale) @ q.T


# ---------------------------------------------------------------- Ledoit-Wolf shrinkage


def test_ledoit_wolf_intensity_is_the_closed_form() -> None:
    """The intensity from (S, n, Σ‖x‖⁴) equals the textbook formula evaluated sample by sample."""
    x = _gaussian(40, 12)
    n, d = x.shape
    s = x.T @ x / n
    mu = torch.trace(s) / d
    delta2 = ((s - mu * torch.eye(d, dtype=s.dtype)) ** 2).sum()
    beta_bar2 = sum(((torch.outer(r, r) - s) ** 2).sum() for r in x) / n**2
    expected = float(torch.minimum(beta_bar2, delta2) / delta2)
    got = ledoit_wolf_intensity(s, n, float((x.pow(2).sum(1) ** 2).sum()))
    assert got == pytest.approx(expected, rel=1e-9)


def test_ledoit_wolf_intensity_falls_with_the_sample_count_and_shrink_keeps_the_trace() -> None:
    x = _gaussian(4000, 16)
    intensities = []
    for n in (8, 64, 512, 4000):
        part = x[:n]
        s = part.T @ part / n
        intensities.append(ledoit_wolf_intensity(s, n, float((part.pow(2).sum(1) ** 2).sum())))
    assert all(0.0 <= r <= 1.0 for r in intensities)
    assert intensities == sorted(intensities, reverse=True) and intensities[0] > 0.3 and intensities[-1] < 0.05
    s = x[:64].T @ x[:64] / 64
    shrunk = shrink(s, 0.4)
    assert float(torch.trace(shrunk)) == pytest.approx(float(torch.trace(s)))
    ev, ev_shrunk = torch.linalg.eigvalsh(s), torch.linalg.eigvalsh(shrunk)
    assert float(ev_shrunk[-1] / ev_shrunk[0]) < float(ev[-1] / ev[0])  # better conditioned
    # an isotropic estimate has nothing to shrink towards: ρ = 1 leaves it, ρ = 0 is the identity map
    torch.testing.assert_close(shrink(s, 0.0), s)


def test_shrinkage_is_closer_to_the_true_inverse_direction_with_few_samples() -> None:
    """With n ≈ d samples, the shrunk estimate's ``C⁻¹ k`` is closer to the truth's than the plain one's."""
    d = 48
    truth_x = _gaussian(200_000, d, seed=1)
    truth = truth_x.T @ truth_x / truth_x.shape[0]
    k = _gaussian(20, d, seed=2).T
    u_true = torch.linalg.solve(truth, k)
    x = _gaussian(2 * d, d, seed=3)
    s = x.T @ x / x.shape[0]
    rho = ledoit_wolf_intensity(s, x.shape[0], float((x.pow(2).sum(1) ** 2).sum()))
    cos = lambda a: float(torch.nn.functional.cosine_similarity(a, u_true, dim=0).mean())  # noqa: E731
    assert cos(torch.linalg.solve(shrink(s, rho), k)) > cos(torch.linalg.solve(s, k)) + 0.05


# ---------------------------------------------------------------- split-half stability


def _halves(x: torch.Tensor, windows: int) -> tuple[list[torch.Tensor], list[int], list[torch.Tensor]]:
    acc = KeySums()
    for j, w in enumerate(x.float().chunk(windows)):
        acc.add(w[None], j)
    return acc.sums, acc.counts, [torch.cat(p) for p in acc.probes]


def test_split_half_stability_rises_with_the_sample_count() -> None:
    d = 24
    values = []
    for n in (64, 512, 20_000):
        sums, counts, probes = _halves(_gaussian(n, d, seed=4), 16)
        values.append(split_half_stability(sums, counts, probes))
    assert values == sorted(values) and values[-1] > 0.98 and values[0] < 0.9


def test_split_half_stability_does_not_depend_on_whether_a_probe_is_in_the_sample() -> None:
    """A probe's own outer product only rescales ``C⁻¹ p`` (Sherman-Morrison): its cosine is unchanged."""
    x = _gaussian(400, 16, seed=5)
    s = x.T @ x / 400
    p = x[0]
    s_out = (x[1:].T @ x[1:]) / 399
    cos = torch.nn.functional.cosine_similarity(torch.linalg.solve(s, p), torch.linalg.solve(s_out, p), dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-9)


def test_key_sums_split_windows_by_parity_and_keep_the_last_token_as_probe() -> None:
    acc = KeySums()
    x = torch.randn(3, 5, 4)
    acc.add(x[:2], 0)
    acc.add(x[2:], 2)
    assert acc.counts == [10, 5] and acc.count == 15
    even = torch.cat([x[0], x[2]]).double()
    torch.testing.assert_close(acc.sums[0], even.T @ even)
    torch.testing.assert_close(acc.second_moment(), x.reshape(-1, 4).double().T @ x.reshape(-1, 4).double() / 15)
    torch.testing.assert_close(torch.cat(acc.probes[0]), torch.stack([x[0, -1], x[2, -1]]).double())
    assert acc.fourth == pytest.approx(float((x.reshape(-1, 4).double().pow(2).sum(1) ** 2).sum()))


# ---------------------------------------------------------------- the editors' record and cache


def test_stability_is_cached_with_the_statistic(tiny_dir: Path, tmp_path: Path) -> None:
    assert COV_VERSION >= 2  # entries of version 1 have no stability figure: never reused
    store = LocalStore(tmp_path / "store")
    model, tok = load_model(tiny_dir)
    windows = stats_windows(tok, ExperimentData().texts("retain_corpus"), get_intervention("memit").parse_params(_FAST))
    covs, info = cached_key_second_moments(model, windows, [1, 2], "retain_corpus", model_tensor_cache(store, model))
    assert info["windows"] == len(windows) and info["tokens"] == 512
    assert set(info["stability"]) == {1, 2} and all(-1.0 <= v <= 1.0 for v in info["stability"].values())
    again, hit = cached_key_second_moments(model, windows, [1, 2], "retain_corpus", model_tensor_cache(store, model))
    assert hit["cache_hit"] and hit["stability"] == info["stability"]
    # the figure is the one of the sums of a direct pass
    acc = key_moment_sums(model, windows, [2])
    assert acc[2].stability() == pytest.approx(info["stability"][2], rel=1e-6)
    plain, count = key_second_moments(model, windows, [2])
    assert count == 512
    torch.testing.assert_close(plain[2], covs[2])


def test_single_window_has_no_stability_figure(tiny_dir: Path) -> None:
    model, tok = load_model(tiny_dir)
    windows = stats_windows(tok, ExperimentData().texts("retain_corpus"), get_intervention("memit").parse_params(_FAST))[:1]
    _, info = cached_key_second_moments(model, windows, [1], "retain_corpus")
    assert math.isnan(info["stability"][1])


@pytest.mark.parametrize(("name", "layer_params"), [("memit", {"layers": [1, 2]}), ("rome", {"layer": 2}), ("alphaedit", {"layers": [2], "nullspace_threshold": 1e6})])
def test_editor_record_carries_sample_count_and_stability(name: str, layer_params: dict, tiny_dir: Path, tmp_path: Path) -> None:
    method = get_intervention(name)
    model, tok = load_model(tiny_dir)
    digest = model_digest(model)
    store = LocalStore(tmp_path / "store")
    cache = lambda n, config, compute: cached_tensors(store, n, digest, config, compute)  # noqa: E731
    params = method.parse_params({**_FAST, **layer_params})
    record = method.apply(model, tok, params, ExperimentData(DataConfig(num_edits=2)), cache=cache)
    stats = record["edit"]["statistics"]
    assert stats["tokens"] == 512 and stats["windows"] == 8
    layers = layer_params.get("layers", [layer_params.get("layer")])
    assert set(stats["stability"]) == {str(x) for x in layers}
    assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in stats["stability"].values())
    assert stats["stability_min"] == min(stats["stability"].values())


def test_default_token_count_is_the_measured_one() -> None:
    """32768 tokens: C⁻¹ k* of the plain estimate at cosine 0.98 with the 44.5k-token pool (0.79 at the old 8192)."""
    for name in ("memit", "rome", "alphaedit"):
        assert get_intervention(name).parse_params(None).stats_tokens == 32768

"""Fidelity, second pass (issue 29): the reference's optimizer for RMU."""

from __future__ import annotations

import math

import pytest
import torch

from shared.interventions._optim import TransformersAdamW


def _grads(step: int, shape=(3, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def test_transformers_adamw_follows_the_reference_formula():
    lr, (b1, b2), eps, wd = 1e-3, (0.9, 0.999), 1e-6, 0.01
    p = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float64))
    opt = TransformersAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    ref = torch.ones(3, 4, dtype=torch.float64)
    m = torch.zeros_like(ref)
    v = torch.zeros_like(ref)
    for t in range(1, 4):
        g = _grads(t)
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        ref = ref - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
        ref = ref - lr * wd * ref
        assert torch.allclose(p.detach(), ref, rtol=0, atol=1e-15), t


def test_it_is_torch_adamw_with_eps_over_the_second_moment_correction():
    """torch's rule with eps_t = eps / sqrt(1 - b2^t) gives the same parameters; plain eps does not."""
    lr, b2, eps = 1e-3, 0.999, 1e-6
    ours = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    theirs = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    plain = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    a = TransformersAdamW([ours], lr=lr, eps=eps)
    b = torch.optim.AdamW([theirs], lr=lr, eps=eps, weight_decay=0.0)
    c = torch.optim.AdamW([plain], lr=lr, eps=eps, weight_decay=0.0)
    for t in range(1, 6):
        g = _grads(t) * 1e-4  # small gradients: sqrt(v) comparable to eps, where the rules differ
        for p in (ours, theirs, plain):
            p.grad = g.clone()
        b.param_groups[0]["eps"] = eps / math.sqrt(1 - b2**t)
        a.step(), b.step(), c.step()
        assert torch.allclose(ours.detach(), theirs.detach(), rtol=1e-12, atol=1e-18), t
    rel = float((ours.detach() - plain.detach()).norm() / ours.detach().norm())
    assert rel > 0.05  # torch's rule with the same eps is a different optimizer at this scale


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="invalid AdamW"):
        TransformersAdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)

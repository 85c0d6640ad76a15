"""The AdamW update rule of ``transformers.AdamW`` (transformers < 5), which the RMU reference trains with.

Why not ``torch.optim.AdamW``: both correct the first and second moments for
their bias, but transformers adds ``eps`` to the *uncorrected* ``sqrt(v)``
and folds the correction into the step size::

    transformers:  p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    torch:         p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

which is torch's rule with ``eps`` replaced by ``eps / sqrt(1 - b2^t)``:
31.6 times larger at step 1 with beta2 = 0.999, shrinking towards ``eps``
over thousands of steps.  RMU's few hundred steps from a zero state sit in
that range, so with torch's rule the update differs from the reference's by
17.2 % after one step and 3.9 % after ten on the built-in model
(``benchmarks/rmu_optimizer.py``).  transformers 5 no longer ships its AdamW,
so the rule is written out here (a few lines, checked against the formula in
``tests/test_fidelity_pass2.py``).

Weight decay is decoupled and applied after the Adam step with the learning
rate, as transformers did (``p -= lr * wd * p``); RMU's reference uses none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class TransformersAdamW(torch.optim.Optimizer):
    """``transformers.AdamW(params, lr, betas, eps, weight_decay, correct_bias=True)``, step for step."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or eps <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or weight_decay < 0:
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

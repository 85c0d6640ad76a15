"""How far torch's AdamW is from the RMU reference's optimizer (transformers.AdamW), on the built-in model.

Runs RMU (default parameters, ``num_batches`` 1 and 10) from the same
built-in SmolLM2-135M with the reference's update rule (``adam_rule:
transformers``, the default: eps added to the uncorrected sqrt(v)) and with
torch.optim.AdamW at the same eps 1e-6 and no weight decay (``adam_rule:
torch``, what lm-compose used before), and prints, over the trained weights,
the relative difference of the two updates ``||Δ_ref - Δ_torch|| / ||Δ_ref||``.
A third row shows torch's *defaults* (eps 1e-8, weight decay 0.01) against
the reference.  The figures are quoted in ``shared/interventions/rmu.py`` and
docs/unlearning.md.

    .venv/bin/python benchmarks/rmu_optimizer.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from shared.data import ExperimentData
from shared.interventions import get_intervention
from shared.models import load_model, materialize_base


def updates(base_dir: Path, params: dict) -> dict[str, torch.Tensor]:
    rmu = get_intervention("rmu")
    model, tok = load_model(base_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = rmu.apply(model, tok, rmu.parse_params(params), ExperimentData())
    return {n: model.get_parameter(n).detach() - before[n] for n in record["unlearn"]["trained"]}


def relative(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    num = sum(float((ref[n] - other[n]).norm() ** 2) for n in ref) ** 0.5
    den = sum(float(ref[n].norm() ** 2) for n in ref) ** 0.5
    return round(num / den, 3)


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        materialize_base("builtin:smollm2-135m", base)
        for batches in (1, 10):
            ref = updates(base, {"num_batches": batches})
            torch_same = updates(base, {"num_batches": batches, "adam_rule": "torch"})
            torch_dflt = updates(base, {"num_batches": batches, "adam_rule": "torch", "adam_eps": 1e-8,
                                        "weight_decay": 0.01})
            print(json.dumps({"num_batches": batches,
                              "torch_rule_same_eps_vs_reference": relative(ref, torch_same),
                              "torch_defaults_vs_reference": relative(ref, torch_dflt)}), flush=True)


if __name__ == "__main__":
    main()

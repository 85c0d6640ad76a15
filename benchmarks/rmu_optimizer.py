"""How much RMU's AdamW settings matter: the reference's (eps 1e-6, no weight decay) against torch's defaults.

Runs RMU (default parameters, ``num_batches`` 1 and 10) from the same
built-in SmolLM2-135M twice -- once per optimizer setting -- and prints, for
the trained weights, the relative difference of the two updates
``||Δ_ref - Δ_torch|| / ||Δ_ref||``.  The figure is quoted in
``shared/interventions/rmu.py`` and docs/unlearning.md.

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


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        materialize_base("builtin:smollm2-135m", base)
        rows = []
        for batches in (1, 10):
            ref = updates(base, {"num_batches": batches})
            dflt = updates(base, {"num_batches": batches, "adam_eps": 1e-8, "weight_decay": 0.01})
            num = sum(float((ref[n] - dflt[n]).norm() ** 2) for n in ref) ** 0.5
            den = sum(float(ref[n].norm() ** 2) for n in ref) ** 0.5
            rows.append({"num_batches": batches, "relative_difference": round(num / den, 3)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()

"""benchmarks/gpu_check.py: the GPU check's figures, its cost table, and its CPU dry run.

The arithmetic (fit per layer, extrapolate to 32 layers, write a cost table
`lmcompose plan --estimate --cost FILE` reads) is checked on made-up rows; the
dry run (the same code as on a GPU, on the CPU with tiny shapes) runs SmolLM2's
shape end to end.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

META = {"device": "NVIDIA H200", "device_short": "h200", "date": "2026-11-30", "commit": "abc1234", "cpu": False,
        "layers_8b": [5, 10]}


def _rows(per_layer: float = 2.0, fixed: float = 3.0) -> list[dict]:
    rows = []
    for layers in (5, 10):
        for i, method in enumerate(gpu_check.METHODS):
            compute = fixed + per_layer * layers * (i + 1)
            rows.append({"shape": "llama3-8b", "layers": layers, "kind": "intervention", "name": method,
                         "status": "ok", "compute_s": compute, "wall_s": compute + 4 + 0.5 * layers,
                         "peak_gpu_mib": 1000.0 + 400 * layers})
        rows.append({"shape": "llama3-8b", "layers": layers, "kind": "evaluate", "name": "all", "status": "ok",
                     "evaluator_s": {e: 1.0 + layers * 0.5 for e in gpu_check.EVALUATORS},
                     "wall_s": 5 * (1.0 + layers * 0.5) + 2 + 0.25 * layers, "peak_gpu_mib": 2000.0})
        rows.append({"shape": "llama3-8b", "layers": layers, "kind": "prepare", "name": "prepare_base", "status": "ok",
                     "wall_s": 1.0 + layers})
    # other shapes and failed steps are not part of the line
    rows.append({"shape": "smollm2-135m", "layers": 30, "kind": "intervention", "name": "ft", "status": "ok",
                 "compute_s": 999.0, "wall_s": 999.0})
    rows.append({"shape": "llama3-8b", "layers": 10, "kind": "intervention", "name": "reproject", "status": "error"})
    return rows


def test_extrapolation_is_the_line_through_the_two_layer_counts():
    figures = gpu_check.extrapolate(_rows())
    ft = figures["step/ft/compute_s"]
    assert ft["points"] == [(5, 13.0), (10, 23.0)] and ft["per_layer"] == 2.0 and ft["fixed"] == 3.0
    assert ft["at_32_layers"] == 3.0 + 2.0 * 32
    assert figures["step/awq/compute_s"]["at_32_layers"] == pytest.approx(3.0 + 20.0 * 32)
    assert figures["step/ft/peak_gpu_mib"]["at_32_layers"] == 1000.0 + 400 * 32
    assert figures["evaluate/load_s"]["at_32_layers"] == pytest.approx(2 + 0.25 * 32)
    assert figures["evaluator/edit/compute_s"]["at_32_layers"] == pytest.approx(1 + 16)
    assert "step/reproject/compute_s" not in figures  # one failed point: no line


def test_cost_table_holds_the_measured_figures_and_loads(tmp_path):
    from shared.estimate import LLAMA3_8B_A100, estimate, load_cost_table
    from shared.planner import build_plan
    from shared.spec import load_spec

    doc = gpu_check.cost_table(META, gpu_check.extrapolate(_rows()))
    path = tmp_path / "cost_table.json"
    path.write_text(json.dumps(doc))
    table = load_cost_table(path)
    assert table.name == "llama3-8b-h200-measured"
    assert table.step("ft") == 67.0 and table.step("gptq") == pytest.approx(3 + 2 * 32 * 9)
    assert table.step("reproject") == LLAMA3_8B_A100.step("reproject")  # not measured: the estimate stays
    assert table.evaluator("utility") == pytest.approx(17.0)
    assert table.load_s == pytest.approx(10.0) and table.prepare_base_s == pytest.approx(33.0)
    assert "H200" in table.sources["step_s.ft"] and "extrapolated to 32" in table.sources["step_s.ft"]
    assert table.sources["step_s.reproject"].startswith("estimate")
    assert table.sources["collect_s"].startswith("estimate")
    plan = build_plan(load_spec(ROOT / "pipelines" / "experiments" / "demo.yaml"))
    measured, default = estimate(plan, (8,), cost=table), estimate(plan, (8,))
    assert measured["cost_table"] == table.name and default["cost_table"] == LLAMA3_8B_A100.name
    assert measured["gpu_hours"] != default["gpu_hours"]


@pytest.mark.parametrize("broken", [
    {}, {"step_s": {}}, "drop:ft", "negative", "not json",
])
def test_a_broken_cost_table_is_refused_with_its_reason(tmp_path, broken):
    from dataclasses import asdict

    from shared.estimate import LLAMA3_8B_A100, load_cost_table

    doc = asdict(LLAMA3_8B_A100)
    if broken == "drop:ft":
        del doc["step_s"]["ft"]
    elif broken == "negative":
        doc["load_s"] = -1
    elif isinstance(broken, dict):
        doc = {**doc, **broken} if broken else {}
    path = tmp_path / "cost.json"
    path.write_text("{not json" if broken == "not json" else json.dumps(doc))
    with pytest.raises(ValueError, match="cost table"):
        load_cost_table(path)


def test_plan_estimate_reads_a_cost_file(tmp_path):
    doc = gpu_check.cost_table(META, gpu_check.extrapolate(_rows()))
    path = tmp_path / "cost_table.json"
    path.write_text(json.dumps(doc))
    cli = [sys.executable, "-m", "pipelines.cli", "plan", "pipelines/experiments/demo.yaml", "--estimate"]
    measured = subprocess.run(cli + ["--cost", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert measured.returncode == 0, measured.stderr[-2000:]
    assert "llama3-8b-h200-measured cost table" in measured.stdout
    default = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "llama3-8b-a100 cost table" in default.stdout and "estimates, not measurements" in default.stdout
    (tmp_path / "bad.json").write_text("{}")
    bad = subprocess.run(cli + ["--cost", str(tmp_path / "bad.json")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "--cost" in bad.stderr


def test_layer_choices_move_inside_a_shallow_model():
    assert gpu_check.fit_layers("ft", {}, 5)["layers"] == [0, 1, 2, 3, 4]  # default [2..6], five layers kept
    assert gpu_check.fit_layers("ft", {}, 10) == {}  # the defaults fit: unchanged
    assert gpu_check.fit_layers("memit", {}, 10) == {}
    assert gpu_check.fit_layers("memit", {}, 5)["layers"] == [0, 1, 2, 3, 4]
    assert gpu_check.fit_layers("rmu", {}, 5)["layer"] == 4 and gpu_check.fit_layers("rmu", {}, 10) == {}
    assert gpu_check.fit_layers("wanda", {"sparsity": 0.5}, 3) == {"sparsity": 0.5}


@pytest.mark.slow
def test_cpu_dry_run_measures_every_method_evaluator_and_the_composition(tmp_path):
    """The dry run at SmolLM2's (tiny) shape: the same entry points as on a GPU, bf16, on the CPU."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--skip-8b", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["cpu"] is True and doc["dtype"] == "bfloat16"
    rows = doc["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    steps = {r["name"]: r for r in rows if r["kind"] == "intervention"}
    assert sorted(steps) == sorted(gpu_check.METHODS)
    assert all(r["wall_s"] > 0 and r["compute_s"] > 0 and r["wall_s"] >= r["compute_s"] for r in steps.values())
    (evaluation,) = [r for r in rows if r["kind"] == "evaluate"]
    assert sorted(evaluation["evaluator_s"]) == sorted(gpu_check.EVALUATORS)
    assert evaluation["criteria"]["compression"]["sparsity"] == pytest.approx(0.0, abs=1e-6)
    (composition,) = [r for r in rows if r["kind"] == "composition"]
    assert composition["name"] == "wanda > ft" and composition["compute_s"] > 0
    from shared.estimate import load_cost_table

    table = load_cost_table(out / "cost_table.json")  # no 8B rows: every figure is the estimate
    assert table.name == "dry-run-cpu-not-figures"
    assert "CPU DRY RUN" in (out / "summary.md").read_text()
    assert not (out / "work").exists()  # models and stores are removed


def test_device_and_step_precision_come_from_the_environment(monkeypatch):
    import torch

    from shared.models import compute_device, step_dtype

    monkeypatch.delenv("LMCOMPOSE_DEVICE", raising=False)
    monkeypatch.delenv("LMCOMPOSE_STEP_DTYPE", raising=False)
    # the defaults: the GPU where there is one (a cluster's GPU task), float32 steps
    assert compute_device() == ("cuda" if torch.cuda.is_available() else "cpu") and step_dtype() is torch.float32
    monkeypatch.setenv("LMCOMPOSE_DEVICE", "cpu")
    assert compute_device() == "cpu"
    monkeypatch.setenv("LMCOMPOSE_DEVICE", "cuda")
    monkeypatch.setenv("LMCOMPOSE_STEP_DTYPE", "bfloat16")
    assert compute_device() == "cuda" and step_dtype() is torch.bfloat16
    monkeypatch.setenv("LMCOMPOSE_STEP_DTYPE", "fp8")
    with pytest.raises(ValueError, match="LMCOMPOSE_STEP_DTYPE"):
        step_dtype()

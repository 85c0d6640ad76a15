"""Studies across base models: ``models:`` specs, their plans and pipelines, and the cross-model report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines.cli import main
from shared.cross_model import build_cross_model_report, cross_model_table, read_model_report
from shared.planner import build_plan
from shared.spec import SpecError, default_model_label, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
TWO_MODELS = REPO / "pipelines" / "experiments" / "two_models.yaml"

BASE = {
    "name": "xm",
    "interventions": [{"method": "memit"}, {"method": "wanda", "sweep": {"sparsity": [0.25, 0.5]}}],
    "compositions": {"mode": "permutations"},
    "data": {"num_edits": 4},
}
TINY_OVERRIDE = {"source": "builtin:tiny-random", "params": {"memit": {"layers": [1, 2, 3]}}}


# ---------------------------------------------------------------- the spec


def test_models_expand_into_one_study_per_model_with_overrides() -> None:
    spec = parse_spec({**BASE, "models": ["builtin:smollm2-135m", TINY_OVERRIDE]}, check_data=False)
    assert spec.model_labels() == ["smollm2-135m", "tiny-random"]
    small, tiny = spec.per_model()
    assert (small.name, small.model, small.models) == ("xm-smollm2-135m", "builtin:smollm2-135m", [])
    assert (tiny.name, tiny.model) == ("xm-tiny-random", "builtin:tiny-random")
    assert small.intervention("memit").params == {} and tiny.intervention("memit").params == {"layers": [1, 2, 3]}
    assert tiny.intervention("wanda").sweep == {"sparsity": [0.25, 0.5]}  # everything else is the spec's
    # the same compositions for both models; a multi-model spec is never planned as one
    assert [c["names"] for c in build_plan(small).compositions] == [c["names"] for c in build_plan(tiny).compositions]
    with pytest.raises(ValueError, match="planned once per model"):
        build_plan(spec)
    # a single-model spec is its own only study
    single = parse_spec(BASE, check_data=False)
    assert single.per_model() == [single] and single.model_labels() == ["smollm2-135m"]


@pytest.mark.parametrize("models, extra, message", [
    (["builtin:smollm2-135m", "builtin:tiny-random"], {}, r"models\[1\] \(tiny-random\): interventions\[0\]\.params\.layers: "
                                                         r"memit layers \[3, 4, 5, 6, 7\] out of range"),
    (["builtin:smollm2-135m", TINY_OVERRIDE], {"model": "builtin:smollm2-135m"}, "either 'model'.*or 'models'"),
    (["builtin:smollm2-135m"], {}, "at least two models"),
    (["builtin:smollm2-135m", "builtin:smollm2-135m"], {}, "labels must be unique"),
    (["builtin:smollm2-135m", {**TINY_OVERRIDE, "params": {"rmu": {}}}], {}, r"models\[1\]\.params\.rmu: not an intervention"),
    (["builtin:smollm2-135m", {**TINY_OVERRIDE, "lable": "x"}], {}, r"models\.1\.lable: unknown key \(did you mean 'label'\?\)"),
    (["builtin:smollm2-135m", "builtin:nope"], {}, "unknown built-in model 'builtin:nope'"),
])
def test_bad_models_name_the_field(models: list, extra: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({**BASE, **extra, "models": models}, check_data=False)


def test_default_labels() -> None:
    assert default_model_label("hf:meta-llama/Meta-Llama-3-8B") == "meta-llama-3-8b"
    assert default_model_label("hf:Qwen/Qwen2.5-7B@main") == "qwen2-5-7b"
    assert default_model_label("builtin:tiny-random") == "tiny-random"


# ---------------------------------------------------------------- CLI: plan and compile


def test_cli_plans_and_compiles_every_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    assert main(["plan", str(TWO_MODELS)]) == 0
    out = capsys.readouterr().out
    assert "== model builtin:smollm2-135m: run two-models-smollm2-135m ==" in out
    assert "== model builtin:tiny-random: run two-models-tiny-random ==" in out
    assert out.count("compositions:") == 2
    assert main(["compile", str(TWO_MODELS), "-o", str(tmp_path / "x.yaml"), "--store", "s3://b/p"]) == 2
    assert "-o must name a folder" in capsys.readouterr().err
    assert main(["compile", str(TWO_MODELS), "-o", str(tmp_path / "out"), "--store", "s3://b/p"]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".pipeline.yaml"))
    assert files == ["two-models-smollm2-135m.pipeline.yaml", "two-models-tiny-random.pipeline.yaml"]
    # beside them, each model's plan, which its report reads from the store (lmcompose upload-plan)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".plan.json")) == [
        "two-models-smollm2-135m.plan.json", "two-models-tiny-random.plan.json"]
    sources = set()
    for name in files:
        doc = next(yaml.safe_load_all((tmp_path / "out" / name).read_text()))
        pipeline = pipeline_spec_pb2.PipelineSpec()
        json_format.ParseDict(doc, pipeline)  # KFP's own schema
        base = pipeline.root.dag.tasks["prepare-base"].inputs.parameters["model_source"]
        sources.add(json_format.MessageToDict(base.runtime_value.constant))
        # the per-model override reached the tiny model's MEMIT task, typed
        memit = [t for t in pipeline.root.dag.tasks.values() if t.component_ref.name.startswith("comp-memit")]
        layers = {json.dumps(json_format.MessageToDict(t.inputs.parameters["layers"].runtime_value.constant))
                  if "layers" in t.inputs.parameters else "default" for t in memit}
        default = json_format.MessageToDict(
            pipeline.components[memit[0].component_ref.name].input_definitions.parameters["layers"].default_value)
        # SmolLM2's layers are MEMIT's default: left out of the task (the component applies its default)
        assert layers == ({"[1.0, 2.0, 3.0]"} if "tiny" in name else {"default"}), (name, layers)
        assert default == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert sources == {"builtin:smollm2-135m", "builtin:tiny-random"}


# ---------------------------------------------------------------- the cross-model report


def _report(folder: Path, ofe: dict[str, float], num_parameters: int | None, triple: float | None = None) -> Path:
    """A minimal report folder: composability.csv rows of two pairs, and model.json."""
    folder.mkdir(parents=True)
    rows = []
    for pair, value in ofe.items():
        first, second = pair.split("+")
        for criterion, v in (("edit_success", value), ("utility_acc", value / 2)):
            rows.append({"pair": pair, "first": first, "second": second, "setting": "default", "setting_key": "{}",
                         "sweep_param": "", "sweep_value": float("nan"), "criterion": criterion,
                         "order_free_error": v, "order_sensitivity": v / 10})
    pd.DataFrame(rows).to_csv(folder / "composability.csv", index=False)
    if triple is not None:
        pd.DataFrame([{"combo": "memit+rmu+gptq", "k": 3, "setting": "default", "sweep_param": "", "sweep_value": float("nan"),
                       "criterion": "edit_success", "order_free_error": triple, "order_sensitivity": 0.5}]).to_csv(
            folder / "composability_orders.csv", index=False)
    if num_parameters:
        (folder / "model.json").write_text(json.dumps({"source": f"src-{folder.name}", "num_parameters": num_parameters}))
    return folder


def test_cross_model_table_and_report(tmp_path: Path) -> None:
    small = read_model_report("small", _report(tmp_path / "a", {"memit+gptq": 0.2, "memit+wanda": 0.4}, 1_000_000, triple=0.7))
    large = read_model_report("large", _report(tmp_path / "b", {"memit+gptq": 0.1, "ft+gptq": 0.3}, 8_000_000))
    table = cross_model_table([small, large])
    assert list(table.columns) == ["criterion", "k", "composition", "setting", "sweep", "small", "large"]
    row = table[(table["criterion"] == "edit_success") & (table["composition"] == "memit+gptq")].iloc[0]
    assert (row["small"], row["large"]) == (0.2, 0.1)
    only_small = table[(table["criterion"] == "edit_success") & (table["composition"] == "memit+wanda")].iloc[0]
    assert only_small["small"] == 0.4 and pd.isna(only_small["large"])
    triple = table[table["k"] == 3].iloc[0]
    assert triple["composition"] == "memit+rmu+gptq" and triple["small"] == 0.7 and pd.isna(triple["large"])
    sens = cross_model_table([small, large], "order_sensitivity")
    assert sens[(sens["criterion"] == "utility_acc") & (sens["composition"] == "memit+gptq")]["small"].iloc[0] == pytest.approx(0.01)

    written = build_cross_model_report([small, large], tmp_path / "xm", title="t")
    text = written["report"].read_text()
    assert "| small | src-a | 1,000,000 | [../a](../a/report.md) |" in text and "| large | src-b | 8,000,000 |" in text
    assert "| 2 | memit+gptq | default | – | 0.200 | 0.100 |" in text
    assert "| 2 | memit+wanda | default | – | 0.400 | – |" in text
    for criterion in ("edit_success", "utility_acc"):
        assert (tmp_path / "xm" / "plots" / f"{criterion}__ofe_vs_size.png").stat().st_size > 1000
        assert f"plots/{criterion}__ofe_vs_size.png" in text
    long = pd.read_csv(written["cross_model"])
    assert set(long["metric"]) == {"order_free_error", "order_sensitivity"}


def test_report_without_sizes_says_so_and_skips_the_plot(tmp_path: Path) -> None:
    a = read_model_report("a", _report(tmp_path / "a", {"memit+gptq": 0.2}, None))
    b = read_model_report("b", _report(tmp_path / "b", {"memit+gptq": 0.3}, 5))
    written = build_cross_model_report([a, b], tmp_path / "xm")
    assert "No parameter count for a" in written["report"].read_text()
    assert not list((tmp_path / "xm" / "plots").iterdir())
    with pytest.raises(ValueError, match="at least two models"):
        build_cross_model_report([a], tmp_path / "one")
    with pytest.raises(ValueError, match="unique"):
        cross_model_table([a, a])


def test_cli_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _report(tmp_path / "a", {"memit+gptq": 0.2}, 10)
    _report(tmp_path / "b", {"memit+gptq": 0.3}, 20)
    assert main(["compare", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--out", str(tmp_path / "xm")]) == 0
    assert (tmp_path / "xm" / "report.md").is_file()
    assert main(["compare", f"a={tmp_path / 'a'}", f"b={tmp_path}", "--out", str(tmp_path / "xm2")]) == 2
    assert "is not a study report folder" in capsys.readouterr().err
    assert main(["compare", f"a={tmp_path / 'a'}", "--out", str(tmp_path / "xm3")]) == 2
    assert main(["compare", f"{tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--out", str(tmp_path / "xm4")]) == 2


# ---------------------------------------------------------------- slow: a two-model study through kfp.local


@pytest.mark.slow
def test_two_model_study_runs_through_kfp_local(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two models (the tiny model twice, under two labels with different FT layers: fast) -> two reports + comparison."""
    spec = {
        "name": "xm-run",
        "models": [{"source": "builtin:tiny-random", "label": "low"},
                   {"source": "builtin:tiny-random", "label": "high", "params": {"ft": {"layers": [2, 3]}}}],
        "interventions": [{"method": "ft", "params": {"steps": 2, "layers": [0, 1]}},
                          {"method": "wanda", "params": {"num_calibration_samples": 4, "calibration_seq_len": 32,
                                                         "sparsity": 0.5}}],
        "evaluation": {"evaluators": ["edit", "perplexity"], "batch_size": 4, "max_length": 32},
        "data": {"num_edits": 4},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert load_spec(path).model_labels() == ["low", "high"]
    out = tmp_path / "out"
    assert main(["run", str(path), "--store", str(tmp_path / "store"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== model builtin:tiny-random: run xm-run-low ==" in printed and "cross-model report:" in printed
    for label in ("low", "high"):
        report = next((out / label).rglob("composability.csv")).parent
        info = json.loads((report / "model.json").read_text())
        assert info["source"] == "builtin:tiny-random" and info["num_parameters"] == 3_293_760
    text = (out / "cross-model" / "report.md").read_text()
    assert "| 2 | ft+wanda |" in text and "| low |" in text and "| high |" in text
    table = pd.read_csv(out / "cross-model" / "cross_model.csv")
    assert {"low", "high"} <= set(table.columns)
    # the FT layers differ, so the two models' edit results are two measurements, not one copied
    base_low = pd.read_csv(next((out / "low").rglob("results.csv")))
    base_high = pd.read_csv(next((out / "high").rglob("results.csv")))
    ft_low = base_low[base_low["composition"] == "ft"]["model_key"].iloc[0]
    ft_high = base_high[base_high["composition"] == "ft"]["model_key"].iloc[0]
    assert ft_low != ft_high
    # the base model is one checkpoint in the store, shared by both studies (content-addressed)
    assert base_low[base_low["n_steps"] == 0]["model_key"].iloc[0] == base_high[base_high["n_steps"] == 0]["model_key"].iloc[0]


FAMILIES = sorted((REPO / "pipelines" / "experiments" / "paper" / "families").glob("*.yaml"))


@pytest.mark.parametrize("path", FAMILIES, ids=lambda p: p.stem)
def test_paper_studies_on_two_families_plan_per_model(path: Path) -> None:
    """Each paper study has a two-family variant (Llama-3-8B, Qwen2.5-7B) that plans as the Llama study does, per model."""
    spec = load_spec(path, fetch_remote=False)
    assert [m.source for m in spec.models] == ["hf:meta-llama/Meta-Llama-3-8B", "hf:Qwen/Qwen2.5-7B"]
    llama = load_spec(REPO / "pipelines" / "experiments" / "paper" / f"llama3_{path.stem}.yaml", fetch_remote=False)
    reference = build_plan(llama)
    for one in spec.per_model():
        plan = build_plan(one)
        assert len(plan.compositions) == len(reference.compositions)
        assert plan.counts() == reference.counts()
        assert one.interventions == llama.interventions  # the same hyperparameters for both families
    assert len(FAMILIES) == 3

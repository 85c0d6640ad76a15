"""Standalone component YAMLs (components/yaml/): up to date, faithful to the Python components, runnable.

The last test builds a pipeline from nothing but the loaded YAML files --
prepare_base, wanda, two evaluators -- and runs it with kfp.local, the way a
pipeline outside this project would reuse them.  (No ``from __future__ import
annotations`` here: KFP reads the pipeline function's annotations as types.)
"""

import json
import math
import os
import re
from typing import NamedTuple

import pytest
import yaml
from kfp.components import load_component_from_file

from pipelines.component_yaml import DEFAULT_OUT, IMAGE_ENV, all_components, check, generate

COMPONENTS = all_components()


class ReuseOutputs(NamedTuple):
    model_key: str
    perplexity: str


def test_every_component_is_compiled_and_the_files_are_up_to_date(monkeypatch):
    """The committed YAMLs are exactly what `python -m pipelines.component_yaml` writes (whatever the caller's env)."""
    # the committed files name the default image even when the caller points components elsewhere
    monkeypatch.setenv("LMCOMPOSE_IMAGE_TAG", "9.9.9-not-the-default")
    assert set(IMAGE_ENV) >= {"LMCOMPOSE_IMAGE_REPOSITORY", "LMCOMPOSE_IMAGE_TAG"}
    assert sorted(p.stem for p in DEFAULT_OUT.glob("*.yaml")) == sorted(COMPONENTS)
    problems = check(DEFAULT_OUT)
    assert problems == [], "\n".join(problems) + "\nregenerate with: python -m pipelines.component_yaml"
    assert {"prepare_base", "aggregate", "wanda", "evaluate_perplexity"} <= set(COMPONENTS)
    assert (DEFAULT_OUT / "README.md").is_file()


def test_generation_is_deterministic_and_check_finds_every_problem(tmp_path, capsys):
    from pipelines.component_yaml import main

    out = tmp_path / "yaml"
    first = {p.name: p.read_bytes() for p in generate(out)}
    assert {p.name: p.read_bytes() for p in generate(out)} == first  # byte-identical on a re-run
    assert first == {p.name: p.read_bytes() for p in DEFAULT_OUT.glob("*.yaml")}
    (out / "ga.yaml").write_bytes(first["ga.yaml"] + b"# edited\n")
    (out / "gd.yaml").unlink()
    (out / "retired.yaml").write_text("# not a component\n")
    assert main(["--out", str(out), "--check"]) == 1
    assert capsys.readouterr().err.splitlines()[:3] == [
        f"missing: {out / 'gd.yaml'}", f"stale: {out / 'ga.yaml'}", f"extra (no such component): {out / 'retired.yaml'}",
    ]
    # a regeneration repairs what it wrote and leaves files it did not write alone
    assert main(["--out", str(out)]) == 0
    assert check(out) == [f"extra (no such component): {out / 'retired.yaml'}"]


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_yaml_loads_with_the_python_components_interface(name):
    comp = COMPONENTS[name]
    loaded = load_component_from_file(str(DEFAULT_OUT / f"{name}.yaml"))
    want, got = comp.component_spec, loaded.component_spec

    def sig(specs):  # the loader reads typing.List[str] back as List
        return {
            k: (re.sub(r"^typing\.List\[.*\]$", "List", v.type), v.default if hasattr(v, "default") else None)
            for k, v in (specs or {}).items()
        }

    assert sig(got.inputs) == sig(want.inputs)
    assert sig(got.outputs) == sig(want.outputs)
    assert got.name == want.name
    assert got.implementation.container.image == "ghcr.io/lm-compose/lm-compose:0.1.0-cuda"
    # kfp's YAML round trip keeps the docstring's words, not its exact blank lines (the Args: part
    # becomes the inputs' descriptions, compared above)
    assert got.description.split("Args:")[0].split() == want.description.split("Args:")[0].split()
    # every input is described in the file (the loader does not read descriptions back: compare the YAML)
    doc = yaml.safe_load((DEFAULT_OUT / f"{name}.yaml").read_text())
    (comp_def,) = doc["components"].values()
    described = {k: v.get("description") for kind in ("artifacts", "parameters")
                 for k, v in comp_def["inputDefinitions"].get(kind, {}).items()}
    assert described == {k: v.description for k, v in want.inputs.items()}
    assert all(described.values()), f"undescribed inputs: {[k for k, v in described.items() if not v]}"
    assert got.implementation.container.command == want.implementation.container.command  # the source itself


TINY_WANDA = {"sparsity": 0.5, "num_calibration_samples": 4, "calibration_seq_len": 32}
TINY_FT = {"steps": 2, "layers": [0, 1]}
EVAL = {"batch_size": 4, "max_length": 32, "dtype": "float32"}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")  # kfp.local on a non-"python" image name
def test_pipeline_of_loaded_yaml_components_runs_with_kfp_local(tmp_path, monkeypatch):
    """prepare_base -> wanda(sparsity=0.5) -> ft -> evaluate, every task from a YAML file, models chained by output.

    No JSON strings, no store keys, no ``.after()``: the way a pipeline outside
    this project reuses the components.  Its criteria must equal those of the
    same composition in a spec-compiled run (another store, recomputed).
    """
    import kfp.local
    from kfp import dsl

    from pipelines.local import run_local
    from shared.report import load_results
    from shared.spec import parse_spec
    from shared.store import open_store

    def load(name):
        return load_component_from_file(str(DEFAULT_OUT / f"{name}.yaml"))

    prepare_base, wanda, ft, evaluate = load("prepare_base"), load("wanda"), load("ft"), load("evaluate")
    monkeypatch.setenv("LMCOMPOSE_EVAL_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))

    # the same composition compiled from a spec, in its own store
    spec = parse_spec({
        "name": "wanda-then-ft", "model": "builtin:tiny-random",
        "interventions": [{"method": "wanda", "params": TINY_WANDA}, {"method": "ft", "params": TINY_FT}],
        "compositions": {"include_singles": False, "include_base": False, "recompress": "none"},
        "evaluation": {"evaluators": ["edit", "perplexity", "compression"], **EVAL},
        "data": {"num_edits": 4},
    })
    report = run_local(spec, str(tmp_path / "spec-store"), tmp_path / "spec-out")
    compiled = load_results(report / "results.csv").set_index("composition").loc[
        "wanda > ft"]  # the label the planner gives (sparsity is a fixed parameter, not swept)

    class Outputs(NamedTuple):
        results: str

    @dsl.pipeline(name="reuse-lm-compose-components")
    def reuse(store_uri: str) -> Outputs:
        base = prepare_base(model_source="builtin:tiny-random", store_uri=store_uri)
        pruned = wanda(model=base.outputs["model"], **TINY_WANDA)
        edited = ft(model=pruned.outputs["model"], num_edits=4, **TINY_FT)
        scores = evaluate(model=edited.outputs["model"], evaluators=["edit", "perplexity", "compression"],
                          num_edits=4, **EVAL)
        return Outputs(scores.outputs["results"])

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-local"),
                   enable_caching=False)
    store_uri = str(tmp_path / "store")
    run = reuse(store_uri=store_uri)

    out = json.loads(run.outputs["results"])
    criteria = {k: v for by_eval in out["criteria"].values() for k, v in by_eval.items()}
    assert out["model_key"] == compiled["model_key"]  # content-addressed: the same model, whichever pipeline made it
    for name, value in criteria.items():
        assert value == pytest.approx(float(compiled[name]), rel=1e-5, abs=1e-6), name
    assert criteria["sparsity"] < 0.5  # ft after wanda moved pruned weights (no re-compression here)
    assert math.isfinite(criteria["perplexity"]) and criteria["perplexity"] > 1.0

    # every Model artifact is a small reference with metadata that identifies its checkpoint
    store = open_store(store_uri)
    root = tmp_path / "kfp-local"
    artifacts = {p.parent.name: p for p in root.rglob("model") if p.is_file()}
    assert {"prepare-base", "wanda", "ft"} <= set(artifacts)
    refs = {name: json.loads(path.read_text()) for name, path in artifacts.items()}
    assert all(r["format"] == "lm-compose-model-ref/1" and r["store"] == store_uri for r in refs.values())
    assert all(path.stat().st_size < 1000 for path in artifacts.values())  # no second copy of the weights
    assert refs["ft"]["key"] == out["model_key"]
    ft_meta = store.checkpoint_meta(refs["ft"]["key"])
    assert [s["method"] for s in ft_meta["steps"]] == ["wanda", "ft"]
    assert ft_meta["steps"][0]["params"]["sparsity"] == 0.5 and ft_meta["steps"][1]["params"]["layers"] == [0, 1]
    assert ft_meta["compression"]["method"] == "wanda" and ft_meta["compression"]["modified_after"] is True


def test_model_artifact_metadata_names_the_checkpoint(tmp_path):
    """What the UI shows for a Model artifact: key, base, steps with full parameters, compression state, size."""
    from shared.model_ref import ModelRef, artifact_metadata

    manifest = {
        "files": {"model.safetensors": {"size": 1000, "sha256": "0" * 64}, "config.json": {"size": 24, "sha256": "1" * 64}},
        "meta": {
            "base_digest": "abc", "source": "builtin:tiny-random",
            "steps": [{"method": "gptq", "version": "1", "params": {"bits": 4, "group_size": 64}, "data": {}}],
            "compression": {"method": "gptq", "kind": "quantization", "bits": 4, "group_size": 64, "symmetric": True},
        },
    }
    meta = artifact_metadata(ModelRef("s3://b/p", "ckpt/0123"), manifest)
    assert meta["key"] == "ckpt/0123" and meta["store"] == "s3://b/p"
    assert meta["base_source"] == "builtin:tiny-random" and meta["base_digest"] == "abc"
    assert meta["steps"] == [{"method": "gptq", "version": "1", "params": {"bits": 4, "group_size": 64}}]
    assert meta["composition"] == "gptq" and meta["size_bytes"] == 1024
    assert meta["compression_method"] == "gptq" and meta["compression_bits"] == 4
    assert meta["compression_avg_bits"] == 4.5 and meta["compression_on_grid"] is True
    modified = {**manifest, "meta": {**manifest["meta"], "compression": {**manifest["meta"]["compression"], "modified_after": True}}}
    assert artifact_metadata(ModelRef("s3://b/p", "ckpt/0123"), modified)["compression_on_grid"] is False
    ref = ModelRef("s3://b/p", "ckpt/0123")
    ref.write(tmp_path / "model")
    assert ModelRef.read(tmp_path / "model") == ref


@pytest.mark.parametrize("bad", [{"format": "x"}, {"format": "lm-compose-model-ref/1", "store": "s", "key": "/etc/passwd"},
                                 {"format": "lm-compose-model-ref/1", "store": "s", "key": "ckpt/../../x"}])
def test_foreign_or_hostile_model_artifacts_are_refused(tmp_path, bad):
    from shared.model_ref import ModelRef, ModelRefError
    from shared.store import UnsafePath

    (tmp_path / "model").write_text(json.dumps(bad))
    with pytest.raises((ModelRefError, UnsafePath)):
        ModelRef.read(tmp_path / "model")


def test_generated_intervention_components_are_up_to_date_and_typed():
    """components/<method>.py are what the generator writes from the pydantic models; typed inputs with their defaults."""
    from pipelines.component_codegen import check as codegen_check
    from shared.interventions import get_intervention

    assert codegen_check() == [], "regenerate with: python -m pipelines.component_codegen"
    wanda = COMPONENTS["wanda"].component_spec.inputs
    assert wanda["sparsity"].type == "Float" and wanda["sparsity"].default == 0.5
    assert wanda["mask_structure"].type == "String" and wanda["calibration"].default == "builtin"
    assert wanda["model"].type == "system.Model@0.0.1"
    assert "fraction of block linear weights" in wanda["sparsity"].description  # the pydantic description
    params = get_intervention("memit").params_model.model_fields
    memit = COMPONENTS["memit"].component_spec.inputs
    assert set(params) <= set(memit) and memit["layers"].type == "typing.List[int]"
    assert "set_to_none" in COMPONENTS["gptq"].component_spec.inputs  # group_size may be None, default 64
    assert COMPONENTS["wanda"].component_spec.outputs["model"].type == "system.Model@0.0.1"


def test_bad_parameter_fails_with_the_field_named(tmp_path):
    """The library entry point behind every intervention component validates like a spec does."""
    from shared.model_tasks import ParameterError, validated_params

    with pytest.raises(ParameterError, match=r"wanda: params\.sparsity: .*less than 1"):
        validated_params("wanda", {"sparsity": 1.5})
    with pytest.raises(ParameterError, match=r"gptq: params\.bogus: Extra inputs are not permitted"):
        validated_params("gptq", {"bogus": None})

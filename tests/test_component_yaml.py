"""Standalone component YAMLs (components/yaml/): up to date, faithful to the Python components, runnable.

The last test builds a pipeline from nothing but the loaded YAML files --
prepare_base, wanda, two evaluators -- and runs it with kfp.local, the way a
pipeline outside this project would reuse them.  (No ``from __future__ import
annotations`` here: KFP reads the pipeline function's annotations as types.)
"""

import dataclasses
import json
import math
from typing import NamedTuple

import pytest
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

    def sig(specs):
        return {k: (v.type, v.default if hasattr(v, "default") else None) for k, v in (specs or {}).items()}

    assert sig(got.inputs) == sig(want.inputs)
    assert sig(got.outputs) == sig(want.outputs)
    assert got.name == want.name
    assert got.implementation.container.image == "ghcr.io/lm-compose/lm-compose:0.1.0-cuda"
    # kfp's YAML round trip keeps the docstring's words, not its exact blank lines
    assert got.description.split() == want.description.split()
    assert dataclasses.replace(got, description=None) == dataclasses.replace(want, description=None)  # command, source


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")  # kfp.local on a non-"python" image name
def test_pipeline_of_loaded_yaml_components_runs_with_kfp_local(tmp_path, monkeypatch):
    """prepare_base -> wanda -> evaluate_perplexity, every task from a YAML file (each task ~8 s: imports torch)."""
    import kfp.local
    import torch
    from kfp import dsl
    from safetensors.torch import load_file

    from shared.data import DataConfig, ExperimentData
    from shared.execution import base_digest_in_store, model_key_for
    from shared.store import open_store

    def load(name):
        return load_component_from_file(str(DEFAULT_OUT / f"{name}.yaml"))

    prepare_base, wanda, evaluate_perplexity = load("prepare_base"), load("wanda"), load("evaluate_perplexity")

    model = "builtin:tiny-random"
    store_uri = str(tmp_path / "store")
    # steps: the JSON list of {method, params} from the base model to this one; the last one is applied
    steps = json.dumps([{"method": "wanda", "params": {"sparsity": 0.5, "num_calibration_samples": 4,
                                                       "calibration_seq_len": 32}}])
    data = DataConfig(num_edits=4).model_dump_json()
    options = json.dumps({"batch_size": 4, "limit": None, "max_length": 32, "dtype": "float32"})

    @dsl.pipeline(name="reuse-lm-compose-components")
    def reuse(store_uri: str, model_source: str) -> ReuseOutputs:
        base = prepare_base(store_uri=store_uri, model_source=model_source)
        pruned = wanda(store_uri=store_uri, base_digest=base.outputs["base_digest"],
                       parent_key=base.outputs["model_key"], steps=steps, data=data)
        # an evaluator names its model by source + steps, not by a task output: order it explicitly
        ppl = evaluate_perplexity(store_uri=store_uri, model_source=model_source, steps=steps, data=data,
                                  options=options).after(pruned)
        return ReuseOutputs(pruned.output, ppl.outputs["Output"])

    monkeypatch.setenv("LMCOMPOSE_EVAL_THREADS", "2")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-local"),
                   enable_caching=False)
    run = reuse(store_uri=store_uri, model_source=model)

    # the returned key is the checkpoint of exactly these steps, committed and intact
    key = run.outputs["model_key"]
    digest = base_digest_in_store(store_uri, model)
    assert key == model_key_for(digest, json.loads(steps), ExperimentData(DataConfig.model_validate_json(data)))
    folder, manifest = open_store(store_uri).get_checkpoint(key)  # verifies every file against the manifest
    assert [s["method"] for s in manifest["meta"]["steps"]] == ["wanda"]
    # wanda pruned half of every block projection
    weights = {}
    for shard in folder.glob("*.safetensors"):
        weights.update(load_file(str(shard)))
    projections = {k: w for k, w in weights.items() if ".layers." in k and k.endswith("proj.weight")}
    assert len(projections) >= 7  # q, k, v, o, gate, up, down of each block
    zeros = sum(int((w == 0).sum()) for w in projections.values())
    assert zeros / sum(w.numel() for w in projections.values()) == pytest.approx(0.5, abs=0.02)
    assert not torch.equal(next(iter(projections.values())), torch.zeros(1))
    perplexity = json.loads(run.outputs["perplexity"])["perplexity"]
    assert math.isfinite(perplexity) and perplexity > 1.0

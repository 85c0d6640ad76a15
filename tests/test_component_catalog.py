"""The component catalog (components/<category>/<name>/): up to date, one folder per component, valid metadata,
README examples that compile and run.

The examples are exec'd from the READMEs as a user would paste them (no ``from __future__ import annotations``
here or in them: KFP reads a pipeline function's annotations as types).  The kfp.local test runs one example per
category in one session with caching, so ``prepare_base`` runs once; every other example is compiled only (they
were all run once by hand when the catalog was written, see the commit message).
"""

import importlib
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from pipelines.component_catalog import (
    CATEGORIES,
    DEFAULT_OUT,
    DISPLAY_NAMES,
    HF_FOLDER,
    MARKER,
    REFERENCE,
    catalog_files,
    check,
    generate,
    main,
)
from pipelines.component_yaml import DEFAULT_OUT as YAML_DIR
from pipelines.component_yaml import all_components

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = all_components()
#: one example per category, run under kfp.local (export also covers compression's rtn output, cached)
RUN_EXAMPLES = ["prepare_base", "rtn", "ft", "ga", "evaluate", "export"]
REQUIRED_KEYS = {"name", "displayName", "category", "description", "stability", "image", "source", "dependencies",
                 "artifacts", "tags", "links"}


def _folders() -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for meta in sorted(DEFAULT_OUT.glob("*/*/metadata.yaml")):
        found.setdefault(meta.parent.name, []).append(meta.parent)
    return found


def _folder(name: str) -> Path:
    (folder,) = _folders()[name]
    return folder


def _example(name: str) -> str:
    readme = (_folder(name) / "README.md").read_text()
    match = re.search(r"^## Example\n.*?^```python\n(.*?)^```", readme, re.S | re.M)
    assert match, f"{name}: README.md has no python example under '## Example'"
    return match.group(1)


def _pipeline_of(name: str, code: str):
    namespace: dict = {}
    exec(compile(code, f"{name}/README.md", "exec", dont_inherit=True), namespace)
    return namespace[f"{name}_example"]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The catalog as the generator writes it now (one generation, in a clean interpreter), whatever the caller's env."""
    out = tmp_path_factory.mktemp("catalog")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMCOMPOSE_IMAGE_TAG", "9.9.9-not-the-default")  # the committed files name the default image
        paths = generate(out)
    return out, {p.relative_to(out).as_posix(): p.read_bytes() for p in paths}


def test_the_committed_catalog_is_up_to_date(fresh):
    """What `python -m pipelines.component_catalog --check` checks, against the one fresh generation."""
    _, files = fresh
    present = catalog_files(DEFAULT_OUT)
    assert sorted(set(files) - set(present)) == [], "missing; regenerate with: python -m pipelines.component_catalog"
    assert sorted(set(present) - set(files)) == [], "extra files in the catalog folders"
    stale = sorted(n for n in files if present[n] != files[n])
    assert stale == [], "stale; regenerate with: python -m pipelines.component_catalog"


def test_check_lists_stale_missing_and_extra_files_and_generate_repairs_only_its_own(fresh, monkeypatch, capsys):
    import pipelines.component_catalog as catalog

    out, files = fresh
    monkeypatch.setattr(catalog, "_render_clean", lambda tmp: dict(files))  # the same output, without a re-render
    assert check(out) == []
    (out / "unlearning/ga/README.md").write_bytes(files["unlearning/ga/README.md"] + b"edited\n")
    (out / "unlearning/gd/metadata.yaml").unlink()
    (out / "editing/mine").mkdir()
    (out / "editing/mine/notes.txt").write_text("not generated\n")
    retired = out / "editing/retired"  # a component that no longer exists: generated files only
    retired.mkdir()
    (retired / "README.md").write_text(f"<!-- {MARKER} -->\n")
    assert main(["--out", str(out), "--check"]) == 1
    assert capsys.readouterr().err.splitlines()[:4] == [
        f"missing: {out / 'unlearning/gd/metadata.yaml'}",
        f"stale: {out / 'unlearning/ga/README.md'}",
        f"extra (not in the catalog): {out / 'editing/mine/notes.txt'}",
        f"extra (not in the catalog): {out / 'editing/retired/README.md'}",
    ]
    assert main(["--out", str(out)]) == 0
    assert check(out) == [f"extra (not in the catalog): {out / 'editing/mine/notes.txt'}"]
    assert not retired.exists()  # removed with its folder; a file it did not write is left alone


def test_every_component_has_exactly_one_folder_in_its_category():
    from shared.interventions import get_intervention

    folders = _folders()
    assert sorted(folders) == sorted(COMPONENTS)
    assert all(len(paths) == 1 for paths in folders.values()), {n: p for n, p in folders.items() if len(p) > 1}
    by_registry = {"edit": "editing", "unlearn": "unlearning", "compress": "compression"}
    for name, comp in COMPONENTS.items():
        category = _folder(name).parent.name
        method = getattr(importlib.import_module(comp.python_func.__module__), "METHOD", None)
        if method:
            want = by_registry[get_intervention(method).category.value]
        elif name.startswith("evaluate") or name in ("aggregate", "collect_results"):
            want = "evaluation"
        else:
            want = "model"
        assert category == want, name
    assert {p.parent.name for paths in folders.values() for p in paths} == set(CATEGORIES)
    # the catalog's packages do not disturb component discovery (it imports them and finds nothing to register)
    from components import evaluator_components, intervention_components
    from shared.evaluation import available_evaluators
    from shared.interventions import available

    assert sorted(intervention_components()) == sorted(available())
    assert sorted(evaluator_components()) == available_evaluators()


def test_display_names_spell_the_methods_out():
    assert DISPLAY_NAMES["ft"] == "FT (constrained fine-tuning)"
    assert DISPLAY_NAMES["memit"] == "MEMIT (Mass-Editing Memory in a Transformer)"
    assert DISPLAY_NAMES["rmu"] == "RMU (Representation Misdirection for Unlearning)"
    assert DISPLAY_NAMES["ga"] == "GA (gradient ascent)" and DISPLAY_NAMES["rtn"] == "RTN (round-to-nearest quantization)"
    from shared.interventions import available

    for method in set(available()) - {"reproject"}:  # the method name stays, what it stands for follows
        assert re.fullmatch(r"\S+ \(.+\)", DISPLAY_NAMES[method]), method


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_metadata_is_valid_and_the_folder_holds_the_one_component(name):
    folder = _folder(name)
    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    assert REQUIRED_KEYS <= set(meta), REQUIRED_KEYS - set(meta)
    assert meta["name"] == name == folder.name and meta["category"] == folder.parent.name in CATEGORIES
    assert meta["displayName"] == DISPLAY_NAMES[name] and meta["description"].endswith(".")
    assert meta["stability"] in {"alpha", "beta", "stable"}
    compiled = (folder / "component.yaml").read_bytes()
    assert compiled == (YAML_DIR / f"{name}.yaml").read_bytes()  # the same compile as components/yaml
    (spec,) = [e for e in yaml.safe_load(compiled)["deploymentSpec"]["executors"].values()]
    assert meta["image"] == spec["container"]["image"] == "ghcr.io/lm-compose/lm-compose:0.1.0-cuda"
    assert meta["source"] == f"components/{name}.py" and (ROOT / meta["source"]).is_file()
    assert all((ROOT / path).is_file() for path in meta.get("library", []))
    assert meta["dependencies"]["kubeflow"][0]["name"] == "Pipelines"
    pins = _pins()
    python = {d["name"]: d["version"] for d in meta["dependencies"]["python"]}
    assert python["kfp"] == "2.17.0" and all(pins[n] == v for n, v in python.items())
    if name != "collect_results":
        assert {"torch", "transformers", "safetensors"} <= set(python)
    # what the Model artifacts hold
    artifacts = meta["artifacts"]
    models_in = {k: v["holds"] for k, v in artifacts["inputs"].items() if v["type"] == "Model"}
    models_out = {k: v["holds"] for k, v in artifacts["outputs"].items() if v["type"] == "Model"}
    assert all(set(h) <= {REFERENCE, HF_FOLDER} for h in [*models_in.values(), *models_out.values()])
    if name == "prepare_base":
        assert models_in == {"model": [HF_FOLDER, REFERENCE]} and artifacts["inputs"]["model"]["optional"]
    elif models_in:
        assert all(h == [REFERENCE, HF_FOLDER] for h in models_in.values())
    if name == "export":
        assert models_out == {"model": [HF_FOLDER]}
    elif models_out:
        assert models_out == {"model": [REFERENCE]}
    # the Python component is the one definition, re-exported
    module = importlib.import_module(f"components.{meta['category']}.{name}.component")
    package = importlib.import_module(f"components.{meta['category']}.{name}")
    assert getattr(module, name) is getattr(package, name) is COMPONENTS[name]
    # the README documents every input with its default
    readme = (folder / "README.md").read_text()
    assert readme.startswith(f"<!-- {MARKER} -->") and f"# {DISPLAY_NAMES[name]}" in readme
    for key, value in COMPONENTS[name].component_spec.inputs.items():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row, f"{name}: input {key} missing from README.md"
        if value.optional and value.default is not None:
            assert f"`{value.default!r}`".replace("|", "\\|") in row, row


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_readme_example_loads_component_yaml_files_and_compiles(name, tmp_path, monkeypatch):
    from kfp import compiler

    code = _example(name)
    loaded = re.findall(r'load_component_from_file\("(components/[^"]+/component\.yaml)"\)', code)
    assert f"components/{_folder(name).parent.name}/{name}/component.yaml" in loaded
    assert "builtin:tiny-random" in code or name == "aggregate"
    assert len(code.strip().splitlines()) <= (35 if name == "aggregate" else 18), "keep the example short"
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository root
    pipeline = _pipeline_of(name, code)
    out = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(pipeline, str(out))
    tasks = yaml.safe_load(out.read_text())["root"]["dag"]["tasks"]
    assert any(t["componentRef"]["name"] == f"comp-{name.replace('_', '-')}" for t in tasks.values())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")  # kfp.local on a non-"python" image name
def test_readme_examples_run_with_kfp_local(tmp_path, monkeypatch, tiny_dir):
    """One example per category, as pasted from its README, in one kfp.local session (prepare_base runs once).

    The examples name no store: ``$LMCOMPOSE_STORE`` points them at a fresh one.  ``$LMCOMPOSE_CACHE`` is left
    alone, so prepare_base finds the built-in tokenizer that ``tiny_dir`` cached (building it again in the task
    would cost ~15-30 s); nothing else of this test is written there.
    """
    import kfp.local

    monkeypatch.setenv("LMCOMPOSE_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LMCOMPOSE_EVAL_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    monkeypatch.chdir(ROOT)
    root = tmp_path / "kfp-local"
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=True)
    for name in RUN_EXAMPLES:
        _pipeline_of(name, _example(name))()

    outputs = {p.parent.name: p.parent for p in root.glob("*/*/executor_output.json")}
    assert {"prepare-base", "rtn", "ft", "ga", "evaluate", "export"} <= set(outputs)
    for task in ("prepare-base", "rtn", "ft", "ga"):
        ref = json.loads((outputs[task] / "model").read_text())
        assert ref["format"] == "lm-compose-model-ref/1" and ref["store"] == str(tmp_path / "store"), task
    folder = outputs["export"] / "model"  # a Hugging Face folder, pack-quantized from rtn's output
    assert (folder / "config.json").is_file() and (folder / "lm_compose.json").is_file()
    assert json.loads((folder / "lm_compose.json").read_text())["lm_compose"]["composition"] == "rtn"
    results = json.loads(json.loads((outputs["evaluate"] / "executor_output.json").read_text())
                         ["parameterValues"]["results"])
    assert set(results["criteria"]) == {"perplexity", "compression"}
    assert results["criteria"]["compression"]["avg_bits"] == 16.0  # the base model, unquantized

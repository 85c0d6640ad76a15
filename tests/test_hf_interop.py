"""Models in and out of lm-compose as Hugging Face folders; nothing stale or mismatched (issue 27).

* a folder is identified by its content: weights replaced in place are a new base model;
* a Hugging Face folder handed to an intervention is imported on the fly; anything else is refused in one line
  that names prepare_base;
* ``export_model`` writes a folder transformers loads, dense or pack-quantized, with the recipe in its metadata;
* the edit evaluator scores the edits the model received, and refuses another selection unless asked to.
"""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.model_tasks import (
    ParameterError,
    apply_to_model,
    evaluate_model,
    export_model,
    prepare_base_model,
    resolve_edit_selection,
)
from shared.store import open_store

TINY_FT = {"steps": 2, "layers": [0, 1]}
EVAL = {"batch_size": 4, "max_length": 32, "dtype": "float32"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache (the folder-digest index lives there) so tests never share fast-path entries."""
    monkeypatch.setenv("LMCOMPOSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def hf_folder(tmp_path, tiny_dir):
    """A user's own Hugging Face folder (a copy of the tiny random model)."""
    folder = tmp_path / "user-model"
    shutil.copytree(tiny_dir, folder)
    return folder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != "compression_state.safetensors":
            out.update(load_file(str(path)))
    return out


def _rewrite_in_place(folder: Path, scale: float) -> None:
    """Replace the weights file with scaled weights of the same size, and put its mtime back (a hostile fast path)."""
    path = folder / "model.safetensors"
    before = path.stat()
    tensors = load_file(str(path))
    name = sorted(k for k in tensors if k.endswith("down_proj.weight"))[0]
    tensors[name] = tensors[name] * scale
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def test_folder_identity_follows_content_not_path_or_mtime(tmp_path, cache, hf_folder):
    from shared.folder_identity import local_folder_identity

    first = local_folder_identity(hf_folder)
    assert local_folder_identity(hf_folder) == first  # the fast path gives the same answer
    assert (cache / "folder-digests").is_dir()
    copy = tmp_path / "elsewhere"
    shutil.copytree(hf_folder, copy)
    assert local_folder_identity(copy) == first  # the same content at another path is the same model
    _rewrite_in_place(hf_folder, 2.0)
    changed = local_folder_identity(hf_folder)
    assert changed != first  # same size, same mtime, other bytes: a new identity
    (hf_folder / ".hidden-editor-file").write_text("x")
    assert local_folder_identity(hf_folder) == changed  # hidden files are not part of a model


def test_prepare_base_after_weights_replaced_in_place_returns_the_new_weights(tmp_path, cache, hf_folder):
    store_uri = str(tmp_path / "store")
    old_ref, old_meta = prepare_base_model(str(hf_folder), store_uri)
    assert old_meta["base_source"] == str(hf_folder)
    _rewrite_in_place(hf_folder, 3.0)
    new_ref, new_meta = prepare_base_model(str(hf_folder), store_uri)
    assert new_ref.key != old_ref.key and new_meta["base_digest"] != old_meta["base_digest"]
    stored, _manifest = open_store(store_uri).get_checkpoint(new_ref.key)
    expected = _weights(hf_folder)
    got = _weights(stored)
    name = sorted(k for k in expected if k.endswith("down_proj.weight"))[0]
    assert torch.equal(got[name], expected[name])
    # the same content under another name is found, and the artifact names the source of this call
    copy = tmp_path / "copy"
    shutil.copytree(hf_folder, copy)
    again, meta = prepare_base_model(str(copy), store_uri)
    assert again == new_ref and meta["base_source"] == str(copy)


def test_hf_folder_as_intervention_input_is_imported_and_a_foreign_file_is_refused(tmp_path, cache, hf_folder, monkeypatch):
    from components.runtime import read_model
    from shared.model_ref import ModelRefError

    monkeypatch.setenv("LMCOMPOSE_STORE", str(tmp_path / "store"))
    ref = read_model(SimpleNamespace(path=str(hf_folder), uri="minio://bucket/run/model", metadata={}))
    direct, _ = prepare_base_model(str(hf_folder), str(tmp_path / "store"))
    assert ref == direct
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelRefError) as err:
        read_model(SimpleNamespace(path=str(junk), uri="x", metadata={}))
    assert "prepare_base" in str(err.value) and "\n" not in str(err.value)


def test_export_writes_a_folder_transformers_loads_with_the_recipe(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store_uri = str(tmp_path / "store")
    base, _ = prepare_base_model("builtin:tiny-random", store_uri)
    pruned, _ = apply_to_model(base, "wanda", {"sparsity": 0.5, "num_calibration_samples": 4, "calibration_seq_len": 32})
    meta = export_model(pruned, tmp_path / "out")
    assert meta["export_format"] == "dense" and meta["composition"] == "wanda"
    assert meta["steps"][0]["params"]["sparsity"] == 0.5 and meta["compression_method"] == "wanda"
    assert "key" not in meta and "lmcompose_format" not in meta  # a folder, not a reference
    assert not (tmp_path / "out" / "compression_state.safetensors").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    weight = model.model.layers[0].mlp.down_proj.weight
    assert 0.45 < float((weight == 0).float().mean()) < 0.55
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    provenance = json.loads((tmp_path / "out" / "lm_compose.json").read_text())
    assert provenance["lm_compose"]["exported_from_key"] == pruned.key
    with pytest.raises(ParameterError, match="pack-quantized.*not"):
        export_model(pruned, tmp_path / "out2", "pack-quantized")
    with pytest.raises(ParameterError, match="export_format"):
        export_model(pruned, tmp_path / "out3", "gguf")


@pytest.mark.slow
def test_export_of_a_quantized_model_is_pack_quantized(tmp_path, cache):
    from transformers import AutoModelForCausalLM

    store_uri = str(tmp_path / "store")
    base, _ = prepare_base_model("builtin:tiny-random", store_uri)
    quant, _ = apply_to_model(base, "rtn", {"bits": 4, "group_size": 32})
    meta = export_model(quant, tmp_path / "out")
    assert meta["export_format"] == "pack-quantized" and meta["compression_bits"] == 4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    # a later step moves the weights off their grid: auto writes it dense and says so; packing is refused
    edited, _ = apply_to_model(quant, "ft", TINY_FT, {"num_edits": 4})
    meta = export_model(edited, tmp_path / "dense")
    assert meta["export_format"] == "dense" and "grid" in meta["export_note"]
    with pytest.raises(ValueError, match="grid"):
        export_model(edited, tmp_path / "packed", "pack-quantized")


def test_edit_evaluation_follows_the_recipe_and_refuses_a_mismatch(tmp_path, cache):
    store_uri = str(tmp_path / "store")
    base, _ = prepare_base_model("builtin:tiny-random", store_uri)
    edited, _ = apply_to_model(base, "ft", TINY_FT, {"num_edits": 4, "edit_seed": 3})
    store = open_store(store_uri)
    unset = {"edits": None, "num_edits": None, "edit_seed": None, "edit_batch": None}
    resolved = resolve_edit_selection(store, edited, dict(unset))
    assert resolved["num_edits"] == 4 and resolved["edit_seed"] == 3 and resolved["edit_batch"] == 0
    assert resolve_edit_selection(store, edited, {**unset, "num_edits": 4})["num_edits"] == 4  # consistent: fine
    with pytest.raises(ParameterError) as err:
        evaluate_model(edited, ["edit"], {**unset, "num_edits": 10}, EVAL)
    message = str(err.value)
    assert "num_edits=10" in message and "num_edits=4" in message and "edits_from" in message and "\n" not in message
    with pytest.raises(ParameterError, match="edit_seed=0"):
        resolve_edit_selection(store, edited, {**unset, "edit_seed": 0})
    assert not list((Path(store_uri) / "results").glob("*.json")) if (Path(store_uri) / "results").exists() else True
    # on purpose: another selection is scored
    explicit = resolve_edit_selection(store, edited, {**unset, "num_edits": 10}, "explicit")
    assert explicit["num_edits"] == 10
    # a model never edited takes what it is given
    assert resolve_edit_selection(store, base, {**unset, "num_edits": 7})["num_edits"] == 7
    with pytest.raises(ParameterError, match="edits_from: must be one of"):
        resolve_edit_selection(store, edited, dict(unset), "whatever")
    scores = evaluate_model(edited, ["edit"], dict(unset), EVAL)
    applied = evaluate_model(edited, ["edit"], {**unset, "num_edits": 4, "edit_seed": 3, "edit_batch": 0}, EVAL)
    assert scores == applied  # the same stored result: the recipe's selection is the explicit one


def test_s3_model_folder_is_identified_by_content(tmp_path, cache, hf_folder, s3_uri):
    import boto3

    from shared.store_s3 import parse_s3_uri

    bucket, prefix = parse_s3_uri(s3_uri)
    client = boto3.client("s3")

    def upload() -> None:
        for path in sorted(hf_folder.iterdir()):
            client.upload_file(str(path), bucket, f"{prefix}/models/tiny/{path.name}")

    upload()
    source = f"{s3_uri}/models/tiny"
    store_uri = str(tmp_path / "store")
    from_s3, meta = prepare_base_model(source, store_uri)
    from_folder, _ = prepare_base_model(str(hf_folder), store_uri)
    assert from_s3 == from_folder and meta["base_source"] == source  # same content, same base model
    _rewrite_in_place(hf_folder, 0.5)
    upload()
    changed, _ = prepare_base_model(source, store_uri)
    assert changed != from_s3


@pytest.mark.slow
def test_user_pipeline_hf_folder_in_and_out_from_yaml_files_only(tmp_path, cache, hf_folder):
    """The docs/components.md example: a user's HF folder in, an HF folder out, lm-compose only through its YAMLs.

    The consumer is a plain third-party-style component (transformers only, no lm-compose import) that loads
    the exported folder with ``from_pretrained(model.path)`` and generates.
    """
    import kfp.local
    from kfp import dsl
    from kfp.components import load_component_from_file
    from kfp.dsl import Input, Model

    from pipelines.component_yaml import DEFAULT_OUT

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def generate(model: Input[Model], prompt: str) -> str:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lm = AutoModelForCausalLM.from_pretrained(model.path)
        tok = AutoTokenizer.from_pretrained(model.path)
        ids = tok(prompt, return_tensors="pt")
        out = lm.generate(**ids, max_new_tokens=4, do_sample=False)
        zeros = float((lm.model.layers[0].mlp.down_proj.weight == 0).float().mean())
        return f"{zeros:.3f}|{out.shape[1] - ids['input_ids'].shape[1]}"

    # --- the user's pipeline (docs/components.md): 11 lines ---
    load = lambda name: load_component_from_file(str(DEFAULT_OUT / f"{name}.yaml"))  # noqa: E731
    prepare_base, wanda, export = load("prepare_base"), load("wanda"), load("export")

    @dsl.pipeline(name="hf-in-hf-out")
    def hf_in_hf_out(folder: str, store: str) -> str:
        mine = dsl.importer(artifact_uri=folder, artifact_class=Model, reimport=False)
        base = prepare_base(model=mine.output, store_uri=store)
        pruned = wanda(model=base.outputs["model"], sparsity=0.5, num_calibration_samples=4, calibration_seq_len=32)
        folder_out = export(model=pruned.outputs["model"])
        return generate(model=folder_out.outputs["model"], prompt="The capital of France is").output
    # --- end of the user's pipeline ---

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
                   enable_caching=False)
    run = hf_in_hf_out(folder=str(hf_folder), store=str(tmp_path / "store"))
    zeros, new_tokens = run.output.split("|")
    assert 0.45 < float(zeros) < 0.55 and int(new_tokens) == 4
    exported = [p for p in (tmp_path / "root").rglob("model") if p.is_dir() and (p / "config.json").is_file()]
    assert len(exported) == 1 and (exported[0] / "lm_compose.json").is_file()
    provenance = json.loads((exported[0] / "lm_compose.json").read_text())["lm_compose"]
    assert provenance["composition"] == "wanda" and provenance["base_source"].endswith("user-model")


def test_a_forged_reference_file_is_refused_not_replaced_by_the_metadata(tmp_path):
    from components.runtime import read_model
    from shared.model_ref import ModelRef, ModelRefError

    real, forged = ModelRef(str(tmp_path / "store"), "ckpt/" + "a" * 40), ModelRef(str(tmp_path / "store"), "ckpt/" + "b" * 40)
    meta = {"lmcompose_format": "lm-compose-model-ref/1", "store": real.store_uri, "key": real.key}
    path = tmp_path / "model"
    real.write(path)
    assert read_model(SimpleNamespace(path=str(path), uri="u", metadata=meta)) == real
    forged.write(path)
    with pytest.raises(ModelRefError, match="altered"):
        read_model(SimpleNamespace(path=str(path), uri="u", metadata=meta))
    path.write_text("{not json")
    with pytest.raises(ModelRefError, match="not JSON"):  # a corrupt file is not silently replaced either
        read_model(SimpleNamespace(path=str(path), uri="u", metadata=meta))
    path.unlink()
    assert read_model(SimpleNamespace(path=str(path), uri="u", metadata=meta)) == real  # file not kept: metadata


def test_a_base_folder_with_nan_weights_is_refused_and_nothing_stored(tmp_path, cache, hf_folder):
    from shared.finite import NonFiniteError

    path = hf_folder / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(k for k in tensors if k.endswith("down_proj.weight"))[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    store = tmp_path / "store"
    with pytest.raises(NonFiniteError, match=r"base model .* is not finite: .*down_proj.*nothing stored"):
        prepare_base_model(str(hf_folder), str(store))
    assert not list(store.rglob("manifest.json")) and not list(store.rglob("alias/*.json"))

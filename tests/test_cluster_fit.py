"""Compiled runs fit the model, and cluster mistakes fail at once naming their cause (issue 27, items 5 and 6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.cluster import SMALL_MODEL_PARAMETERS, merge_cluster, sized_resources
from shared.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pipelines" / "experiments" / "demo.yaml"
SPEC = {"name": "fit", "model": "builtin:smollm2-135m", "interventions": [{"method": "wanda"}]}


def _gi(quantity: str) -> float:
    return float(quantity.removesuffix("Gi"))


def _compiled_tasks(tmp_path: Path, argv_extra: list[str], spec: Path = DEMO) -> list[dict]:
    from pipelines.cli import main

    out = tmp_path / "demo.yaml"
    assert main(["compile", str(spec), "-o", str(out), *argv_extra]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    return [e["container"] for e in docs[0]["deploymentSpec"]["executors"].values()]


def test_the_compiled_demo_requests_cpu_nodes_and_a_few_gi(tmp_path):
    containers = _compiled_tasks(tmp_path, ["--store", "s3://bucket/demo"])
    assert containers
    for container in containers:
        resources = container.get("resources", {})
        assert "accelerator" not in resources, container
        assert _gi(resources["resourceMemoryLimit"]) <= 8 and float(resources["cpuLimit"]) <= 4
        assert container["image"].endswith("-cpu")


def test_sizing_follows_the_parameter_count_and_the_accelerator_choice():
    small = sized_resources(134_515_008)
    assert not any(r.uses_gpu for r in small.values())
    assert _gi(small["unlearn"].memory) >= _gi(small["evaluate"].memory) >= 2
    one_b = sized_resources(SMALL_MODEL_PARAMETERS)
    assert one_b["edit"].uses_gpu and one_b["edit"].memory == "64Gi"
    assert sized_resources(None)["unlearn"].uses_gpu  # unknown size: sized as a large model
    assert all(r.uses_gpu for k, r in sized_resources(134_515_008, "gpu").items() if k in ("edit", "evaluate"))
    assert not any(r.uses_gpu for r in sized_resources(8_000_000_000, "none").values())
    # a hub model: its size from the spec; accelerator: none removes GPUs a placement file asked for
    hub = {**SPEC, "model": "hf:meta-llama/Meta-Llama-3-8B"}
    assert parse_spec(hub).cluster_config().resources_for("ft", "edit").uses_gpu
    sized = parse_spec({**hub, "cluster": {"model_parameters": 360_000_000}}).cluster_config()
    assert not sized.resources_for("ft", "edit").uses_gpu
    placement = {"resources": {"ft": {"accelerator_count": 2}}}
    cpu_only = parse_spec({**hub, "cluster": {"accelerator": "none"}}).cluster_config(placement)
    assert not any(cpu_only.resources_for(t, "edit").uses_gpu for t in ("ft", "memit", "edit", "default"))


def test_a_local_folder_is_sized_from_its_safetensors_headers(tiny_dir):
    from shared.models import known_num_parameters, load_model

    model, _tok = load_model(tiny_dir)
    assert known_num_parameters(str(tiny_dir)) == sum(p.numel() for p in model.parameters())
    assert not merge_cluster(num_parameters=known_num_parameters(str(tiny_dir))).resources_for("ft", "edit").uses_gpu


@pytest.mark.parametrize("bad, field", [({"accelerator": "tpu"}, "cluster.accelerator"),
                                        ({"model_parameters": 0}, "cluster.model_parameters")])
def test_bad_accelerator_or_size_names_the_field(bad, field):
    from shared.spec import SpecError

    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec({**SPEC, "cluster": bad})


def test_compile_without_an_s3_store_is_refused_unless_asked_for(tmp_path, capsys, monkeypatch):
    from pipelines.cli import main

    monkeypatch.delenv("LMCOMPOSE_STORE", raising=False)
    assert main(["compile", str(DEMO), "-o", str(tmp_path / "a.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--store s3://" in err and "--local-store" in err
    assert not (tmp_path / "a.yaml").exists()
    assert main(["compile", str(DEMO), "-o", str(tmp_path / "b.yaml"), "--store", str(tmp_path / "store"),
                 "--local-store"]) == 0
    text = (tmp_path / "b.yaml").read_text()
    assert "LMCOMPOSE_ALLOW_LOCAL_STORE" in text  # the tasks accept the folder every pod mounts


def test_a_task_in_a_pod_refuses_a_local_store_at_start(tmp_path, monkeypatch):
    from shared.model_ref import ModelRef
    from shared.model_tasks import ParameterError, apply_to_model, evaluate_model, prepare_base_model

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.delenv("LMCOMPOSE_ALLOW_LOCAL_STORE", raising=False)
    store = str(tmp_path / "store")
    for call in (lambda: prepare_base_model("builtin:tiny-random", store),
                 lambda: apply_to_model(ModelRef(store, "ckpt/0000"), "wanda", {}),
                 lambda: evaluate_model(ModelRef(store, "ckpt/0000"), ["perplexity"])):
        with pytest.raises(ParameterError) as err:
            call()
        assert "s3://" in str(err.value) and "Kubernetes pod" in str(err.value) and "\n" not in str(err.value)
    assert not Path(store).exists()  # refused before anything was written


def test_checkpoint_not_found_names_the_likely_causes(tmp_path):
    from shared.store import CheckpointNotFound, open_store

    with pytest.raises(CheckpointNotFound) as err:
        open_store(str(tmp_path / "store")).get_checkpoint("ckpt/" + "0" * 40)
    message = str(err.value)
    assert "set_caching_options(False)" in message and "s3://" in message and "\n" not in message

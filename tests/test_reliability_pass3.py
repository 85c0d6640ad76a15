"""Reliability, third pass (issue 28): the base model is prepared once, reading never creates, strict inputs."""

from __future__ import annotations

import threading

import pytest


def test_two_concurrent_runs_prepare_the_base_model_once(tmp_path, monkeypatch):
    import shared.models as models
    from shared.execution import prepare_base

    monkeypatch.setenv("LMCOMPOSE_LEASE_POLL", "0.2")
    calls = []
    real = models.materialize_base

    def counting(source, dest):
        calls.append(source)
        return real(source, dest)

    monkeypatch.setattr(models, "materialize_base", counting)
    store = str(tmp_path / "store")
    results: list = []
    errors: list = []

    def run() -> None:
        try:
            results.append(prepare_base(store, "builtin:tiny-random"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 2 and results[0] == results[1]
    assert calls == ["builtin:tiny-random"]  # the second run waited on the lease and found the first's checkpoint


def test_reading_a_reference_to_a_missing_store_creates_nothing(tmp_path):
    from shared.model_ref import ModelRef
    from shared.model_tasks import apply_to_model, evaluate_model
    from shared.store import CheckpointNotFound

    missing = tmp_path / "no-such-store"
    ref = ModelRef(str(missing), "ckpt/" + "0" * 40)
    with pytest.raises(CheckpointNotFound):
        evaluate_model(ref, ["perplexity"])
    with pytest.raises(CheckpointNotFound):
        apply_to_model(ref, "wanda", {})
    assert not missing.exists()  # neither the folder nor its leases/


def test_a_store_that_cannot_be_written_fails_before_any_task(tmp_path, capsys):
    """Root ignores file modes, so the store lies under a regular file: no folder can be made there."""
    import yaml

    from pipelines.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "ro", "model": "builtin:tiny-random",
                                    "interventions": [{"method": "wanda"}],
                                    "evaluation": {"evaluators": ["compression"]}}))
    rc = main(["run", str(spec), "--store", str(blocker / "store"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert any("is not writable" in line for line in err), err
    assert not (tmp_path / "out" / "kfp-local").exists() or not any((tmp_path / "out" / "kfp-local").iterdir())


SPEC = {"name": "caps", "model": "builtin:tiny-random", "interventions": [{"method": "wanda"}]}


def test_the_composition_cap_counts_every_model_and_the_models_are_capped():
    from shared.spec import SpecError, parse_spec

    sweep = {"method": "wanda", "sweep": {"sparsity": [round(0.01 * i, 2) for i in range(1, 41)]}}
    one = {k: v for k, v in SPEC.items() if k != "model"}
    models = [{"source": "builtin:tiny-random", "label": f"m{i}"} for i in range(3)]
    many = {**one, "interventions": [sweep], "models": models[:2], "compositions": {"max_compositions": 100}}
    parse_spec(many)  # 2 models x 41 compositions: fine
    with pytest.raises(SpecError, match=r"compositions\.max_compositions: .* 123 compositions \(3 models x 41"):
        parse_spec({**many, "models": models})
    with pytest.raises(SpecError, match=r"models: .*at most 16"):
        parse_spec({**one, "models": [{"source": "builtin:tiny-random", "label": f"m{i}"} for i in range(50)]})
    with pytest.raises(SpecError, match=r"compositions\.max_compositions"):
        parse_spec({**SPEC, "compositions": {"max_compositions": 10**9}})


@pytest.mark.parametrize("value", ["yes", "true", 1, "1"])
def test_booleans_are_strict(value):
    from shared.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="trust_remote_code"):
        parse_spec({**SPEC, "trust_remote_code": value})
    with pytest.raises(SpecError, match="include_base"):
        parse_spec({**SPEC, "compositions": {"include_base": value}})

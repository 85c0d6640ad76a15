"""Errors that belong before compute: found when the spec is read or the run starts, naming the field."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shared.data import DataError
from shared.spec import SpecError, parse_spec
from tests.s3server import free_ports

BASE = {"name": "early", "model": "builtin:tiny-random",
        "interventions": [{"method": "wanda", "params": {"num_calibration_samples": 4}}]}


def test_default_layers_that_the_model_lacks_fail_at_validation():
    with pytest.raises(SpecError, match=r"interventions\[0\]\.params\.layers: ft layers \[2, 3, 4, 5, 6\] out of range: "
                                        r"the model has 4 layers \(0\.\.3\) \(the default\)"):
        parse_spec({**BASE, "interventions": [{"method": "ft"}]})
    with pytest.raises(SpecError, match=r"interventions\[0\]\.sweep\.layer: .*out of range"):
        parse_spec({**BASE, "interventions": [{"method": "rmu", "sweep": {"layer": [2, 7]}}]})
    parse_spec({**BASE, "interventions": [{"method": "ft", "params": {"layers": [1, 2]}}]})  # fits: accepted


def test_unknown_top_level_key_is_named_with_a_suggestion():
    raw = {k: v for k, v in BASE.items() if k != "interventions"}
    with pytest.raises(SpecError, match=r"^interventons: unknown key \(did you mean 'interventions'\?\)$"):
        parse_spec({**raw, "interventons": BASE["interventions"]})
    with pytest.raises(SpecError, match=r"^evaluation\.batchsize: unknown key \(did you mean 'batch_size'\?\)$"):
        parse_spec({**BASE, "evaluation": {"batchsize": 4}})


def test_missing_local_model_folder_fails_at_validation(tmp_path: Path):
    with pytest.raises(SpecError, match=r"model: local model folder .*/nope does not exist"):
        parse_spec({**BASE, "model": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"model: .*empty is not a Hugging Face model folder \(no config.json"):
        parse_spec({**BASE, "model": str(tmp_path / "empty")})


def test_data_path_that_is_a_directory_is_named_so(tmp_path: Path):
    with pytest.raises(SpecError, match=r"is a directory; expected a JSON-lines file"):
        parse_spec({**BASE, "data": {"calibration": str(tmp_path)}})


def test_hub_model_without_network_fails_before_any_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pipelines.local import check_model_reachable

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(DataError, match=r"model: hf:org/model is neither in the store nor in the local hub cache, "
                                        r"and the hub \(127\.0\.0\.1\) cannot be reached"):
        check_model_reachable("hf:org/model", str(tmp_path / "store"))
    assert time.monotonic() - started < 15
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):
        check_model_reachable("hf:org/model", str(tmp_path / "store"))
    check_model_reachable("builtin:tiny-random", str(tmp_path / "store"))  # no network needed: no error


def test_plan_size_is_limited_with_a_clear_message():
    from shared.planner import build_plan

    sweep = [round(i / 10001, 6) for i in range(1, 5001)]
    started = time.monotonic()
    with pytest.raises(SpecError, match=r"^compositions\.max_compositions: the spec expands into 5001 compositions"):
        parse_spec({**BASE, "interventions": [{"method": "wanda", "sweep": {"sparsity": sweep}}]})
    assert time.monotonic() - started < 5  # refused before any expansion
    # the count is exact: the limit can be raised, and the planner agrees with it
    raw = {**BASE, "compositions": {"max_compositions": 40},
           "interventions": [{"method": "wanda", "sweep": {"sparsity": sweep[:12]}},
                             {"method": "ft", "params": {"layers": [1]}}]}
    spec = parse_spec(raw)
    assert spec.composition_count() == len(build_plan(spec).compositions) == 1 + 12 + 1 + 12 + 12
    with pytest.raises(SpecError, match="expands into 38 compositions"):
        parse_spec({**raw, "compositions": {"max_compositions": 37}})

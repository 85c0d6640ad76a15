"""Non-finite parameters, weights and scores (issue 28, item 1): refused with one line, nothing committed.

Parameters bounded only from below once accepted ``inf`` or ``1e308``: ``ft
weight_decay=inf``, ``memit mom2_update_weight=inf`` and ``rmu alpha`` /
``steering_coeff`` of ``inf`` or ``1e308`` committed NaN weights, and a spec
with ``rmu alpha: 1.0e+308`` ended rc=0 with a report scoring the NaN model.
Now every numeric parameter is finite and bounded (validation names the
field: library, component, spec); a step whose output is not finite fails
naming the method and its parameters and commits nothing; an evaluator
refuses a non-finite model or score and stores nothing.  docs/fault-injection.md
lists the measured messages.
"""

import json
import math
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from shared.interventions import available, get_intervention

#: the issue's cases: (method, field, value)
ISSUE_CASES = [
    ("ft", "weight_decay", math.inf),
    ("memit", "mom2_update_weight", math.inf),
    ("rmu", "alpha", 1e308),
    ("rmu", "alpha", math.inf),
    ("rmu", "steering_coeff", math.inf),
    ("rmu", "steering_coeff", 1e308),
]
EVAL = {"batch_size": 4, "max_length": 32, "dtype": "float32"}


def store_files(root: Path) -> dict[str, int]:
    """Every file under a local store with its size (what "the store is unchanged" compares)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory):
    """A local store holding the tiny random base model: ``(store root, its ModelRef)``."""
    from shared.model_tasks import prepare_base_model

    from shared.store import open_store

    root = tmp_path_factory.mktemp("nonfinite-store") / "store"
    ref, _ = prepare_base_model("builtin:tiny-random", str(root))
    open_store(str(root)).get_checkpoint(ref.key)  # verified once: its stamp is written now, not by a test
    return root, ref


def _is_float_field(annotation: typing.Any) -> bool:
    if annotation is float:
        return True
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and float in typing.get_args(annotation)


def _is_int_field(annotation: typing.Any) -> bool:
    if annotation is int:
        return True
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and int in typing.get_args(annotation)


# ---------------------------------------------------------------- parameters: the library


def test_every_numeric_parameter_of_every_method_is_finite_and_bounded():
    """No float parameter accepts inf, -inf, nan, 'inf' or 1e308; no int accepts 10**19 or 10**30; each error names the field."""
    checked = []
    for name, method in available().items():
        for field, info in method.params_model.model_fields.items():
            if _is_float_field(info.annotation):
                values = [math.inf, -math.inf, math.nan, "inf", "nan", 1e308, -1e308]
            elif _is_int_field(info.annotation) and field != "bits":  # bits: a fixed set per method
                values = [10**19, 10**30, -(10**30), math.inf]
            else:
                continue
            for value in values:
                with pytest.raises(ValidationError) as exc:
                    method.parse_params({field: value})
                assert exc.value.errors()[0]["loc"] == (field,), (name, field, value)
            checked.append(f"{name}.{field}")
    assert {"ft.weight_decay", "memit.mom2_update_weight", "rmu.alpha", "rmu.steering_coeff", "ft.seed",
            "memit.stats_tokens", "alphaedit.l2", "autoround.lr"} <= set(checked)

    # the bounds are generous: every shipped spec (paper settings included) and every default passes
    from shared.spec import load_spec

    specs = sorted((Path(__file__).resolve().parents[1] / "pipelines" / "experiments").rglob("*.yaml"))
    assert len(specs) >= 10
    for path in specs:
        load_spec(path, check_data=False, fetch_remote=False)
    for method in available().values():
        method.parse_params({})
    # the largest values the repo's specs and tests use
    get_intervention("memit").parse_params({"mom2_update_weight": 15000, "stats_tokens": 25_600_000})
    get_intervention("rmu").parse_params({"steering_coeff": 300, "alpha": 1200})
    get_intervention("ft").parse_params({"stop_loss": 1e6, "weight_decay": 0.01})


@pytest.mark.parametrize(("method", "field", "value"), ISSUE_CASES)
def test_issue_cases_are_refused_naming_the_field(method, field, value):
    from shared.model_tasks import ParameterError, validated_params

    with pytest.raises(ParameterError) as exc:
        validated_params(method, {field: value})
    message = str(exc.value)
    assert message.startswith(f"{method}: params.{field}: ") and "\n" not in message
    expected = "Input should be a finite number" if math.isinf(value) else "Input should be less than or equal to"
    assert expected in message


def test_apply_to_model_refuses_them_before_anything_is_stored(tiny_store):
    from shared.model_tasks import ParameterError, apply_to_model

    root, base = tiny_store
    before = store_files(root)
    for method, field, value in ISSUE_CASES:
        with pytest.raises(ParameterError, match=rf"^{method}: params\.{field}: "):
            apply_to_model(base, method, {field: value})
    assert store_files(root) == before


# ---------------------------------------------------------------- parameters: a component


class _Artifact:
    """What a component receives as its input Model (never read here: parameters are checked first)."""

    path = "/nonexistent/model"
    uri = "/nonexistent/model"
    metadata: dict = {}


@pytest.mark.parametrize(("method", "field", "value"), ISSUE_CASES)
def test_component_functions_refuse_them_before_reading_the_model(method, field, value):
    """The function KFP ships to the container, called as the container calls it (inf cannot cross KFP's protobuf)."""
    from components import intervention_components
    from shared.model_tasks import ParameterError

    component = intervention_components()[method]
    with pytest.raises(ParameterError, match=rf"^{method}: params\.{field}: "):
        component.python_func(model=_Artifact(), **{field: value})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_rmu_component_with_alpha_1e308_fails_in_kfp_local_with_one_line(tiny_store, tmp_path, capfd):
    import kfp.local
    from kfp import dsl
    from kfp.dsl import Model

    from components import intervention_components

    rmu = intervention_components()["rmu"]
    root, base = tiny_store
    base.write(tmp_path / "base-ref")
    before = store_files(root)

    @dsl.pipeline(name="nonfinite-rmu")
    def pipeline(ref: str):
        model = dsl.importer(artifact_uri=ref, artifact_class=Model, reimport=False)
        rmu(model=model.output, alpha=1e308, layer=2, num_batches=2, batch_size=2, seq_len=32)

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
                   enable_caching=False)
    with pytest.raises(RuntimeError, match="Inner task failed"):
        pipeline(ref=str(tmp_path / "base-ref"))
    out = capfd.readouterr()
    line = "shared.model_tasks.ParameterError: rmu: params.alpha: Input should be less than or equal to 1000000 (got 1e+308)"
    assert line in out.out + out.err
    assert store_files(root) == before


# ---------------------------------------------------------------- parameters: a spec through the CLI

SPEC = {
    "name": "nonfinite",
    "model": "builtin:tiny-random",
    "interventions": [{"method": "rmu", "params": {"layer": 2, "num_batches": 2, "batch_size": 2, "seq_len": 32}}],
    "compositions": {"include_base": False},
    "evaluation": {"evaluators": ["forget", "perplexity"], "batch_size": 4},
}
#: the issue's spec: rmu with ``alpha`` written as YAML text (``1.0e+308`` is a float to YAML, ``1e308`` a string)
SPEC_TEXT = """\
name: nonfinite
model: builtin:tiny-random
interventions:
  - method: rmu
    params: {{layer: 2, alpha: {alpha}, num_batches: 2, batch_size: 2, seq_len: 32}}
compositions: {{include_base: false}}
evaluation: {{evaluators: [forget, perplexity], batch_size: 4}}
"""


def _spec_text(alpha_yaml: str = "1.0", extra: str = "") -> str:
    return SPEC_TEXT.format(alpha=alpha_yaml) + extra


@pytest.mark.parametrize(
    ("alpha_yaml", "extra", "expected"),
    [
        ("1.0e+308", "", "interventions[0].params.alpha: Input should be less than or equal to 1000000 (got 1e+308)"),
        ("1e308", "", "interventions[0].params.alpha: Input should be less than or equal to 1000000 (got '1e308')"),
        (".inf", "", "interventions[0].params.alpha: inf is not a finite number (inf and nan are never valid settings)"),
        ("inf", "", "interventions[0].params.alpha: Input should be a finite number (got 'inf')"),
        (".nan", "", "interventions[0].params.alpha: nan is not a finite number (inf and nan are never valid settings)"),
        ("1.0", "cluster: {timeout_hours: inf}\n",
         "cluster.timeout_hours: inf is not a finite number (inf and nan are never valid settings)"),
        ("1.0", "data: {edit_seed: 100000000000000000000}\n",
         "data.edit_seed: 100000000000000000000 is out of range: a number in a spec must be at most 1e+15 in magnitude"),
    ],
)
def test_spec_with_a_nonfinite_or_absurd_number_exits_2_with_one_line(tmp_path, capsys, alpha_yaml, extra, expected):
    from pipelines.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(_spec_text(alpha_yaml, extra))
    assert main(["plan", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {expected}\n"


def test_spec_sweep_value_inf_is_refused_naming_its_index(tmp_path, capsys):
    from pipelines.cli import main

    raw = json.loads(json.dumps(SPEC))
    raw["interventions"][0]["sweep"] = {"steering_coeff": [10.0, math.inf]}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))  # PyYAML writes .inf
    assert main(["plan", str(spec)]) == 2
    assert capsys.readouterr().err == (
        "error: interventions[0].sweep.steering_coeff[1]: inf is not a finite number (inf and nan are never valid settings)\n")


@pytest.mark.parametrize("alpha_yaml", ["1.0e+308", ".inf"])
def test_compile_and_run_refuse_the_spec_before_anything_runs(tiny_store, tmp_path, capsys, alpha_yaml):
    """compile crashed in protobuf on .inf; run ended rc=0 with a report of the NaN model (1e308). Now: exit 2, one line."""
    from pipelines.cli import main

    root, _ = tiny_store
    before = store_files(root)
    spec = tmp_path / "spec.yaml"
    spec.write_text(_spec_text(alpha_yaml))
    compiled = tmp_path / "compiled.yaml"
    assert main(["compile", str(spec), "-o", str(compiled), "--store", "s3://bucket/nonfinite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: interventions[0].params.alpha: ") and err.count("\n") == 1
    assert not compiled.exists()
    out = tmp_path / "out"
    assert main(["run", str(spec), "--store", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: interventions[0].params.alpha: ") and err.count("\n") == 1
    assert not out.exists() and store_files(root) == before


# ---------------------------------------------------------------- the commit guard


@pytest.fixture
def poisoned_rtn(monkeypatch):
    """RTN as it is, then a NaN written into one weight: a step whose output is not finite."""
    import torch

    rtn = get_intervention("rtn")
    original = type(rtn).apply

    def apply(self, model, tokenizer, params, data, **kwargs):
        record = original(self, model, tokenizer, params, data, **kwargs)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        return record

    monkeypatch.setattr(type(rtn), "apply", apply)
    return rtn


def test_a_step_with_nonfinite_output_fails_naming_method_and_params_and_commits_nothing(tiny_store, poisoned_rtn):
    from shared.execution import run_step
    from shared.finite import NonFiniteError
    from shared.model_tasks import apply_to_model
    from shared.store import open_store

    root, base = tiny_store
    before = store_files(root)
    with pytest.raises(NonFiniteError) as exc:
        apply_to_model(base, "rtn", {"bits": 4, "group_size": 32})
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith('rtn with params {"bits": 4, "group_size": 32, "symmetric": true} on ckpt/')
    assert message.endswith("made the weights non-finite: 1 tensor(s) hold nan/inf: "
                            "model.layers.1.mlp.down_proj.weight (1 nan of 8192 values); nothing committed")
    assert store_files(root) == before

    # the pipeline's entry point goes through the same guard
    base_digest = open_store(str(root)).checkpoint_meta(base.key)["model_digest"]
    steps = json.dumps([{"method": "rtn", "params": {"bits": 4, "group_size": 32}}])
    with pytest.raises(NonFiniteError, match="made the weights non-finite"):
        run_step(str(root), base_digest, steps, json.dumps({}), base.key)
    assert store_files(root) == before


def test_the_issues_rmu_alpha_1e308_with_validation_bypassed_is_caught_by_the_commit_guard(tiny_store, monkeypatch):
    """Defence in depth: were a bound ever missing, RMU's real NaN output (alpha=1e308) is still not committed."""
    from shared.data import ExperimentData
    from shared.execution import apply_step
    from shared.finite import NonFiniteError
    from shared.store import open_store

    root, base = tiny_store
    before = store_files(root)
    rmu = get_intervention("rmu")
    model_cls = rmu.params_model

    def unvalidated(self, raw):  # what the code did before the bounds: alpha taken as given
        raw = dict(raw or {})
        alpha = raw.pop("alpha")
        return model_cls.model_construct(**{**model_cls.model_validate(raw).model_dump(), "alpha": alpha})

    monkeypatch.setattr(type(rmu), "parse_params", unvalidated)
    params = {"layer": 2, "num_batches": 2, "batch_size": 2, "seq_len": 32, "alpha": 1e308}
    keyed = [{"method": "rmu", "version": rmu.version, "params": {**params, "alpha": "1e308"}, "data": {}}]
    store = open_store(str(root))
    with pytest.raises(NonFiniteError) as exc:
        apply_step(store, store.checkpoint_meta(base.key)["model_digest"], base.key, keyed,
                   {"method": "rmu", "params": params}, ExperimentData())
    message = str(exc.value)
    assert message.startswith('rmu with params {"adam_eps": 1e-06, ') and '"alpha": 1e+308, "batch_size": 2, ' in message
    assert f"}} on {base.key} made the weights non-finite" in message
    assert ("made the weights non-finite: 3 tensor(s) hold nan/inf: model.layers.0.mlp.down_proj.weight "
            "(8192 nan of 8192 values)") in message
    assert message.endswith("and 1 more tensor(s); nothing committed") and "\n" not in message
    assert store_files(root) == before


def test_a_nonfinite_tensor_cache_entry_is_not_stored(tmp_path):
    import torch

    from shared.cache import cached_tensors
    from shared.finite import NonFiniteError
    from shared.store import open_store

    store = open_store(str(tmp_path / "store"))
    before = store_files(tmp_path / "store")
    with pytest.raises(NonFiniteError, match=r"^cache memit-key-cov of model 0123456789ab .*1 tensor\(s\) hold nan/inf: "
                                             r"cov \(1 inf of 4 values\); nothing cached$"):
        cached_tensors(store, "memit-key-cov", "0123456789abcdef", {"layer": 1},
                       lambda: {"cov": torch.tensor([1.0, 2.0, math.inf, 3.0]), "n": torch.tensor([4])})
    assert store_files(tmp_path / "store") == before


# ---------------------------------------------------------------- evaluators


@pytest.fixture(scope="module")
def nan_model_store(tmp_path_factory: pytest.TempPathFactory):
    """A store whose only checkpoint is a tiny base model with one NaN weight (as an old store might hold)."""
    import torch

    from shared.model_ref import ModelRef
    from shared.models import BUILTIN_TINY, load_model, materialize_base, save_model
    from shared.store import checkpoint_key, open_store

    tmp = tmp_path_factory.mktemp("nan-model")
    materialize_base(BUILTIN_TINY, tmp / "clean")
    model, tokenizer = load_model(tmp / "clean")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3, 5] = float("nan")
    save_model(model, tokenizer, tmp / "nan")
    root = tmp / "store"
    key = checkpoint_key("nan-base", [])
    store = open_store(str(root))
    store.put_checkpoint(key, tmp / "nan", {"source": "test:nan", "model_digest": "nan-base", "steps": [], "records": []})
    store.get_checkpoint(key)  # verified once: its stamp is written now, not by a test
    return root, ModelRef(str(root), key)


def test_evaluators_refuse_a_nonfinite_model_in_one_line_and_store_nothing(nan_model_store):
    from shared.finite import NonFiniteError
    from shared.model_tasks import evaluate_model

    root, ref = nan_model_store
    before = store_files(root)
    with pytest.raises(NonFiniteError) as exc:
        evaluate_model(ref, ["perplexity", "forget"], {}, EVAL)
    assert str(exc.value) == (
        f"perplexity, forget: model {ref.key} is not finite: 1 tensor(s) hold nan/inf: "
        "model.layers.0.self_attn.q_proj.weight (1 nan of 4096 values); refusing to evaluate it; nothing stored")
    assert store_files(root) == before


def test_an_evaluator_returning_a_nonfinite_score_is_refused_and_nothing_is_stored(tiny_store, monkeypatch):
    import shared.evaluation as evaluation
    from shared.item_scores import ItemScores, Scores
    from shared.model_tasks import evaluate_model

    root, base = tiny_store
    before = store_files(root)
    monkeypatch.setitem(evaluation.EVALUATORS, "compression",
                        lambda *a, **k: {"sparsity": math.nan, "avg_bits": 16.0})
    with pytest.raises(ValueError) as exc:
        evaluate_model(base, ["compression"], {}, EVAL)
    assert str(exc.value) == (f"compression: criterion 'sparsity' is nan on {base.key}, not a finite score; "
                              "nothing stored")
    # per-item scores: an infinite document NLL (the perplexity evaluator's items)
    items = ItemScores.of([1.0, math.inf], weights=[3, 4], transform="exp")
    monkeypatch.setitem(evaluation.EVALUATORS, "perplexity",
                        lambda *a, **k: Scores({"perplexity": 5.0}, {"perplexity": items}))
    with pytest.raises(ValueError, match=r"^perplexity: criterion 'perplexity': per-item values\[1\] is inf on ckpt/"):
        evaluate_model(base, ["perplexity"], {}, EVAL)
    assert store_files(root) == before


# ---------------------------------------------------------------- the checks themselves


def test_nonfinite_tensors_counts_nan_and_inf_and_skips_integer_tensors():
    import torch

    from shared.finite import check_finite_tensors, describe_bad, nonfinite_tensors

    tensors = {"a": torch.zeros(3), "b": torch.tensor([math.nan, math.inf, -math.inf, 1.0]),
               "c": torch.tensor([1, 2]), "d": torch.full((2, 2), math.nan, dtype=torch.bfloat16),
               "e": torch.tensor([math.inf])}
    bad = nonfinite_tensors(tensors)
    assert [(b.name, b.nan, b.inf, b.numel) for b in bad] == [("b", 1, 2, 4), ("d", 4, 0, 4), ("e", 0, 1, 1)]
    assert describe_bad(bad) == "b (1 nan, 2 inf of 4 values), d (4 nan of 4 values) and 1 more tensor(s)"
    check_finite_tensors({"a": torch.ones(5)}, "fine")  # no error
    with pytest.raises(ValueError, match=r"^x: 3 tensor\(s\) hold nan/inf: b .*; y$"):
        check_finite_tensors(tensors, "x", "y")

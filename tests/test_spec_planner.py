"""Spec validation (one clear error naming the field) and planner counts / prefix sharing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from shared.planner import build_plan, format_plan
from shared.spec import SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "experiments" / "demo.yaml"


def base_spec() -> dict:
    return {
        "name": "t",
        "model": "builtin:tiny-random",
        "interventions": [
            {"method": "ft", "params": {"steps": 2, "layers": [1, 2]}},  # the tiny model has 4 layers
            {"method": "wanda", "sweep": {"sparsity": [0.25, 0.5]}},
        ],
    }


def with_change(path: str, value) -> dict:
    spec = copy.deepcopy(base_spec())
    node = spec
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return spec


@pytest.mark.parametrize(
    "path,value,expected",
    [
        ("interventions.0.method", "grace", r"interventions\[0\]\.method: .*unknown method 'grace'; allowed: .*ft.*wanda"),
        ("interventions.1.sweep", {"sparsity": [0.25, 1.5]}, r"interventions\[1\].*sweep\.sparsity\[1\].*less than 1"),
        ("interventions.1.sweep", {"sparsity": []}, r"sweep\.sparsity: needs at least one value"),
        ("interventions.1.sweep", {"sparsity": [0.5, 0.5]}, r"sweep\.sparsity: values must be distinct"),
        ("interventions.1.sweep", {"density": [0.5]}, r"sweep\.density: wanda has no parameter 'density'"),
        ("interventions.0.params", {"steps": 0}, r"interventions\[0\].*params\.steps: .*greater than or equal to 1"),
        ("interventions.0.params", {"stepz": 3}, r"interventions\[0\].*params\.stepz"),
        ("model", "builtin:gpt5", r"model: .*unknown built-in model 'builtin:gpt5'"),
        ("evaluation.evaluators", ["edit", "bleu"], r"evaluation\.evaluators: .*unknown evaluator 'bleu'; allowed: edit, utility"),
        ("compositions.mode", "all", r"compositions\.mode: Input should be 'permutations', 'cross' or 'subsets'"),
        ("name", "Bad Name!", r"name: String should match pattern"),
        ("colour", "red", r"colour: unknown key \(did you mean 'cluster'\?\)"),
        ("data.num_edits", 0, r"data\.num_edits: .*greater than or equal to 1"),
    ],
)
def test_spec_errors_name_the_field(path, value, expected):
    with pytest.raises(SpecError, match=expected):
        parse_spec(with_change(path, value), check_data=False)


def test_missing_data_file_is_reported_before_running(tmp_path):
    spec = with_change("data.forget_corpus", str(tmp_path / "nope.jsonl"))
    with pytest.raises(SpecError, match=r"data: data file .*nope\.jsonl does not exist"):
        parse_spec(spec)


def test_malformed_data_file_names_the_line(tmp_path):
    bad = tmp_path / "edits.jsonl"
    bad.write_text('{"subject": "x", "src": "q", "alt": "a", "rephrase": ["r"], "loc": "l", "loc_ans": "la"}\n{"subject": 1}\n')
    with pytest.raises(SpecError, match=r"edits\.jsonl:2: not a valid EditRecord"):
        parse_spec(with_change("data.edits", str(bad)))


def test_too_few_edits_is_an_error(tmp_path):
    spec = with_change("data.num_edits", 100000)
    with pytest.raises(SpecError, match="num_edits=100000"):
        parse_spec(spec)


def test_cross_groups_must_name_interventions():
    spec = with_change("compositions", {"mode": "cross", "groups": [["ft"], ["prune"]]})
    with pytest.raises(SpecError, match=r"compositions\.groups\[1\]: 'prune' is not an intervention name"):
        parse_spec(spec, check_data=False)


def test_swept_parameter_cannot_be_fixed_too():
    spec = with_change("interventions.1.params", {"sparsity": 0.3})
    with pytest.raises(SpecError, match="also fixed in params"):
        parse_spec(spec, check_data=False)


def test_demo_spec_is_valid():
    spec = load_spec(DEMO)
    assert [i.method for i in spec.interventions] == ["ft", "wanda"]
    assert len(spec.intervention("wanda").sweep["sparsity"]) >= 2


def test_plan_counts_and_prefix_sharing():
    raw = base_spec()
    raw["compositions"] = {"recompress": "none"}  # re-compression steps are counted in their own test
    plan = build_plan(parse_spec(raw, check_data=False))
    labels = sorted(c["label"] for c in plan.compositions)
    assert labels == sorted([
        "base", "ft", "wanda(sparsity=0.25)", "wanda(sparsity=0.5)",
        "ft > wanda(sparsity=0.25)", "ft > wanda(sparsity=0.5)",
        "wanda(sparsity=0.25) > ft", "wanda(sparsity=0.5) > ft",
    ])
    counts = plan.counts()
    # 8 compositions; steps from scratch: 1 + 1 + 1 + 2*4 = 11; shared prefix tree: 7 distinct steps
    assert counts["compositions"] == 8
    assert counts["intervention_runs_naive"] == 11
    assert counts["intervention_runs"] == 7
    assert counts["evaluations"] == 8 * 5 == counts["evaluations_naive"]
    # ft is computed once and is the parent of both ft > wanda nodes
    ft_nodes = [n for n in plan.step_nodes if n.depth == 1 and n.method == "ft"]
    assert len(ft_nodes) == 1
    children = [n for n in plan.step_nodes if n.parent == ft_nodes[0].id]
    assert sorted(n.steps[-1]["params"]["sparsity"] for n in children) == [0.25, 0.5]
    # parents always come before children
    seen = set()
    for node in plan.nodes.values():
        assert node.parent is None or node.parent in seen
        seen.add(node.id)
    # the sweep is recorded for the integration axis
    swept = [c for c in plan.compositions if c["sweep"]]
    assert {c["sweep"]["value"] for c in swept} == {0.25, 0.5}
    assert all(c["sweep"]["param"] == "sparsity" for c in swept)
    text = format_plan(plan)
    assert "intervention runs:  7 (naive, each composition from scratch: 11" in text


def test_plan_dedups_identical_compositions_and_counts_three_way():
    raw = base_spec()
    raw["interventions"][1]["sweep"] = {"sparsity": [0.5]}
    raw["compositions"] = {"recompress": "none"}
    plan = build_plan(parse_spec(raw, check_data=False))
    assert plan.counts()["compositions"] == 5  # base, ft, wanda, ft>wanda, wanda>ft
    assert plan.counts()["intervention_runs"] == 4
    # no sweep with one value: nothing to integrate over
    assert all(c["sweep"] is None for c in plan.compositions)


def test_cross_mode_pairs_across_groups_only():
    raw = base_spec()
    raw["interventions"].append({"method": "ft", "label": "ft-long", "params": {"steps": 4, "layers": [1, 2]}})
    raw["compositions"] = {"mode": "cross", "groups": [["ft", "ft-long"], ["wanda"]], "include_singles": False}
    plan = build_plan(parse_spec(raw, check_data=False))
    pairs = [tuple(c["names"]) for c in plan.compositions if c["names"]]
    assert set(pairs) == {("ft", "wanda"), ("ft-long", "wanda"), ("wanda", "ft"), ("wanda", "ft-long")}
    assert ("ft", "ft-long") not in pairs
    # 2 sparsities per pair-order: 4 orders x 2 = 8 compositions + base
    assert plan.counts()["compositions"] == 9


def test_plan_is_json_round_trippable():
    from shared.planner import Plan

    plan = build_plan(parse_spec(base_spec(), check_data=False))
    again = Plan.from_json(yaml.safe_load(yaml.safe_dump(plan.to_json())))
    assert again.counts() == plan.counts()
    assert list(again.nodes) == list(plan.nodes)


# --------------------------------------------------------------------------- re-compression policy


def _recompress_plan(policy: str | None, compressor: dict | None = None):
    raw = base_spec()
    raw["interventions"][1] = compressor or {"method": "gptq", "params": {"bits": 4}}
    if policy is not None:
        raw["compositions"] = {"recompress": policy}
    return build_plan(parse_spec(raw, check_data=False))


def _run_methods(plan, names: list[str]) -> list[str]:
    comp = next(c for c in plan.compositions if c["names"] == names)
    return [s["method"] for s in plan.nodes[comp["node"]].steps]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gptq", "awq"])
def test_recompress_default_reapplies_the_same_compressor_after_an_edit(method: str):
    plan = _recompress_plan(None, {"method": method})
    assert _run_methods(plan, [method, "ft"]) == [method, "ft", method]
    # compression already last: nothing added
    assert _run_methods(plan, ["ft", method]) == ["ft", method]
    comp = next(c for c in plan.compositions if c["names"] == [method, "ft"])
    assert comp["recompress"] == method and "(re-compressed: " in comp["label"]
    # the re-applied step has the same parameters as the first one
    steps = plan.nodes[comp["node"]].steps
    assert steps[0] == steps[2]
    # base, ft, c, ft>c, c>ft>c: ft, c, ft>c, c>ft, c>ft>c = 5 runs
    assert plan.counts()["intervention_runs"] == 5
    assert plan.counts()["intervention_runs_naive"] == 1 + 1 + 2 + 3


def test_recompress_reproject_and_none():
    assert _run_methods(_recompress_plan("reproject"), ["gptq", "ft"]) == ["gptq", "ft", "reproject"]
    assert _run_methods(_recompress_plan("none"), ["gptq", "ft"]) == ["gptq", "ft"]
    none = next(c for c in _recompress_plan("none").compositions if c["names"] == ["gptq", "ft"])
    assert none["recompress"] == "" and none["label"] == "gptq > ft"


def test_recompress_goes_right_after_the_last_edit():
    from shared.planner import with_recompression

    wanda = {"method": "wanda", "params": {"sparsity": 0.5}}
    gptq = {"method": "gptq", "params": {"bits": 4}}
    ft = {"method": "ft", "params": {}}
    # the pruning mask is restored before the later quantization acts
    assert with_recompression([wanda, ft, gptq], "reapply") == [wanda, ft, wanda, gptq]
    assert with_recompression([wanda, gptq, ft], "reapply") == [wanda, gptq, ft, wanda, gptq]
    assert with_recompression([wanda, gptq, ft], "reproject") == [wanda, gptq, ft, {"method": "reproject", "params": {}}]
    assert with_recompression([ft, wanda], "reapply") == [ft, wanda]
    assert with_recompression([wanda, wanda], "reapply") == [wanda, wanda]


def test_recompress_policy_is_validated():
    raw = base_spec()
    raw["compositions"] = {"recompress": "sometimes"}
    with pytest.raises(SpecError, match=r"compositions\.recompress.*'reapply', 'reproject' or 'none'"):
        parse_spec(raw, check_data=False)


def test_impossible_group_size_is_rejected_before_any_work():
    raw = base_spec()
    raw["model"] = "builtin:smollm2-135m"
    raw["interventions"][1] = {"method": "gptq", "params": {"group_size": 128}}
    with pytest.raises(SpecError, match=r"interventions\[1\]\.params\.group_size: group_size 128 does not divide .*576"):
        parse_spec(raw, check_data=False)
    raw["interventions"][1] = {"method": "awq", "sweep": {"group_size": [64, 100]}}
    with pytest.raises(SpecError, match=r"interventions\[1\]\.sweep\.group_size: group_size 100"):
        parse_spec(raw, check_data=False)
    raw["interventions"][1] = {"method": "gptq", "params": {"group_size": 64}}
    parse_spec(raw, check_data=False)  # 64 divides 576 and 1536


@pytest.mark.parametrize(
    "method, bits, ok",
    [("gptq", 2, True), ("gptq", 3, True), ("gptq", 8, True), ("gptq", 5, False), ("gptq", 16, False),
     ("awq", 2, True), ("awq", 5, True), ("awq", 8, True), ("awq", 1, False), ("awq", 9, False)],
)
def test_quantization_bits_follow_the_paper(method: str, bits: int, ok: bool):
    raw = base_spec()
    raw["interventions"][1] = {"method": method, "sweep": {"bits": [bits]}}
    if ok:
        parse_spec(raw, check_data=False)
    else:
        with pytest.raises(SpecError, match=r"interventions\[1\]\.sweep\.bits\[0\]: bits must"):
            parse_spec(raw, check_data=False)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "pipelines" / "experiments").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_local_study_spec_validates_and_plans(path: Path) -> None:
    """The study specs shipped for this machine (including the triple study of k = 3) are valid and plan."""
    spec = load_spec(path)
    if spec.models:  # a multi-model study plans once per model
        with pytest.raises(ValueError, match="planned once per model"):
            build_plan(spec)
        plans = [build_plan(one) for one in spec.per_model()]
        assert len(plans) == len(spec.models) >= 2
        plan = plans[0]
    else:
        plan = build_plan(spec)
    assert plan.compositions, path.name
    if path.stem == "edit_unlearn_compress":
        # every pair in both orders and the triple in all 3! orders, plus singles and the base model
        sizes = [len(c["names"]) for c in plan.compositions]
        assert sizes.count(3) == 6 and sizes.count(2) == 6, sizes

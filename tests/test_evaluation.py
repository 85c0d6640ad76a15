"""Tests of the evaluators (shared.evaluation).

Fast tests use hand-computed values or the tiny random model; the ``slow`` test
runs the real built-in model (converted once per session from its GGUF).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from shared.data import EditRecord
from shared.evaluation import (
    EVALUATORS,
    EVALUATORS_WITH_ITEMS,
    EvalOptions,
    available_evaluators,
    get_evaluator,
)
from shared.evaluation.compression import measure_compression
from shared.evaluation.edit import (
    edit_prompt,
    edit_target,
    encode_edit_example,
    evaluate_edits,
    greedy_generate,
    ignored_token_ids,
    token_f1,
)
from shared.evaluation.mcq import evaluate_mcq, task_config
from shared.evaluation.perplexity import document_nll, perplexity
from shared.item_scores import item_scores_of
from shared.models import load_model

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    """The tiny random Llama (4 layers, hidden 64) with SmolLM2's tokenizer, loaded."""
    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    """The real built-in model, loaded."""
    return load_model(smollm2_dir)


def write_mcq(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def arithmetic_questions(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 2 + i, 3 + 2 * i
        choices = [str(a + b + d) for d in (-1, 0, 1, 10)]
        rows.append({"question": f"What is {a} plus {b}?", "choices": choices, "answer": 1})
    return rows


# --------------------------------------------------------------------------- token F1


def test_token_f1_full_match() -> None:
    assert token_f1([5, 6, 7], [5, 6, 7]) == 1.0
    # sets: order and repetition do not matter
    assert token_f1([7, 6, 5], [5, 6, 7]) == 1.0


def test_token_f1_partial_overlap_exact_values() -> None:
    # G = {1, 2, 3, 9}, T = {1, 2, 3, 4}: C = {1, 2, 3}; P = 3/4, R = 3/4, F1 = 3/4
    assert token_f1([1, 2, 3, 9], [1, 2, 3, 4]) == pytest.approx(0.75)
    # G = {1, 9} (after clipping to |T| = 3 tokens: [1, 9, 9] -> {1, 9}), T = {1, 2, 3}
    # C = {1}: P = 1/2, R = 1/3, F1 = 2 * (1/6) / (5/6) = 0.4
    assert token_f1([1, 9, 9, 2, 3], [1, 2, 3]) == pytest.approx(0.4)
    # G = {1, 2}, T = {1, 2, 3, 4}: P = 1, R = 1/2, F1 = 2/3
    assert token_f1([1, 2], [1, 2, 3, 4]) == pytest.approx(2 / 3)


def test_token_f1_no_overlap_is_zero() -> None:
    assert token_f1([8, 9], [1, 2]) == 0.0
    assert token_f1([], [1, 2]) == 0.0


def test_token_f1_clips_generation_to_target_length() -> None:
    # the correct tokens come after the target's length: they must not count
    assert token_f1([9, 9, 1, 2], [1, 2]) == 0.0
    # the answer followed by more text scores as the answer alone
    assert token_f1([1, 2, 50, 51, 52], [1, 2]) == 1.0


def test_token_f1_removes_pad_bos_and_space_tokens() -> None:
    pad, bos, space = 0, 1, 216
    # pad/BOS/space in the generation would otherwise lower precision
    assert token_f1([bos, 5, 6, pad], [5, 6, space, pad], ignore_ids={pad, bos, space}) == 1.0
    # without removal: G = {1, 5, 6, 0}, T = {5, 6, 216, 0}: C = {5, 6, 0}, P = R = 3/4
    assert token_f1([bos, 5, 6, pad], [5, 6, space, pad]) == pytest.approx(0.75)
    # only ignorable tokens -> nothing in common -> 0
    assert token_f1([pad, space], [5, 6], ignore_ids={pad, space}) == 0.0


#: (generated text, answer, F1 by the paper's definition: drop space-only tokens
#: and pad/BOS/EOS, then clip the generation to the target's length, then set F1).
#: Values worked out by hand from the SmolLM2 tokenization (noted per case).
PAPER_F1_CASES = [
    # [' ', ' Paris'] -> drop ' ' -> [' Paris'] vs [' Paris']   (clip-first gave 0.0)
    ("  Paris", "Paris", 1.0),
    # [' Alexander', '\n', 'Question'] -> '\n' is kept -> clip 2 -> {' Alexander', '\n'}
    # vs {' Alexander', ' Fleming'}: P = R = 1/2                  (ignoring '\n' gave 2/3)
    ("Alexander\nQuestion", "Alexander Fleming", 0.5),
    # [' New', ' ', ' York', ' City'] -> drop ' ' -> all three    (clip-first gave 0.8)
    ("New  York City", "New York City", 1.0),
    # ['\n', ' Paris'] -> clip 1 -> {'\n'}: nothing in common
    ("\n Paris", "Paris", 0.0),
    # [' Paris', '\n'] -> clip 1 -> {' Paris'}
    ("Paris\n", "Paris", 1.0),
    # [' Paris', ',', ' France'] -> clip 1 -> {' Paris'}
    ("Paris, France", "Paris", 1.0),
    # sets: order does not matter
    ("Shakespeare William", "William Shakespeare", 1.0),
    # {' William'} vs {' William', ' Shakespeare'}: P = 1, R = 1/2 -> 2/3
    ("William", "William Shakespeare", 2 / 3),
    # [' par', 'is'] vs [' Paris']: nothing in common
    ("paris", "Paris", 0.0),
    # [' Rome', ' Rome'] -> clip 1 -> {' Rome'}
    ("Rome Rome", "Rome", 1.0),
]


@pytest.mark.parametrize("generated, answer, expected", PAPER_F1_CASES)
def test_token_f1_matches_the_papers_definition_on_hand_cases(tiny, generated: str, answer: str, expected: float) -> None:
    _, tok = tiny
    gen = tok(" " + generated, add_special_tokens=False)["input_ids"]
    tgt = tok(edit_target(answer), add_special_tokens=False)["input_ids"]
    ignore = ignored_token_ids(tok, set(gen) | set(tgt))
    assert token_f1(gen, tgt, ignore) == pytest.approx(expected)


def test_ignored_token_ids_keeps_newlines_and_drops_eos(tiny) -> None:
    _, tok = tiny
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    double_space = tok("  ", add_special_tokens=False)["input_ids"]
    ignore = ignored_token_ids(tok, set(newline) | set(double_space))
    assert not set(newline) & ignore  # the paper ignores only space tokens
    assert set(double_space) <= ignore
    assert tok.eos_token_id in ignore and tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    # a generation that stopped (EOS) and was padded scores as its text
    gen = tok(" Paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert token_f1(gen, tok(" Paris", add_special_tokens=False)["input_ids"], ignore | {tok.eos_token_id}) == 1.0


def test_ignored_token_ids_finds_pad_bos_and_whitespace(tiny) -> None:
    _, tok = tiny
    space_ids = tok(" ", add_special_tokens=False)["input_ids"]
    word = tok(" Paris", add_special_tokens=False)["input_ids"]
    ignore = ignored_token_ids(tok, set(space_ids) | set(word))
    assert tok.pad_token_id in ignore and tok.bos_token_id in ignore
    assert set(space_ids) <= ignore
    assert not set(word) & ignore


# --------------------------------------------------------------------------- edit prompts


def test_edit_prompt_and_target_join_with_a_single_space(tiny) -> None:
    _, tok = tiny
    assert edit_prompt("  Who wrote Hamlet? ").endswith("Question: Who wrote Hamlet?\nAnswer:")
    assert edit_target("  William Shakespeare ") == " William Shakespeare"
    full = edit_prompt("Who wrote Hamlet?") + edit_target("William Shakespeare")
    assert "Answer: William" in full and "Answer:  William" not in full
    prompt_ids, target_ids = encode_edit_example(tok, "Who wrote Hamlet?", "William Shakespeare")
    # separate tokenization concatenates to the joint tokenization of the text
    assert prompt_ids + target_ids == tok(full)["input_ids"]
    assert tok.decode(target_ids) == " William Shakespeare"


def test_batched_generation_matches_one_by_one(tiny) -> None:
    model, tok = tiny
    prompts = [encode_edit_example(tok, q, "x")[0] for q in ("Hi?", "What is the capital of France?", "Who?")]
    budgets = [3, 5, 4]
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=None)
    batched = greedy_generate(model, prompts, budgets, batch_size=3, **kw)
    single = greedy_generate(model, prompts, budgets, batch_size=1, **kw)
    assert batched == single
    assert [len(g) for g in batched] == budgets


def test_evaluate_edits_on_tiny_model(tiny) -> None:
    model, tok = tiny
    edits = [
        EditRecord(subject="France", src="What is the capital of France?", alt="Lyon",
                   rephrase=["France's capital is?", "Capital city of France?"],
                   loc="Who wrote Hamlet?", loc_ans="Shakespeare"),
        EditRecord(subject="sky", src="What color is the sky?", alt="green",
                   rephrase="The sky has which color?", loc="What is 2 plus 2?", loc_ans="4"),
    ]
    res = evaluate_edits(model, tok, edits, batch_size=4)
    assert set(res) == {"edit_success", "edit_generalization", "edit_locality"}
    assert all(0.0 <= v <= 1.0 for v in res.values())
    assert res == evaluate_edits(model, tok, edits, batch_size=1)


# --------------------------------------------------------------------------- compression


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(8, 8, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.ReLU())


class _Tiny(torch.nn.Module):
    """Mimics the ``model.model.layers`` layout of a HF causal LM."""

    def __init__(self, n_layers: int = 2) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(_Block() for _ in range(n_layers))
        self.model.embed_tokens = torch.nn.Embedding(10, 8)  # excluded from the measure
        torch.nn.init.zeros_(self.model.embed_tokens.weight)


def _tiny_with_sparsity(fraction: float) -> _Tiny:
    torch.manual_seed(0)
    m = _Tiny()
    with torch.no_grad():
        for layer in m.model.layers:
            for lin in (layer.q, layer.mlp[0]):
                w = torch.randn_like(lin.weight).abs() + 0.1  # no accidental zeros
                flat = w.view(-1)
                flat[: int(round(fraction * flat.numel()))] = 0.0
                lin.weight.copy_(w)
    return m


def test_compression_dense_is_16_bits() -> None:
    res = measure_compression(_tiny_with_sparsity(0.0))
    assert res == {"sparsity": 0.0, "avg_bits": 16.0}


def test_compression_pruned_25_percent() -> None:
    res = measure_compression(_tiny_with_sparsity(0.25))
    # 2 layers x (64 + 128) weights = 384; 25 % of each matrix = 96 zeros
    assert res["sparsity"] == 0.25
    assert res["avg_bits"] == pytest.approx(12.25)  # (1 * 96 + 16 * 288) / 384


def test_compression_quantized_4bit_group128() -> None:
    m = _tiny_with_sparsity(0.0)
    res = measure_compression(m, {"method": "gptq", "bits": 4, "group_size": 128})
    assert res["avg_bits"] == pytest.approx(4.25)
    assert res["sparsity"] == 0.0
    # the intervention's whole record and a prune-then-quantize list are understood too
    assert measure_compression(m, {"compression": {"method": "awq", "bits": 3, "group_size": 64}})[
        "avg_bits"
    ] == pytest.approx(3.5)
    steps = {"steps": [{"method": "wanda", "sparsity": 0.5}, {"method": "gptq", "bits": 8, "group_size": 128}]}
    assert measure_compression(m, steps)["avg_bits"] == pytest.approx(8.25)
    # a pruning record (no bits) leaves the measured formula in charge
    assert measure_compression(_tiny_with_sparsity(0.25), {"method": "wanda", "sparsity": 0.25})[
        "avg_bits"
    ] == pytest.approx(12.25)


# --------------------------------------------------------------------------- perplexity


def _manual_ppl(model, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            t = torch.tensor([ids])
            loss = model(input_ids=t, labels=t).loss  # mean over len - 1 predictions
            nll += float(loss) * (len(ids) - 1)
            count += len(ids) - 1
    return math.exp(nll / count)


def test_perplexity_matches_manual_loss(tiny) -> None:
    model, tok = tiny
    texts = ["The cat sat on the mat.", "A much longer sentence about the weather in Paris in spring.", "Hi there"]
    expected = _manual_ppl(model, [tok(t)["input_ids"] for t in texts])
    assert perplexity(model, tok, texts, max_length=256, batch_size=2) == pytest.approx(expected, rel=1e-4)
    # padding is masked: the batch size does not change the value
    assert perplexity(model, tok, texts, max_length=256, batch_size=1) == pytest.approx(expected, rel=1e-4)


def test_perplexity_windows_long_texts(tiny) -> None:
    model, tok = tiny
    text = "one two three four five six seven eight nine ten eleven twelve thirteen"
    ids = tok(text)["input_ids"]
    assert len(ids) > 8
    windows = [w for w in (ids[i : i + 5] for i in range(0, len(ids), 5)) if len(w) > 1]
    expected = _manual_ppl(model, windows)
    assert perplexity(model, tok, [text], max_length=5, batch_size=4) == pytest.approx(expected, rel=1e-4)


def test_document_nll_gives_one_item_per_text_with_its_windows_together(tiny) -> None:
    """The bootstrap resamples documents: a long text's windows stay one item."""
    model, tok = tiny
    long = "one two three four five six seven eight nine ten eleven twelve thirteen"
    short = "The cat sat on the mat."
    nll, tokens = document_nll(model, tok, [long, short], max_length=5, batch_size=4)
    assert len(nll) == len(tokens) == 2
    long_ids, short_ids = tok(long)["input_ids"], tok(short)["input_ids"]
    long_windows = [w for w in (long_ids[i : i + 5] for i in range(0, len(long_ids), 5)) if len(w) > 1]
    short_windows = [w for w in (short_ids[i : i + 5] for i in range(0, len(short_ids), 5)) if len(w) > 1]
    assert tokens == [sum(len(w) - 1 for w in long_windows), sum(len(w) - 1 for w in short_windows)]
    assert math.exp(nll[0] / tokens[0]) == pytest.approx(_manual_ppl(model, long_windows), rel=1e-4)
    assert math.exp(sum(nll) / sum(tokens)) == pytest.approx(
        perplexity(model, tok, [long, short], max_length=5, batch_size=4), rel=1e-9)


# --------------------------------------------------------------------------- MCQ through lm-eval


def test_task_config_uses_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_mcq(tmp_path / "q.jsonl", arithmetic_questions(1))
    cfg = task_config(Path("q.jsonl"), "t")
    data_file = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file == tmp_path / "q.jsonl"
    assert cfg["output_type"] == "multiple_choice"
    assert cfg["doc_to_text"] == "Question: {{question}}\nAnswer:"


def test_letter_format_renders_the_harness_mmlu_prompt(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    from shared.evaluation.mcq import offline, write_task_yaml

    path = write_mcq(tmp_path / "q.jsonl", arithmetic_questions(2))
    write_task_yaml(path, "letters_t", tmp_path / "tasks", cache_dir=tmp_path / "cache", mcq_format="letters")
    with offline():
        manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
        task = manager.load_task_or_group(["letters_t"])["letters_t"]
    doc = next(iter(task.test_docs()))
    # lm-eval's MMLU template: the question, the listed choices, "Answer:"; the letters are scored
    assert task.doc_to_text(doc) == (
        f"{doc['question']}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\n"
        f"C. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:"
    )
    assert task.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert task.doc_to_target(doc) == doc["answer"]
    with pytest.raises(ValueError, match="mcq_format"):
        task_config(path, "t", mcq_format="letter")


def test_letter_format_reaches_the_evaluator_and_keys_results_only_when_chosen(tiny, tmp_path: Path) -> None:
    from pipelines.builder import evaluation_options
    from shared.spec import ExperimentSpec

    model, tok = tiny
    path = write_mcq(tmp_path / "mcq.jsonl", arithmetic_questions(4))
    res = evaluate_mcq(model, tok, path, "test_tiny_letters", batch_size=16, mcq_format="letters")
    assert res["n"] == 4 and 0.0 <= res["acc"] <= 1.0
    base = {"name": "x", "interventions": [{"method": "ft"}]}
    assert "mcq_format" not in evaluation_options(ExperimentSpec.model_validate(base))
    letters = ExperimentSpec.model_validate({**base, "evaluation": {"mcq_format": "letters"}})
    assert evaluation_options(letters)["mcq_format"] == "letters"
    with pytest.raises(Exception, match="mcq_format"):
        ExperimentSpec.model_validate({**base, "evaluation": {"mcq_format": "letter"}})


def test_evaluate_mcq_end_to_end_with_batch_size(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    path = write_mcq(tmp_path / "mcq.jsonl", arithmetic_questions(8))
    shapes: list[int] = []

    def record(module, args, kwargs, output):  # batch dimension of every forward call
        ids = kwargs.get("input_ids", args[0] if args else None)
        shapes.append(int(ids.shape[0]))

    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        res = evaluate_mcq(model, tok, path, "test_tiny_mcq", batch_size=16)
    finally:
        handle.remove()
    assert res["n"] == 8
    assert 0.0 <= res["acc"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0
    assert len(res["item_acc"]) == 8 and set(res["item_acc"]) <= {0.0, 1.0}
    assert sum(res["item_acc"]) / 8 == pytest.approx(res["acc"])
    assert res["batch_size"] == 16  # held by the HFLM wrapper
    # 8 questions x 4 choices = 32 requests -> two forward passes of 16, not 32 of 1
    assert max(shapes) == 16 and len(shapes) == 2

    limited = evaluate_mcq(model, tok, path, "test_tiny_mcq", batch_size=4, limit=3)
    assert limited["n"] == 3 and limited["batch_size"] == 4


# --------------------------------------------------------------------------- registry


def test_registry_names_and_errors() -> None:
    assert set(available_evaluators()) >= {"edit", "utility", "forget", "perplexity", "compression"}
    with pytest.raises(KeyError, match="available: .*compression.*edit"):
        get_evaluator("nope")
    opts = EvalOptions()
    assert (opts.batch_size, opts.limit, opts.max_length, opts.compression) == (16, None, 256, None)
    with pytest.raises(Exception):
        EvalOptions(batch_size=0)


def test_registry_criteria_match_shared_criteria(tiny, tmp_path: Path) -> None:
    """Each evaluator returns exactly the criteria that shared.criteria attributes to it."""
    from shared.criteria import CRITERIA
    from shared.data import DataConfig, ExperimentData

    model, tok = tiny
    mcq = write_mcq(tmp_path / "mcq.jsonl", arithmetic_questions(2))
    text = tmp_path / "ppl.jsonl"
    text.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"subject": "sky", "src": "What color is the sky?", "alt": "green",
                                 "rephrase": ["Sky color?"], "loc": "2+2?", "loc_ans": "4"}) + "\n")
    data = ExperimentData(DataConfig(edits=str(edits), utility_mcq=str(mcq), forget_mcq=str(mcq),
                                     perplexity=str(text), num_edits=1))
    opts = EvalOptions(batch_size=4, compression={"method": "gptq", "bits": 4, "group_size": 64})
    for name, fn in EVALUATORS.items():
        expected = {c.name for c in CRITERIA.values() if c.evaluator == name}
        out = fn(model, tok, data, opts)
        assert set(out) == expected, name
        assert all(isinstance(v, float) for v in out.values())
        items = item_scores_of(out)
        # every evaluator that reads data keeps its per-item scores, and they reproduce its values
        assert set(items) == (expected if name in EVALUATORS_WITH_ITEMS else set()), name
        for criterion, scores in items.items():
            assert scores.value() == pytest.approx(out[criterion], rel=1e-9), (name, criterion)
    assert EVALUATORS_WITH_ITEMS == {"edit", "utility", "forget", "perplexity"}


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_model_answers_easy_questions(smollm2, tmp_path: Path) -> None:
    model, tok = smollm2
    caps = [("France", "Paris"), ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Italy", "Rome"),
            ("Spain", "Madrid"), ("Egypt", "Cairo")]
    cities = [c for _, c in caps]
    rows = []
    for i, (country, city) in enumerate(caps):
        wrong = [c for c in cities if c != city][:3]
        choices = wrong[:]
        choices.insert(i % 4, city)
        rows.append({"question": f"What is the capital of {country}?", "choices": choices, "answer": i % 4})
    res = evaluate_mcq(model, tok, write_mcq(tmp_path / "caps.jsonl", rows), "caps", batch_size=8)
    assert res["n"] == 6 and res["acc"] >= 5 / 6

    edits = [EditRecord(subject=c, src=f"What is the capital of {c}?", alt=city,
                        rephrase=[f"Which city is the capital of {c}?"],
                        loc="Who wrote Hamlet?", loc_ans="William Shakespeare") for c, city in caps[:3]]
    # unedited model: it already knows these "edits", so success and locality are high
    res = evaluate_edits(model, tok, edits)
    assert res["edit_success"] >= 2 / 3 and res["edit_locality"] >= 2 / 3


def test_metrics_of_a_nested_group_count_all_leaf_tasks() -> None:
    """Harness groups such as mmlu nest (mmlu -> mmlu_stem -> subjects); n sums the leaves."""
    from shared.evaluation.mcq import _metrics

    results = {
        "results": {"mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
        "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_other"], "mmlu_stem": ["a", "b"], "mmlu_other": ["c"]},
        "n-samples": {"a": {"original": 10, "effective": 3}, "b": {"original": 5, "effective": 3},
                      "c": {"original": 7, "effective": 2}},
        # per-question samples, deliberately out of document order
        "samples": {"a": [{"doc_id": 2, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}, {"doc_id": 1, "acc": 1.0}],
                    "b": [{"doc_id": 0, "acc": 0.0}, {"doc_id": 1, "acc": 0.0}, {"doc_id": 2, "acc": 1.0}],
                    "c": [{"doc_id": 1, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}]},
    }
    # leaves in name order (mmlu_other's c before mmlu_stem's a, b), each in document order
    assert _metrics(results, "mmlu") == {"acc": 0.5, "n": 8, "item_acc": [0, 1, 0, 1, 1, 0, 0, 1]}


def test_default_mcq_format_is_not_part_of_result_keys() -> None:
    from shared.data import ExperimentData
    from shared.execution import evaluation_config

    data = ExperimentData()
    plain = evaluation_config("utility", data, {"batch_size": 16})
    assert evaluation_config("utility", data, {"batch_size": 16, "mcq_format": "cloze"}) == plain
    assert evaluation_config("utility", data, {"batch_size": 16, "mcq_format": "letters"}) != plain


def test_token_f1_clips_to_the_target_left_after_dropping_its_space_tokens() -> None:
    """' 1969' is [' ', '1', '9', '6', '9']: the newline after the answer gets no fifth slot (issue 29)."""
    space, newline = 216, 198
    target = [space, 33, 41, 38, 41]
    assert token_f1([space, 33, 41, 38, 41, newline], target, ignore_ids={space}) == 1.0
    # ' 1 9 2 8' generated with spaces between the digits: all four digits count once the spaces are dropped
    assert token_f1([space, 33, space, 41, space, 34, space, 40], [space, 33, 41, 34, 40], ignore_ids={space}) == 1.0


def test_edit_results_of_the_old_metric_are_not_reused() -> None:
    from shared.data import ExperimentData
    from shared.execution import evaluation_config

    assert evaluation_config("edit", ExperimentData(), {})["version"] == 2
    assert "version" not in evaluation_config("perplexity", ExperimentData(), {})  # other keys unchanged


@pytest.mark.slow
def test_a_real_leading_space_generation_scores_the_answer(monkeypatch, smollm2_dir) -> None:
    """The built-in model, shown answers after three spaces, answers '  Paris' as a space token then ' Paris'.

    With a budget of one token (the target's length) that generation was [' '] and scored 0.0; the
    evaluator now continues it until the answer fills the target after the space is dropped.
    """
    import shared.evaluation.edit as edit
    from shared.data import EditRecord

    model, tok = load_model(smollm2_dir)
    monkeypatch.setattr(edit, "EDIT_PREAMBLE", "Question: What is the capital of Italy?\nAnswer:   Rome\n"
                        "Question: Who discovered penicillin?\nAnswer:   Alexander Fleming\n")
    record = EditRecord(subject="France", src="What is the capital of France?", alt="Paris",
                        rephrase=["What is the capital of France?"], loc="Who wrote Hamlet?", loc_ans="William Shakespeare")
    prompt, target = edit.encode_edit_example(tok, record.src, record.alt)
    first = edit.greedy_generate(model, [prompt], [len(target)], tok.pad_token_id, tok.eos_token_id)[0]
    assert len(first) == 1 and tok.decode(first).strip() == ""  # the real generation starts with a space token
    scores = edit.evaluate_edits(model, tok, [record])
    assert scores["edit_success"] == 1.0 and scores["edit_locality"] == 1.0

"""Knowledge-edit metrics: success, generalization and locality by token F1.

The paper scores an edit by greedy generation after the prompt and a token-level
F1 between what the model generated and the wanted answer:

* **success** -- the edit prompt (``src``) against the new answer (``alt``);
* **generalization** -- each rephrased prompt against ``alt`` (averaged over the
  rephrases of a record);
* **locality** -- an unrelated question (``loc``) against its true answer
  (``loc_ans``): an edit that damages unrelated knowledge lowers it.

Every metric is the mean over the records of the batch of edits.

The prompt/target text is defined *here*, once, by :func:`edit_prompt` and
:func:`edit_target`, and tokenized by :func:`encode_edit_example`.  Editing
methods (fine-tuning, LoRA, MEMIT) import these so that what they train on is
token-for-token what is evaluated.  The target carries exactly one leading
space and the prompt none at its end -- the reference code added the space
twice, so its training target never matched what the model generates.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import torch

from shared.evaluation._batching import pad_batch

from shared.data import EditRecord
from shared.item_scores import ItemScores, Scores

#: A fixed two-shot preamble in the same Question/Answer format.  Zero-shot, the
#: built-in instruct model answers "Question: ...\nAnswer:" with an end-of-turn
#: token or a sentence ("The capital ..."), which scores ~0 F1 even on facts it
#: knows, so locality would be meaningless; with two demonstrations it answers
#: in the short form (measured on 14 common facts: F1 0.00 -> 0.56).  Editing
#: methods get the same preamble through :func:`edit_prompt`, so training and
#: evaluation still see identical text.
EDIT_PREAMBLE = (
    "Question: What is the capital of Italy?\nAnswer: Rome\n"
    "Question: Who discovered penicillin?\nAnswer: Alexander Fleming\n"
)


def edit_prompt(question: str) -> str:
    """The text the model is given for an edit question.

    ``EDIT_PREAMBLE + "Question: {question}\nAnswer:"`` -- no trailing space:
    the answer's leading space belongs to the target, which is how BPE
    tokenizers split ``"Answer: Paris"`` (``" Paris"`` is one token).  The
    question itself is the last line, so subject lookups (MEMIT) that search
    for the last occurrence of the subject find it in the question.
    """
    return f"{EDIT_PREAMBLE}Question: {question.strip()}\nAnswer:"


def edit_target(answer: str) -> str:
    """The text the model should produce after :func:`edit_prompt` (``" {answer}"``).

    Exactly one leading space, whatever whitespace the data carried.
    """
    return " " + answer.strip()


def encode_edit_example(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the target, tokenized separately.

    The prompt gets the tokenizer's special tokens (e.g. a BOS for Llama-3) as
    any model input would; the target gets none.  ``prompt_ids + target_ids`` is
    therefore the training sequence (loss on the target part only) and
    ``target_ids`` is exactly what evaluation compares greedy generations with.
    """
    prompt_ids = list(tokenizer(edit_prompt(question), add_special_tokens=True)["input_ids"])
    target_ids = list(tokenizer(edit_target(answer), add_special_tokens=False)["input_ids"])
    return prompt_ids, target_ids


def token_f1(
    generated_ids: Sequence[int],
    target_ids: Sequence[int],
    ignore_ids: Collection[int] = (),
) -> float:
    """Token-level F1 of a generation against a target, on *sets* of token ids (the paper's metric).

    In the paper's order: first the ``ignore_ids`` (space-only tokens and the
    pad/BOS/EOS ids; see :func:`ignored_token_ids`) are removed from the
    generation and the target, *then* the generation is clipped to the
    length of what is left of the target (whatever the model says after the
    answer is not part of it).  So a stray leading space does not use up the
    one-token budget of a one-token answer (``'  Paris'`` against ``' Paris'``
    scores 1.0), and a target that itself starts with a space-only token
    (``' 1969'`` is ``[' ', '1', '9', '6', '9']``) is not given a fifth slot
    for the newline after the answer.  With ``G`` and ``T`` the remaining sets
    and ``C = G & T``: precision ``|C|/|G|``, recall ``|C|/|T|``, F1
    ``2PR/(P+R)``; 0 when ``C`` is empty.  The generation handed in must be
    long enough to fill the target after the ignored tokens are dropped
    (:func:`evaluate_edits` generates until it is).
    """
    ignore = set(ignore_ids)
    kept = [int(t) for t in generated_ids if int(t) not in ignore]
    kept_target = [int(t) for t in target_ids if int(t) not in ignore]
    gen = set(kept[: len(kept_target)])
    tgt = set(kept_target)
    common = gen & tgt
    if not common:
        return 0.0
    precision = len(common) / len(gen)
    recall = len(common) / len(tgt)
    return 2 * precision * recall / (precision + recall)


def _is_space_token(text: str) -> bool:
    return text != "" and set(text) == {" "}


def ignored_token_ids(tokenizer: Any, candidates: Iterable[int] = ()) -> set[int]:
    """Ids that :func:`token_f1` drops: space-only tokens, and pad, BOS and EOS.

    As in the paper's code, only tokens made of spaces are ignored -- a newline
    is not (a generation that runs on into ``"\nQuestion"`` is clipped, and
    the newline counts against precision).  Pad, BOS and EOS are not text: a
    generation that stopped early is padded (with EOS where the pad token is
    EOS).  Space-only tokens are found among ``candidates`` (the ids that
    actually occur), much cheaper than decoding the whole vocabulary.
    """
    ignore = {
        int(i)
        for i in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        if i is not None
    }
    for tok in set(candidates) - ignore:
        if _is_space_token(tokenizer.decode([int(tok)])):
            ignore.add(int(tok))
    return ignore


def _pad_token_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


@torch.no_grad()
def greedy_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    pad_token_id: int,
    eos_token_id: int | list[int] | None,
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuations of tokenized prompts, batched with left padding.

    Prompts are sorted by length so that a batch holds similar lengths (less
    padding); each batch generates the largest ``max_new_tokens`` of its rows
    and every row is cut back to its own budget and at its first EOS (a
    finished answer ends there; the padding after it is not model output).  Left padding keeps the last
    prompt token of every row at the same position, which is what batched
    generation needs; transformers derives position ids from the attention
    mask, so a padded row generates what it would alone.
    """
    if len(prompts) != len(max_new_tokens):
        raise ValueError("prompts and max_new_tokens differ in length")
    device = next(model.parameters()).device
    stop = set() if eos_token_id is None else set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), max(1, batch_size)):
        idx = order[start : start + batch_size]
        input_ids, attention = pad_batch([prompts[i] for i in idx], pad_token_id, left=True)
        width = input_ids.shape[1]
        budget = max(max_new_tokens[i] for i in idx)
        if budget <= 0:
            continue
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=budget,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
        new = out[:, width:].tolist()
        for row, i in enumerate(idx):
            seq = new[row][: max_new_tokens[i]]
            cut = next((k for k, tok in enumerate(seq) if tok in stop), len(seq))
            results[i] = seq[:cut]
    return results


#: at most this many tokens beyond the target's length are generated per answer, to make up for the
#: space-only tokens the metric drops (a generation ``' 1 9 2 8'`` needs 8 tokens for a 4-digit answer)
MAX_EXTRA_TOKENS = 16


def _fill_generations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    generations: list[list[int]],
    budgets: list[int],
    eos: int | list[int] | None,
    batch_size: int,
) -> list[list[int]]:
    """Continue every generation that stopped at its budget before it had as many kept tokens as its target.

    Why: the model is asked for as many tokens as the target has, but the
    metric first drops space-only tokens, so a generation ``'  Paris'`` (a
    space token, then ``' Paris'``) spent its one-token budget on the space
    and scored 0 (the paper's code generates further, then drops, then
    clips).  Rows that ended at EOS are finished; the others get exactly the
    missing number of tokens, again and again, up to :data:`MAX_EXTRA_TOKENS`
    beyond the target's length.  Rows already filled cost nothing.
    """
    generations = [list(g) for g in generations]
    budgets = list(budgets)
    while True:
        seen = {tok for seq in list(generations) + list(targets) for tok in seq}
        ignore = ignored_token_ids(tokenizer, seen)
        todo: list[tuple[int, int]] = []
        for i, (gen, tgt) in enumerate(zip(generations, targets, strict=True)):
            stopped_at_eos = len(gen) < budgets[i]
            missing = sum(t not in ignore for t in tgt) - sum(t not in ignore for t in gen)
            room = len(tgt) + MAX_EXTRA_TOKENS - budgets[i]
            if not stopped_at_eos and missing > 0 and room > 0:
                todo.append((i, min(missing, room)))
        if not todo:
            return generations
        more = greedy_generate(model, [list(prompts[i]) + generations[i] for i, _n in todo], [n for _i, n in todo],
                               _pad_token_id(tokenizer), eos, batch_size=batch_size)
        for (i, n), extra in zip(todo, more, strict=True):
            generations[i].extend(extra)
            budgets[i] += n


def evaluate_edits(
    model: Any,
    tokenizer: Any,
    edits: Sequence[EditRecord],
    batch_size: int = 16,
    max_new_tokens: int | None = None,
) -> Scores:
    """Edit success, generalization and locality (token F1, averaged over the records).

    ``max_new_tokens=None`` generates as many tokens as each target has, and
    more where space-only tokens (which the metric drops) used up that budget
    before the answer was complete (:func:`_fill_generations`); the F1 clips
    to the target's length, so more would be wasted compute.  An integer fixes
    the budget for every prompt (still clipped for scoring).
    Returns ``{"edit_success", "edit_generalization", "edit_locality"}`` with
    each record's score attached (:class:`shared.item_scores.Scores`).
    """
    if not edits:
        raise ValueError("evaluate_edits needs at least one edit record")
    # one job per (prompt, target): (record index, kind)
    jobs: list[tuple[int, str]] = []
    prompts: list[list[int]] = []
    targets: list[list[int]] = []
    for r, rec in enumerate(edits):
        pairs = [("success", rec.src, rec.alt)]
        pairs += [("generalization", q, rec.alt) for q in rec.rephrase]
        pairs.append(("locality", rec.loc, rec.loc_ans))
        for kind, question, answer in pairs:
            p, t = encode_edit_example(tokenizer, question, answer)
            jobs.append((r, kind))
            prompts.append(p)
            targets.append(t)

    budgets = [len(t) if max_new_tokens is None else max_new_tokens for t in targets]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        generations = greedy_generate(
            model, prompts, budgets, _pad_token_id(tokenizer), eos, batch_size=batch_size
        )
        if max_new_tokens is None:
            generations = _fill_generations(model, tokenizer, prompts, targets, generations, budgets, eos, batch_size)
    finally:
        model.train(was_training)

    seen = {tok for seq in generations + targets for tok in seq}
    ignore = ignored_token_ids(tokenizer, seen)
    per_record: dict[str, list[list[float]]] = {
        k: [[] for _ in edits] for k in ("success", "generalization", "locality")
    }
    for (r, kind), gen, tgt in zip(jobs, generations, targets, strict=True):
        per_record[kind][r].append(token_f1(gen, tgt, ignore))

    def mean(xs: Sequence[float]) -> float:
        return float(sum(xs) / len(xs))

    # one item per record (generalization: the mean over its rephrases), kept for the bootstrap
    return Scores.from_items({
        f"edit_{kind}": ItemScores.of([mean(scores) for scores in per_record[kind]])
        for kind in ("success", "generalization", "locality")
    })

"""Sanity checks for the built-in data packs in ``shared/data/builtin/`` (no model needed)."""

from __future__ import annotations

import pytest

from shared.data import BUILTIN_DIR, BUILTIN_FILES, load_field

MCQ_FIELDS = ("utility_mcq", "forget_mcq")
CORPUS_FIELDS = ("forget_corpus", "retain_corpus", "calibration", "perplexity")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_every_builtin_file_exists_and_loads():
    for name, fname in BUILTIN_FILES.items():
        assert (BUILTIN_DIR / fname).is_file(), fname
        assert load_field(name), name


def test_edits():
    edits = load_field("edits")
    # enough records that a bootstrap interval over edits means something (issue 19: >= 300)
    assert len(edits) >= 300
    subjects = [_norm(e.subject) for e in edits]
    assert len(set(subjects)) == len(subjects), "edit subjects must be unique (case-insensitive)"
    for e in edits:
        assert e.alt.strip(), e.subject
        assert e.loc_ans.strip(), e.subject
        assert e.src.strip() and e.loc.strip(), e.subject
        assert 1 <= len(e.rephrase) <= 2, e.subject
        # the subject appears in the prompt and its paraphrases (needed to locate it for ROME/MEMIT)
        assert e.subject in e.src, e.subject
        for r in e.rephrase:
            assert e.subject in r and r != e.src, e.subject
        assert _norm(e.alt) != _norm(e.loc_ans), e.subject


@pytest.mark.parametrize("name", MCQ_FIELDS)
def test_mcq_shape(name):
    rows = load_field(name)
    assert len(rows) >= 100
    for q in rows:
        assert len(q.choices) == 4
        assert len({_norm(c) for c in q.choices}) == 4, q.question
        assert all(c.strip() for c in q.choices), q.question
    assert {q.answer for q in rows} == {0, 1, 2, 3}
    # roughly balanced: no answer position holds more than 35% of the questions
    for k in range(4):
        assert sum(q.answer == k for q in rows) <= 0.35 * len(rows), (name, k)


def test_mcq_questions_unique_within_and_across_sets():
    seen: dict[str, str] = {}
    for name in MCQ_FIELDS:
        for q in load_field(name):
            key = _norm(q.question)
            assert key not in seen, f"{q.question!r} in {name} duplicates one in {seen.get(key)}"
            seen[key] = name


@pytest.mark.parametrize("name", CORPUS_FIELDS)
def test_corpora_non_empty(name):
    docs = load_field(name)
    assert docs
    assert all(len(d.text.split()) >= 40 for d in docs), name
    texts = [_norm(d.text) for d in docs]
    assert len(set(texts)) == len(texts), f"duplicate documents in {name}"


def test_corpus_sizes():
    assert len(load_field("forget_corpus")) >= 60
    assert len(load_field("retain_corpus")) >= 60
    assert len(load_field("calibration")) >= 64
    assert len(load_field("perplexity")) >= 30


def test_corpora_disjoint():
    sets = {name: {_norm(d.text) for d in load_field(name)} for name in CORPUS_FIELDS}
    assert not sets["forget_corpus"] & sets["retain_corpus"]
    # held-out perplexity text shares no document with any other corpus
    others = sets["forget_corpus"] | sets["retain_corpus"] | sets["calibration"]
    assert not sets["perplexity"] & others


def test_retain_corpus_avoids_forget_domain():
    words = ("animal", "mammal", "insect", "reptile", "amphibian")
    for d in load_field("retain_corpus"):
        low = d.text.lower()
        assert not any(w in low for w in words), d.text[:60]


@pytest.mark.slow
def test_base_model_answers_the_locality_questions_and_not_the_new_answers(smollm2_dir):
    """Base-model figures of the edit pack (docs/data.md states them): locality high, no edit pre-applied.

    Measured on a fixed sample of 100 records (the whole pack: docs/data.md) with the project's own
    metric and prompt, float32.
    """
    import random

    from shared.evaluation import evaluate_edits
    from shared.models import load_model

    model, tok = load_model(smollm2_dir)
    edits = load_field("edits")
    sample = random.Random(0).sample(edits, 100)
    res = evaluate_edits(model, tok, sample, batch_size=16)
    assert res["edit_locality"] >= 0.9  # the old 68-record pack: 0.36
    assert res["edit_success"] <= 0.02 and res["edit_generalization"] <= 0.02

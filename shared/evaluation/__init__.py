"""Evaluators: each maps a model (in memory) and the experiment's data to criteria.

An evaluator is a callable ``(model, tokenizer, data, options) -> {criterion: value}``
registered under a name (the dict may be a :class:`shared.item_scores.Scores`
carrying each criterion's per-item scores, which the evaluation task stores
for the bootstrap); the criteria it returns are those of
:mod:`shared.criteria` whose ``evaluator`` field is that name.  Adding an
evaluator means adding one entry to :data:`EVALUATORS` (or calling
:func:`register_evaluator`) -- callers look evaluators up by name and never
branch on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.data import ExperimentData
from shared.evaluation.compression import measure_compression
from shared.evaluation.edit import edit_prompt, edit_target, encode_edit_example, evaluate_edits, token_f1
from shared.evaluation.mcq import evaluate_harness_task, evaluate_mcq
from shared.evaluation.perplexity import document_nll, perplexity
from shared.item_scores import ItemScores, Scores


class EvalOptions(BaseModel):
    """Options shared by the evaluators (each reads the ones it needs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    batch_size: int = Field(16, ge=1, description="batch size of generation / scoring")
    limit: int | None = Field(None, ge=1, description="score only the first N questions (quick runs)")
    max_length: int = Field(256, ge=2, description="perplexity window length in tokens")
    mcq_format: Literal["cloze", "letters"] = Field(
        "cloze", description="scoring format of local multiple-choice sets: choice texts (cloze) or letters A-D"
    )
    compression: dict[str, Any] | None = Field(
        None, description="the checkpoint's compression record (method, bits, group_size...)"
    )


Evaluator = Callable[[Any, Any, ExperimentData, EvalOptions], dict[str, float]]


def _edit(model: Any, tokenizer: Any, data: ExperimentData, options: EvalOptions) -> dict[str, float]:
    return evaluate_edits(model, tokenizer, data.edits, batch_size=options.batch_size)


def _mcq(field: str, criterion: str) -> Evaluator:
    """An evaluator scoring the 4-choice file of data field ``field`` as ``criterion``."""

    def run(model: Any, tokenizer: Any, data: ExperimentData, options: EvalOptions) -> dict[str, float]:
        tasks = data.harness_tasks(field)
        if tasks is not None:
            # the harness's own tasks (cluster): the mean of their accuracies, as the paper
            # averaged WMDP bio and cyber
            runs = [
                evaluate_harness_task(model, tokenizer, task, batch_size=options.batch_size, limit=options.limit)
                for task in tasks
            ]
            values = [v for res in runs for v in res["item_acc"]]
            strata = [t for t, res in enumerate(runs) for _ in res["item_acc"]]
            # one stratum per task: the criterion stays the mean of the task accuracies
            return Scores.from_items({criterion: ItemScores.of(values, strata=strata if len(runs) > 1 else None)})
        res = evaluate_mcq(
            model, tokenizer, data.path(field), task_name=f"lmcompose_{field}",
            batch_size=options.batch_size, limit=options.limit, mcq_format=options.mcq_format,
        )
        return Scores.from_items({criterion: ItemScores.of(res["item_acc"])})

    run.__name__ = f"evaluate_{field}"
    run.__doc__ = f"{criterion}: lm-eval accuracy on the {field} file (or the mean over the lm-eval tasks it names)."
    return run


def _perplexity(model: Any, tokenizer: Any, data: ExperimentData, options: EvalOptions) -> dict[str, float]:
    texts = data.texts("perplexity")
    nll, tokens = document_nll(model, tokenizer, texts, max_length=options.max_length, batch_size=options.batch_size)
    # per document: summed NLL over its tokens; exp(sum / sum) is the token-weighted perplexity
    return Scores.from_items({"perplexity": ItemScores.of(nll, weights=tokens, transform="exp")})


def _compression(model: Any, tokenizer: Any, data: ExperimentData, options: EvalOptions) -> dict[str, float]:
    return measure_compression(model, options.compression)


#: evaluator name -> callable.  The names match ``Criterion.evaluator`` in shared.criteria.
EVALUATORS: dict[str, Evaluator] = {
    "edit": _edit,
    "utility": _mcq("utility_mcq", "utility_acc"),
    "forget": _mcq("forget_mcq", "forget_acc"),
    "perplexity": _perplexity,
    "compression": _compression,
}


#: evaluator name -> the data fields it reads; their content digests key its cached results in the store
EVALUATOR_DATA: dict[str, tuple[str, ...]] = {
    "edit": ("edits",),
    "utility": ("utility_mcq",),
    "forget": ("forget_mcq",),
    "perplexity": ("perplexity",),
    "compression": (),
}


#: evaluators that return per-item scores (:class:`shared.item_scores.Scores`); a stored result
#: of one of these without them is incomplete and is computed again (the bootstrap needs them)
EVALUATORS_WITH_ITEMS: set[str] = {"edit", "utility", "forget", "perplexity"}


def register_evaluator(name: str, fn: Evaluator, data_inputs: tuple[str, ...] = (), with_items: bool = False) -> Evaluator:
    """Add an evaluator under ``name`` (refuses to silently replace another one).

    ``with_items``: the evaluator returns per-item scores (a
    :class:`shared.item_scores.Scores`), so its results get intervals.
    """
    if name in EVALUATORS and EVALUATORS[name] is not fn:
        raise ValueError(f"evaluator {name!r} is already registered")
    EVALUATORS[name] = fn
    EVALUATOR_DATA[name] = tuple(data_inputs)
    if with_items:
        EVALUATORS_WITH_ITEMS.add(name)
    return fn


def available_evaluators() -> list[str]:
    """Names of the registered evaluators, sorted."""
    return sorted(EVALUATORS)


def get_evaluator(name: str) -> Evaluator:
    """The evaluator registered as ``name``; a clear error listing the choices otherwise."""
    try:
        return EVALUATORS[name]
    except KeyError:
        raise KeyError(
            f"unknown evaluator {name!r}; available: {', '.join(available_evaluators())}"
        ) from None


def run_evaluator(
    name: str,
    model: Any,
    tokenizer: Any,
    data: ExperimentData,
    options: EvalOptions | Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Look up ``name`` and run it, validating ``options`` (a dict is accepted)."""
    opts = options if isinstance(options, EvalOptions) else EvalOptions.model_validate(dict(options or {}))
    return get_evaluator(name)(model, tokenizer, data, opts)


__all__ = [
    "EVALUATORS",
    "EVALUATOR_DATA",
    "EVALUATORS_WITH_ITEMS",
    "EvalOptions",
    "Evaluator",
    "available_evaluators",
    "edit_prompt",
    "edit_target",
    "encode_edit_example",
    "evaluate_edits",
    "evaluate_harness_task",
    "evaluate_mcq",
    "get_evaluator",
    "measure_compression",
    "perplexity",
    "register_evaluator",
    "run_evaluator",
    "token_f1",
]

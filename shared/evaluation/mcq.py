"""4-choice accuracy (MMLU / WMDP style) through lm-evaluation-harness.

Local JSON-lines files (``{"question", "choices": [4], "answer": 0-3}``) are
turned into a harness task by writing a task YAML into a temporary include
directory; the harness's own tasks (``mmlu``, ``wmdp_bio``, ...) are run by
name in a cluster.  Going through the harness keeps the *mechanics* of scoring
(log-likelihood of each choice's continuation, ``acc``) the harness's own.
The *format* differs, and this is not the format published MMLU / WMDP
numbers use: by default (``mcq_format="cloze"``) local sets are scored
**cloze-style** -- the prompt is ``Question: ...\nAnswer:`` and each
candidate continuation is a choice's text -- while the harness's ``mmlu`` and
``wmdp_*`` tasks list the four choices in the prompt and score the letters
``A``-``D``.  ``mcq_format="letters"`` scores a local set in that published
format (the prompt of the harness's MMLU template: the question, the choices
as ``A. ...`` to ``D. ...``, then ``Answer:``; the continuations `` A`` to
`` D``), so local and cluster numbers are comparable.  The two formats give
different accuracies -- on a small model, very different ones: letter
scoring needs the model to map a letter to a listed choice, and the built-in
SmolLM2-135M scores at chance that way (utility 0.256, forget 0.250, float32;
cloze: 0.767 / 0.727) -- so compare numbers of one format only, and use
letters for models large enough to answer in that format.

Two harness gotchas handled here:

* ``simple_evaluate`` ignores its ``batch_size`` argument when given a model
  *object*; the batch size must be given to the ``HFLM`` wrapper (the
  reference code silently evaluated at batch size 1).
* ``data_files`` in a task YAML resolve against the current directory, so the
  YAML carries absolute paths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

#: cloze prompt of a question (the answer text of each choice follows it)
DOC_TO_TEXT = "Question: {{question}}\nAnswer:"

#: letter format: lm-eval's MMLU prompt (choices listed, the letters A-D scored)
LETTER_DOC_TO_TEXT = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
)
LETTERS = ["A", "B", "C", "D"]

#: the scoring formats of local multiple-choice sets
MCQ_FORMATS = ("cloze", "letters")

_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def task_config(path: Path, task_name: str, cache_dir: Path | None = None, mcq_format: str = "cloze") -> dict[str, Any]:
    """The lm-eval task config (as a dict) of a local 4-choice JSON-lines file, in ``mcq_format``."""
    if mcq_format not in MCQ_FORMATS:
        raise ValueError(f"mcq_format must be one of {', '.join(MCQ_FORMATS)} (got {mcq_format!r})")
    letters = mcq_format == "letters"
    dataset_kwargs: dict[str, Any] = {"data_files": {"test": str(Path(path).resolve())}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(cache_dir)
    return {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": dataset_kwargs,
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": LETTER_DOC_TO_TEXT if letters else DOC_TO_TEXT,
        "doc_to_choice": list(LETTERS) if letters else "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def write_task_yaml(
    path: Path, task_name: str, directory: Path, cache_dir: Path | None = None, mcq_format: str = "cloze"
) -> Path:
    """Write the task YAML for ``path`` into ``directory`` (an lm-eval include path)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", task_name):
        raise ValueError(f"task name {task_name!r} must be letters, digits, '_', '-', '.'")
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{task_name}.yaml"
    config = task_config(path, task_name, cache_dir, mcq_format)
    out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Forbid hub access for the duration (local tasks must never download anything).

    Sets the environment variables *and* the already-imported ``datasets`` /
    ``huggingface_hub`` constants, which are read once at import time.
    """
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_VARS}
    patched: list[tuple[Any, str, Any]] = []
    for k in _OFFLINE_VARS:
        os.environ[k] = "1"
    for module_name, attrs in (
        ("datasets.config", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")),
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
    ):
        module = __import__("sys").modules.get(module_name)
        for attr in attrs:
            if module is not None and hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_lm(model: Any, tokenizer: Any, batch_size: int = 16) -> Any:
    """Wrap an in-memory model for the harness, with the batch size *on the wrapper*."""
    from lm_eval.models.huggingface import HFLM

    if int(batch_size) < 1:
        raise ValueError("batch_size must be >= 1")
    # HFLM calls model.eval() and model.tie_weights() on the object it is given
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size))


@contextlib.contextmanager
def _keep_training_mode(model: Any) -> Iterator[None]:
    """Restore ``model.training`` afterwards (the harness switches the model to eval mode)."""
    was_training = getattr(model, "training", False)
    try:
        yield
    finally:
        if was_training:
            model.train()


def _run(lm: Any, tasks: list[str], task_manager: Any, limit: int | None) -> dict[str, dict[str, Any]]:
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        limit=limit,
        log_samples=True,  # the per-question scores: kept for the bootstrap (shared.item_scores)
        bootstrap_iters=0,
    )
    if results is None:  # non-zero rank in a distributed run
        return {}
    return results


def _metrics(results: dict[str, Any], task: str) -> dict[str, Any]:
    """acc, acc_norm and the number of questions scored for one task (or group) of a result."""
    res = results["results"][task]
    out: dict[str, Any] = {}
    for metric in ("acc", "acc_norm"):
        key = f"{metric},none"
        if key in res:
            out[metric] = float(res[key])
    samples = results.get("n-samples", {})
    groups = results.get("group_subtasks", {})

    def count(name: str) -> int:
        if name in samples:
            return int(samples[name]["effective"])
        # a group (mmlu -> mmlu_stem -> mmlu_anatomy ...): sum over its members
        return sum(count(sub) for sub in groups.get(name, []))

    out["n"] = count(task)
    out["item_acc"] = _item_accuracies(results, task)
    return out


def _item_accuracies(results: dict[str, Any], task: str) -> list[float]:
    """Per-question accuracy (0/1) of one task, in document order; a group's subtasks one after another.

    The order is the data's, so the same question sits at the same position
    in every model's list -- what a paired bootstrap needs.
    """
    samples = results.get("samples") or {}
    groups = results.get("group_subtasks", {})
    if task in samples:
        rows = sorted(samples[task], key=lambda r: int(r["doc_id"]))
        return [float(r["acc"]) for r in rows]
    out: list[float] = []
    for sub in sorted(groups.get(task, [])):
        out += _item_accuracies(results, sub)
    return out


def evaluate_mcq(
    model: Any,
    tokenizer: Any,
    path: Path,
    task_name: str,
    batch_size: int = 16,
    limit: int | None = None,
    mcq_format: str = "cloze",
) -> dict[str, Any]:
    """Accuracy of ``model`` on a local 4-choice JSON-lines file, scored by lm-eval.

    ``task_name`` names the generated task (e.g. ``utility_mcq``); ``limit``
    scores only the first questions; ``mcq_format`` is ``cloze`` (choice
    texts) or ``letters`` (the harness's MMLU format, see the module
    docstring).  Runs offline: nothing is downloaded.
    Returns ``{"acc", "acc_norm", "n", "item_acc", "batch_size"}`` --
    ``item_acc`` the per-question 0/1 scores in file order, ``batch_size``
    the batch size the harness wrapper actually holds, reported so that a run
    can show it did not fall back to 1.
    """
    from lm_eval.tasks import TaskManager

    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice file {path} does not exist")
    with _keep_training_mode(model), tempfile.TemporaryDirectory(prefix="lmcompose-mcq-") as tmp:
        lm = make_lm(model, tokenizer, batch_size)
        tasks_dir = Path(tmp) / "tasks"
        write_task_yaml(path, task_name, tasks_dir, cache_dir=Path(tmp) / "datasets-cache", mcq_format=mcq_format)
        with offline():
            # include_defaults=False: indexing the ~15k built-in task YAMLs costs ~8 s
            manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
            results = _run(lm, [task_name], manager, limit)
    return {**_metrics(results, task_name), "batch_size": lm.batch_size}


def evaluate_harness_task(
    model: Any,
    tokenizer: Any,
    task: str,
    batch_size: int = 16,
    limit: int | None = None,
) -> dict[str, Any]:
    """Accuracy on one of the harness's own tasks or groups (``mmlu``, ``wmdp_bio``...).

    These download their data from the hub, so this is for cluster runs; for a
    group, ``acc`` is the harness's aggregate and ``n`` the questions scored
    over its subtasks.  ``limit`` applies per subtask.
    """
    from lm_eval.tasks import TaskManager

    with _keep_training_mode(model):
        lm = make_lm(model, tokenizer, batch_size)
        results = _run(lm, [task], TaskManager(), limit)
    return {**_metrics(results, task), "batch_size": lm.batch_size}

"""Data packs: formats, loaders and the per-experiment data bundle.

Every data set is a JSON-lines file in the format of the corresponding cluster
dataset, so the same code reads the built-in packs and real data:

* edits (zsRE style): ``{"subject", "src", "alt", "rephrase": [..], "loc", "loc_ans"}``
  -- ``src`` is the edit prompt, ``alt`` the new target, ``rephrase`` paraphrased
  prompts (generalization), ``loc``/``loc_ans`` an unrelated question and its
  true answer (locality).
* 4-choice questions (MMLU / WMDP style): ``{"question", "choices": [4 strings], "answer": 0-3}``
* text corpora (forget, retain, calibration, perplexity): ``{"text": "..."}``

The built-in packs live in ``shared/data/builtin/`` and are written for this
project.  A data field in an experiment spec is ``builtin``, a path to a file
of the same format, an ``s3://bucket/key`` object of that format, or -- for
the 4-choice fields -- ``lm-eval:task[,task]`` (see :mod:`shared.data.sources`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.data.sources import SourceError, fetch_s3, harness_tasks, is_harness, is_s3

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

#: data field -> file name of its built-in pack
BUILTIN_FILES: dict[str, str] = {
    "edits": "edits.jsonl",
    "utility_mcq": "utility_mcq.jsonl",
    "forget_mcq": "forget_mcq.jsonl",
    "forget_corpus": "forget_corpus.jsonl",
    "retain_corpus": "retain_corpus.jsonl",
    "calibration": "calibration.jsonl",
    "perplexity": "perplexity.jsonl",
}


#: fields that may name lm-eval harness tasks instead of a file (4-choice question sets)
MCQ_FIELDS = ("utility_mcq", "forget_mcq")


class DataError(ValueError):
    """A data file that is missing or malformed (message names the file and line)."""


class EditRecord(BaseModel):
    """One zsRE-style counterfactual edit."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    subject: str
    src: str
    alt: str
    rephrase: list[str] = Field(min_length=1)
    loc: str
    loc_ans: str

    @field_validator("rephrase", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class MultipleChoice(BaseModel):
    """One 4-choice question."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    question: str
    choices: list[str] = Field(min_length=4, max_length=4)
    answer: int = Field(ge=0, le=3)


class TextDoc(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    text: str = Field(min_length=1)


_ROW_MODELS: dict[str, type[BaseModel]] = {
    "edits": EditRecord,
    "utility_mcq": MultipleChoice,
    "forget_mcq": MultipleChoice,
    "forget_corpus": TextDoc,
    "retain_corpus": TextDoc,
    "calibration": TextDoc,
    "perplexity": TextDoc,
}


def resolve_path(field_name: str, source: str) -> Path:
    """File behind a data field: the built-in pack for ``builtin``, a downloaded copy of an S3 object, else the path."""
    if field_name not in BUILTIN_FILES:
        raise DataError(f"unknown data field {field_name!r}; known: {', '.join(BUILTIN_FILES)}")
    if is_harness(source):
        raise DataError(f"data.{field_name} names lm-eval tasks ({source!r}), not a file")
    if is_s3(source):
        try:
            return fetch_s3(source)
        except SourceError as exc:
            raise DataError(f"data.{field_name}: {exc}") from None
    path = BUILTIN_DIR / BUILTIN_FILES[field_name] if source == "builtin" else Path(source).expanduser()
    return path.resolve()


def read_jsonl(path: Path, row_model: type[BaseModel]) -> list[Any]:
    """Read and validate a JSON-lines file; errors name the file and the line."""
    if path.is_dir():
        raise DataError(f"data file {path} is a directory; expected a JSON-lines file")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(row_model.model_validate(json.loads(line)))
            except Exception as exc:  # json or validation error
                raise DataError(f"{path}:{lineno}: not a valid {row_model.__name__} record: {exc}") from exc
    if not rows:
        raise DataError(f"data file {path} is empty")
    return rows


def load_field(field_name: str, source: str = "builtin") -> list[Any]:
    """Load and validate one data field."""
    return read_jsonl(resolve_path(field_name, source), _ROW_MODELS[field_name])


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class DataConfig(BaseModel):
    """The ``data:`` section of an experiment spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    edits: str = "builtin"
    utility_mcq: str = "builtin"
    forget_mcq: str = "builtin"
    forget_corpus: str = "builtin"
    retain_corpus: str = "builtin"
    calibration: str = "builtin"
    perplexity: str = "builtin"
    num_edits: int = Field(10, ge=1, description="edits per batch")
    edit_seed: int = Field(0, description="seed choosing which records form the batches")
    num_batches: int = Field(
        1,
        ge=1,
        le=1000,
        description="disjoint edit batches; every composition is run once per batch and the "
        "results are averaged over the batches (the paper: 10 batches of 50 edits)",
    )
    edit_batch: int = Field(
        0, ge=0, description="the batch a pipeline task works on (set by the pipeline, one value per batch)"
    )

    @field_validator(*BUILTIN_FILES)
    @classmethod
    def _source_syntax(cls, v: str, info: Any) -> str:
        """Check a source's form without touching the network (S3 objects are fetched by ``check_files``)."""
        if not v.strip():
            raise ValueError("must be 'builtin', a file path, s3://bucket/key or (question sets) lm-eval:task[,task]")
        if is_harness(v):
            if info.field_name not in MCQ_FIELDS:
                raise ValueError(
                    f"lm-eval tasks can only stand for a 4-choice question set ({', '.join(MCQ_FIELDS)}), "
                    f"not for {info.field_name}"
                )
            harness_tasks(v)
        elif is_s3(v):
            from shared.store import StoreError
            from shared.store_s3 import parse_s3_uri

            try:
                _bucket, key = parse_s3_uri(v)
            except StoreError as exc:
                raise ValueError(str(exc)) from None
            if not key or v.endswith("/"):
                raise ValueError(f"{v!r} names a bucket or prefix, not an object (s3://bucket/path/file.jsonl)")
        return v

    @model_validator(mode="after")
    def _batch_in_range(self) -> "DataConfig":
        if self.edit_batch >= self.num_batches:
            raise ValueError(f"edit_batch ({self.edit_batch}) must be below num_batches ({self.num_batches})")
        return self

    def for_batch(self, batch: int) -> "DataConfig":
        """The same data with edit batch ``batch`` selected (what the pipeline hands batch ``batch``'s tasks)."""
        return self.model_validate({**self.model_dump(), "edit_batch": batch})

    def file_fields(self) -> list[str]:
        """The fields read from a file (all but those naming lm-eval tasks)."""
        return [name for name in BUILTIN_FILES if not is_harness(getattr(self, name))]

    def paths(self) -> dict[str, Path]:
        return {name: resolve_path(name, getattr(self, name)) for name in self.file_fields()}

    def check_files(self, fetch_remote: bool = True) -> None:
        """Fail early (before any model work) if a data file is missing or malformed.

        S3 objects are downloaded and checked too unless ``fetch_remote`` is
        false (compiling for a cluster whose data this machine cannot read);
        lm-eval tasks are the harness's to load.
        """
        for name in self.file_fields():
            if not fetch_remote and is_s3(getattr(self, name)):
                continue
            rows = load_field(name, getattr(self, name))
            needed = self.num_edits * self.num_batches
            if name == "edits" and len(rows) < needed:
                what = f"data.num_edits={self.num_edits}" + (
                    f" x data.num_batches={self.num_batches} (disjoint batches) = {needed}" if self.num_batches > 1 else ""
                )
                raise DataError(f"{what} but {resolve_path(name, self.edits)} has only {len(rows)} records")


@dataclass
class ExperimentData:
    """The data one experiment uses, loaded lazily, with content digests for cache keys."""

    config: DataConfig = field(default_factory=DataConfig)

    def path(self, name: str) -> Path:
        return resolve_path(name, getattr(self.config, name))

    def harness_tasks(self, name: str) -> list[str] | None:
        """The lm-eval tasks a 4-choice field names, or None when it is a file."""
        source = getattr(self.config, name)
        return harness_tasks(source) if is_harness(source) else None

    def digest(self, name: str) -> str:
        """Content digest of a data input, including the selection for ``edits``.

        For lm-eval tasks: the task names and the harness version (the
        harness owns the data; a new release may change it).
        """
        tasks = self.harness_tasks(name)
        if tasks is not None:
            from importlib.metadata import version

            return hashlib.sha256(f"lm-eval {version('lm_eval')}:{','.join(tasks)}".encode()).hexdigest()
        base = file_digest(self.path(name))
        if name == "edits":
            selection = f"{base}:{self.config.num_edits}:{self.config.edit_seed}"
            if self.config.edit_batch:  # batch 0 keeps the key it had before batches existed
                selection += f":batch{self.config.edit_batch}"
            base = hashlib.sha256(selection.encode()).hexdigest()
        return base

    @cached_property
    def edits(self) -> list[EditRecord]:
        """The edit batch ``edit_batch``: ``num_edits`` records, disjoint from the other batches.

        Batches are drawn one after another from the records not yet chosen,
        with one random generator seeded by ``edit_seed``; so batch ``b``
        depends on the seed and ``b`` only, never on ``num_batches``, and batch
        0 is the single batch a one-batch experiment uses.
        """
        n, b = self.config.num_edits, self.config.edit_batch
        records = load_field("edits", self.config.edits)
        if len(records) < n * (b + 1):
            raise DataError(
                f"edit batch {b} of {n} edits needs {n * (b + 1)} records, {self.path('edits')} has {len(records)}"
            )
        rng = random.Random(self.config.edit_seed)
        remaining = list(records)
        for _ in range(b + 1):
            batch = rng.sample(remaining, n)
            chosen = {id(r) for r in batch}
            remaining = [r for r in remaining if id(r) not in chosen]
        return batch

    def texts(self, name: str) -> list[str]:
        return [row.text for row in load_field(name, getattr(self.config, name))]

    def questions(self, name: str) -> list[MultipleChoice]:
        return load_field(name, getattr(self.config, name))

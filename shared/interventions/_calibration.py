"""Calibration batches for the compressors (Wanda, SparseGPT, GPTQ, AWQ).

The paper calibrates on fixed-length windows cut from a text corpus (128 C4
windows).  The same is done here on the experiment's ``calibration`` texts, so
nothing is ever fetched from a dataset hub: the documents are tokenized,
joined with the EOS token and cut into ``seq_len``-token windows.  The result
is deterministic (no shuffling), so a given corpus and setting always produce
the same calibration set -- which the content-addressed checkpoint keys rely
on.
"""

from __future__ import annotations

from typing import Any

import torch


def calibration_windows(tokenizer: Any, texts: list[str], num_samples: int, seq_len: int) -> list[list[int]]:
    """Cut ``texts`` into at most ``num_samples`` windows of ``seq_len`` token ids.

    Documents are concatenated (separated by EOS) so that short documents do
    not yield short, padding-dominated samples.  If the corpus is too small
    for ``num_samples`` full windows, the trailing partial window is kept when
    it has at least a quarter of ``seq_len`` tokens; fewer windows than
    requested are returned rather than repeating text (repeats would bias the
    activation statistics).
    """
    if num_samples < 1 or seq_len < 1:
        raise ValueError("num_samples and seq_len must be positive")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    needed = num_samples * seq_len
    for text in texts:
        if not text:
            continue
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= needed:
            break
    windows = [stream[i : i + seq_len] for i in range(0, min(len(stream), needed), seq_len)]
    if windows and len(windows[-1]) < max(1, seq_len // 4) and len(windows) > 1:
        windows.pop()
    if not windows:
        raise ValueError("calibration corpus produced no tokens")
    return windows


def calibration_tensors(
    tokenizer: Any, texts: list[str], num_samples: int, seq_len: int
) -> list[dict[str, torch.Tensor]]:
    """The calibration windows as a list of single-sample ``input_ids``/``attention_mask`` batches."""
    return [
        {
            "input_ids": torch.tensor([w], dtype=torch.long),
            "attention_mask": torch.ones(1, len(w), dtype=torch.long),
        }
        for w in calibration_windows(tokenizer, texts, num_samples, seq_len)
    ]


def calibration_dataset(tokenizer: Any, texts: list[str], num_samples: int, seq_len: int) -> Any:
    """The calibration windows as a tokenized ``datasets.Dataset`` (what ``llmcompressor.oneshot`` takes).

    Because the dataset already has an ``input_ids`` column, llm-compressor
    uses it as-is and never tries to load or tokenize anything itself.
    """
    from datasets import Dataset

    windows = calibration_windows(tokenizer, texts, num_samples, seq_len)
    return Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})

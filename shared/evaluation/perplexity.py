"""Perplexity on held-out text (the utility criterion beside MMLU-style accuracy).

Token-weighted: the mean negative log-likelihood over *all* predicted tokens of
all texts, then ``exp``.  (Averaging per-text perplexities instead would let a
few short texts dominate.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from shared.evaluation._batching import pad_batch
import torch.nn.functional as F


def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Non-overlapping windows of at most ``max_length`` tokens.

    Long texts are scored in full rather than cut off; windows of a single
    token predict nothing and are dropped.
    """
    return [w for w in (ids[i : i + max_length] for i in range(0, len(ids), max_length)) if len(w) > 1]


@torch.no_grad()
def sequence_nll(
    model: Any, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 8
) -> tuple[float, int]:
    """Summed NLL and number of predicted tokens over token sequences (each scored on its own)."""
    nll, tokens = per_sequence_nll(model, sequences, pad_token_id, batch_size)
    return float(sum(nll)), int(sum(tokens))


@torch.no_grad()
def per_sequence_nll(
    model: Any, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 8
) -> tuple[list[float], list[int]]:
    """Summed NLL and number of predicted tokens of each token sequence (each scored on its own).

    Sequences are right-padded into batches; padding is excluded both from
    attention and from the loss, so a padded row scores exactly what it would
    alone.  Cross-entropy is computed row by row to keep the peak memory at one
    ``[length, vocab]`` block instead of ``[batch, length, vocab]`` twice.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    nll = [0.0] * len(sequences)
    tokens = [0] * len(sequences)
    for start in range(0, len(order), max(1, batch_size)):
        idx = order[start : start + batch_size]
        input_ids, attention = pad_batch([sequences[i] for i in idx], pad_token_id, left=False)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        for row, i in enumerate(idx):
            n = len(sequences[i])
            pred = logits[row, : n - 1].float()
            target = input_ids[row, 1:n].to(pred.device)
            nll[i] = float(F.cross_entropy(pred, target, reduction="sum"))
            tokens[i] = n - 1
        del logits
    return nll, tokens


def perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 256, batch_size: int = 8
) -> float:
    """Token-weighted perplexity of ``model`` on ``texts``.

    Each text is tokenized (with the tokenizer's special tokens, e.g. BOS) and
    split into non-overlapping windows of ``max_length`` tokens, each scored
    independently (the first token of a window is context only).  Returns
    ``exp(sum NLL / number of predicted tokens)``.
    """
    nll, tokens = document_nll(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    return math.exp(sum(nll) / sum(tokens))


def document_nll(
    model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 256, batch_size: int = 8
) -> tuple[list[float], list[int]]:
    """Summed NLL and number of predicted tokens of each text (its windows together).

    The per-document pieces of :func:`perplexity` -- the items a bootstrap
    resamples.  Texts too short to predict a token are left out.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2 (one context and one predicted token)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences: list[list[int]] = []
    owner: list[int] = []
    for t, text in enumerate(texts):
        windows = _windows(list(tokenizer(text)["input_ids"]), max_length)
        sequences += windows
        owner += [t] * len(windows)
    if not sequences:
        raise ValueError("no text with at least two tokens to score")
    was_training = model.training
    model.eval()
    try:
        nll, tokens = per_sequence_nll(model, sequences, int(pad or 0), batch_size=batch_size)
    finally:
        model.train(was_training)
    docs = sorted(set(owner))
    doc_nll = {d: 0.0 for d in docs}
    doc_tokens = {d: 0 for d in docs}
    for d, v, n in zip(owner, nll, tokens, strict=True):
        doc_nll[d] += v
        doc_tokens[d] += n
    return [doc_nll[d] for d in docs], [doc_tokens[d] for d in docs]

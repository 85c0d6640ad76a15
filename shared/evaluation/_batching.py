"""Padding token sequences into one batch -- shared by generation (left-padded) and scoring (right-padded)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for ``sequences`` padded to the longest one.

    Generation needs left padding (every prompt ends at the last column);
    scoring uses right padding (positions line up with the tokens).
    """
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids = torch.tensor(list(seq), dtype=torch.long)
        cols = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, cols] = ids
        attention[row, cols] = 1
    return input_ids, attention

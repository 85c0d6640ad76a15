"""Shared pieces of the unlearning methods: corpus batches, masked LM loss, trainable subsets, the training loop.

The paper's unlearners train on documents of a forget corpus (and, for GD and
RMU, a retain corpus), a few documents per batch, each truncated to a fixed
number of tokens.  Batches here are built the same way from the experiment's
``forget_corpus`` / ``retain_corpus`` texts: documents in a seeded order,
cycled when more batches are asked for than the corpus holds, right-padded,
and padding masked out of every loss (the reference code trained on padding
tokens).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def text_batches(
    tokenizer: Any, texts: list[str], batch_size: int, seq_len: int, num_batches: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """``num_batches`` right-padded batches of ``batch_size`` documents, each truncated to ``seq_len`` tokens.

    Documents are shuffled with ``seed`` and taken in that order, starting
    over (reshuffled) when the corpus is used up.  Each row starts with the
    tokenizer's BOS token if it has one.  ``labels`` are the input ids with
    -100 on padding.
    """
    docs = [t for t in texts if t and t.strip()]
    if not docs:
        raise ValueError("the corpus has no text")
    rng = random.Random(seed)
    order: list[str] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for _ in range(num_batches):
        rows = []
        for _ in range(batch_size):
            if not order:
                order = list(docs)
                rng.shuffle(order)
            ids = bos + tokenizer(order.pop(), add_special_tokens=False)["input_ids"]
            rows.append(ids[:seq_len])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def lm_loss(model: Any, batch: dict[str, torch.Tensor], cap: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding tokens of ``batch``.

    With ``cap``, each token's loss is clamped at ``cap`` nats first, so a
    token already pushed past it contributes no gradient: ascent on such a
    loss stops per token instead of running away (see ``GAParams.forget_loss_cap``).
    """
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    if cap is None:
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    counted = labels.reshape(-1) != -100
    return per_token.clamp(max=cap)[counted].mean()


def check_layers(model: Any, layers: list[int], method: str, field: str = "layers") -> None:
    n = len(model.model.layers)
    bad = [i for i in layers if i >= n]
    if bad:
        raise ValueError(f"{method} {field} {layers} out of range: the model has {n} layers (0..{n - 1})")


def upper_half(model: Any) -> list[int]:
    """The upper half of the decoder layers (the paper trained layers 16-31 of 32)."""
    n = len(model.model.layers)
    return list(range(n // 2, n))


@contextmanager
def only_trainable(model: Any, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """Freeze everything but ``params`` and eval mode (no dropout) for the block; restore flags and mode after."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[n])
        model.train(was_training)


def layer_parameters(model: Any, layers: list[int], with_final_norm: bool) -> dict[str, torch.nn.Parameter]:
    """All parameters of the given decoder layers (and the final norm), by their full names."""
    chosen = {f"model.layers.{i}." for i in layers}
    out = {n: p for n, p in model.named_parameters() if any(n.startswith(c) for c in chosen)}
    if with_final_norm:
        out.update({n: p for n, p in model.named_parameters() if n.startswith("model.norm.")})
    return out


def sequence_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per document: summed next-token negative log-likelihood over its non-padding tokens, and their count.

    The preference-style unlearners (NPO, SimNPO) score whole responses,
    ``-log pi(y|x)`` = the summed NLL, rather than the token mean of :func:`lm_loss`.
    """
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    counted = labels != -100
    return (per_token * counted).sum(dim=1), counted.sum(dim=1)


#: a forget loss: ``(index of the batch, the batch) -> loss to descend`` (GA: minus the LM loss)
ForgetLoss = Callable[[int, dict[str, torch.Tensor]], torch.Tensor]


def forget_training(
    method: str,
    model: Any,
    tokenizer: Any,
    params: Any,
    data: Any,
    forget_loss: ForgetLoss,
    retain_weight: float = 0.0,
    prepare: Callable[[list[dict[str, torch.Tensor]]], None] | None = None,
) -> dict[str, Any]:
    """The training loop every loss-based unlearner shares (GA, GD, NPO, SimNPO); only the forget loss differs.

    Builds ``steps x grad_accum`` forget batches (and as many retain batches
    when ``retain_weight`` > 0), trains the chosen layers (``params.layers``,
    default the upper half, plus the final norm) with Adam on
    ``forget_loss(i, forget[i]) + retain_weight * NLL(retain[i])``, averaged
    over the ``grad_accum`` batches of a step.  ``prepare(forget_batches)``
    runs once, without gradients, on the model as it comes in (NPO's reference
    likelihoods).  Returns the record: what was trained, the LM losses of the
    first forget / retain batch before and after.
    """
    import time

    layers = params.layers if params.layers is not None else upper_half(model)
    check_layers(model, layers, method)
    micro_batches = params.steps * params.grad_accum
    forget = text_batches(tokenizer, data.texts("forget_corpus"), params.batch_size, params.seq_len, micro_batches, params.seed)
    retain = (
        text_batches(tokenizer, data.texts("retain_corpus"), params.batch_size, params.seq_len, micro_batches, params.seed + 1)
        if retain_weight > 0
        else []
    )
    trained = layer_parameters(model, layers, params.train_final_norm)
    start = time.perf_counter()
    with only_trainable(model, trained):
        with torch.no_grad():
            if prepare is not None:
                prepare(forget)
            forget_before = float(lm_loss(model, forget[0]))
            retain_before = float(lm_loss(model, retain[0])) if retain else None
        optimizer = torch.optim.Adam(list(trained.values()), lr=params.lr)
        for step in range(params.steps):
            optimizer.zero_grad(set_to_none=True)
            # gradient accumulation: the mean of grad_accum batches' losses, one batch in memory at a time
            for micro in range(step * params.grad_accum, (step + 1) * params.grad_accum):
                loss = forget_loss(micro, forget[micro])
                if retain:
                    loss = loss + retain_weight * lm_loss(model, retain[micro])
                (loss / params.grad_accum).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            forget_after = float(lm_loss(model, forget[0]))
            retain_after = float(lm_loss(model, retain[0])) if retain else None
    seconds = time.perf_counter() - start
    return {
        "unlearn": {
            "method": method,
            "layers": layers,
            "trained_parameters": int(sum(p.numel() for p in trained.values())),
            "forget_loss_before": round(forget_before, 4),
            "forget_loss_after": round(forget_after, 4),
            "retain_loss_before": None if retain_before is None else round(retain_before, 4),
            "retain_loss_after": None if retain_after is None else round(retain_after, 4),
        },
        "seconds": round(seconds, 2),
    }

"""Perplexity: mean next-token negative log-likelihood over token windows, exponentiated.

Each window is scored on its own (no context carried across windows): positions 1..S-1 are predicted
from the tokens before them, exactly what `model(input_ids=w, labels=w).loss` averages in transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int

    def as_dict(self) -> dict:
        return asdict(self)


def _batch_size(seq_len: int, vocab: int, budget_bytes: int = 512 * 2**20) -> int:
    # float32 logits dominate memory: keep B x S x V x 4 bytes under the budget.
    return max(1, budget_bytes // max(1, seq_len * vocab * 4))


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, *, batch_size: int | None = None,
               on_batch: Callable[[int], None] | None = None) -> Perplexity:
    """Perplexity of `model` on token windows [N, S] (see module docstring)."""
    n, seq_len = windows.shape
    device = next(model.parameters()).device
    bs = batch_size or _batch_size(seq_len, int(model.config.vocab_size))
    total, count = 0.0, 0
    for start in range(0, n, bs):
        batch = windows[start: start + bs].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total += float(nll)
        count += targets.numel()
        if on_batch:
            on_batch(batch.shape[0])
    mean = total / count
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=count, windows=n, seq_len=seq_len)


# ---------------------------------------------------------------- sliding windows (stride)


@dataclass(frozen=True)
class Span:
    """One sliding window: tokens [begin, end) are fed to the model; tokens [score_from, end) are scored,
    each predicted from the tokens of the window before it."""

    begin: int
    end: int
    score_from: int


def sliding_spans(n_tokens: int, seq_len: int, stride: int) -> list[Span]:
    """Windows of at most `seq_len` tokens starting every `stride` tokens, covering the whole stream
    (the Hugging Face "perplexity of fixed-length models" scheme). A window scores only the tokens no
    earlier window scored, so every token after the first is scored exactly once when stride < seq_len,
    with at least seq_len - stride tokens of context (except in the first window). stride == seq_len
    gives non-overlapping windows (each window's first token is then context-free and not scored)."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), found {stride}")
    spans: list[Span] = []
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + seq_len, n_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            spans.append(Span(begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def sliding_perplexity(model: Any, stream: torch.Tensor, *, seq_len: int, stride: int, max_windows: int | None = None,
                       batch_size: int | None = None, on_batch: Callable[[int], None] | None = None) -> Perplexity:
    """Perplexity of `model` on a 1-D token stream with sliding windows (see `sliding_spans`): the sum of
    the scored tokens' NLL over their count. `max_windows` keeps the first windows only."""
    spans = sliding_spans(stream.numel(), seq_len, stride)[:max_windows]
    device = next(model.parameters()).device
    bs = batch_size or _batch_size(seq_len, int(model.config.vocab_size))
    total, count = 0.0, 0
    # Windows of equal length batch together; only the last window of a stream can be shorter.
    groups: dict[int, list[Span]] = {}
    for s in spans:
        groups.setdefault(s.end - s.begin, []).append(s)
    for length, group in groups.items():
        for start in range(0, len(group), bs):
            chunk = group[start: start + bs]
            batch = torch.stack([stream[s.begin: s.end] for s in chunk]).to(device)  # [B, L]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [B, L-1, V]
            targets = batch[:, 1:]  # target j sits at stream position begin + j + 1
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  reduction="none").view(len(chunk), length - 1)
            pos = torch.arange(1, length, device=device)[None, :] + torch.tensor([s.begin for s in chunk],
                                                                               device=device)[:, None]
            keep = pos >= torch.tensor([s.score_from for s in chunk], device=device)[:, None]
            total += float(nll[keep].double().sum())
            count += int(keep.sum())
            if on_batch:
                on_batch(len(chunk))
    if count == 0:
        raise ValueError(f"no token to score: the stream has {stream.numel()} tokens")
    mean = total / count
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=count, windows=len(spans), seq_len=seq_len)

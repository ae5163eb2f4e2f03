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

"""Pure cores of structured pruning: importance scores in, kept indices and target sizes out.

No I/O, no hooks, no transformers: tensors and integers only, so every rule here is unit-testable and
shared by `prune_heads` and `prune_ffn`.

Conventions (shapes in comments): a layer has `heads` query heads and `kv` key/value heads of
`head_dim` each; query head h reads KV head h // (heads // kv) (transformers' repeat_kv), so the query
heads of KV group j are the contiguous block j*G .. j*G+G-1 with G = heads // kv. An FFN has `I`
intermediate channels: rows of gate/up, columns of down.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------- target sizes (the plan's arithmetic)


def round_half_down(x: float) -> int:
    """Nearest integer; an exact half goes down (toward the smaller model)."""
    return math.ceil(x - 0.5)


def kept_from_ratio(total: int, ratio: float) -> int:
    """How many of `total` units stay when a fraction `ratio` of them is removed: the nearest count,
    halves toward removing more. May be 0 or `total`: the caller decides whether that is allowed."""
    return round_half_down(total * (1.0 - ratio))


def round_to_multiple(width: float, multiple_of: int) -> int:
    """`width` rounded to the nearest multiple of `multiple_of` (halves down), never below one multiple.

    Nearest rather than down: a ratio is an approximation of the size wanted (3/7 written as 0.4286), and
    rounding down would turn 8191.6 into 8128 instead of 8192; it also keeps the error symmetric, at most
    half a multiple either way. Never 0: a width under half a multiple becomes one multiple."""
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, found {multiple_of}")
    return max(multiple_of, multiple_of * round_half_down(width / multiple_of))


def scaled_width(width: int, fraction: float, multiple_of: int) -> int:
    """A secondary FFN width (the shared expert, the dense layers of an MoE model) scaled by the same
    `fraction` as the main width, rounded like it, and never grown past its current `width`."""
    return min(width, round_to_multiple(width * fraction, multiple_of))


# ---------------------------------------------------------------- selection


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the `k` highest scores, in increasing index order. Ties keep the lower index (a stable
    sort), so equal scores give a deterministic choice. scores: [n]."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()}")
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def group_sum(values: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum consecutive equal blocks: [groups * size] -> [groups] (e.g. per-row scores -> per-head)."""
    return values.reshape(groups, -1).sum(dim=1)


def query_heads(kept_kv: list[int], group_size: int) -> list[int]:
    """The query heads that go with the kept KV heads (group j owns heads j*G .. j*G+G-1)."""
    return [j * group_size + t for j in kept_kv for t in range(group_size)]


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of a projection's output (or o_proj's input columns) for the given heads: [len*head_dim]."""
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


# ---------------------------------------------------------------- activation statistics (Minitron)


def window_means(values: torch.Tensor, window: torch.Tensor, n_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window mean of per-token values. values: [T, C], window: [T] (the window each token came
    from, in 0..n_windows-1). Returns (means [n_windows, C], tokens per window [n_windows]); windows
    without tokens have mean 0."""
    sums = torch.zeros(n_windows, values.shape[1], dtype=torch.float64, device=values.device)
    sums.index_add_(0, window, values.double())
    counts = torch.bincount(window, minlength=n_windows).to(values.device)
    return sums / counts.clamp(min=1).unsqueeze(1), counts


class Aggregate:
    """Minitron's aggregation of activation statistics: mean over a window's tokens, then the L2 norm
    over windows (the batch). Accumulates window by window; `scores()` gives [C]."""

    def __init__(self, channels: int):
        self.square_sum = torch.zeros(channels, dtype=torch.float64)
        self.windows = 0

    def add(self, means: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """means: [W, C] per-window means; present: [W] bool, windows that saw any token (MoE experts)."""
        if present is not None:
            means = means[present]
        self.square_sum += means.double().pow(2).sum(dim=0).cpu()
        self.windows += means.shape[0]

    def scores(self) -> torch.Tensor:
        return self.square_sum.sqrt()


def head_output_norms(attn_out: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-head L2 norm of attention outputs (o_proj's input): [B, S, heads*head_dim] -> per-window mean
    over tokens [B, heads]."""
    b, s, width = attn_out.shape
    return attn_out.float().view(b, s, width // head_dim, head_dim).norm(dim=-1).mean(dim=1)


def channel_magnitudes(act: torch.Tensor) -> torch.Tensor:
    """Mean |activation| per FFN channel and window: act(gate)*up [B, S, I] -> [B, I]."""
    return act.float().abs().mean(dim=1)


# ---------------------------------------------------------------- weight-based scores


def row_square_norms(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of squares of each row (dim=1 reduces over inputs: one value per output row) or column."""
    return weight.float().pow(2).sum(dim=dim)


def taylor_terms(weight: torch.Tensor, grad: torch.Tensor, dim: int) -> torch.Tensor:
    """LLM-Pruner's first-order (element-wise) Taylor importance |dL/dw * w|, summed along `dim`."""
    return (grad.float() * weight.float()).abs().sum(dim=dim)

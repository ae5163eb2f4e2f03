"""Attention transfer: MiniLMv2's self-attention relations (Wang et al. 2021), the `loss.attention` term.

What is compared. At a mapped decoder layer (the pairs of the hidden term; MiniLMv2 itself takes one
upper layer, `hidden_layers` can choose it), the outputs of q_proj, k_proj and v_proj, taken with forward
hooks: the projections themselves, before RoPE and before Qwen3/Gemma 3's q/k norms, as MiniLMv2 takes
them. So the Q-Q and K-K relations compare what the tokens' vectors hold, not where the tokens are (RoPE
would add the same position-dependent rotation on both sides), and the hooks need no eager attention
and work on an offloaded teacher and inside FSDP's sharded layers. Each projection, [B, S, W] with W = heads x head_dim (KV heads under
GQA: k and v are narrower than q), is cut along W into R relation heads of width d = W / R, and relation
head r's relation is softmax(A_r A_r^T / sqrt(d)) over the tokens a row may see: itself and the earlier
ones (causal, as the decoders see them). The student's relation [R, S, S] is compared with the
teacher's by KL(teacher || student) per row, averaged over rows, relation heads and the batch; the term
is the mean over Q-Q, K-K, V-V and the mapped layers.

Why relations, not attention maps: R is the same on both sides while W is not (d is each side's own
width / R), so a student that lost heads (prune_heads), or any teacher whose widths R divides, compares
directly: no head has to correspond to a head.

Memory: the relations are never whole. `relation_kl` is an autograd function that walks query rows
`ROWS` at a time (each row needs only the columns up to itself) and holds four float32 [B, R, rows,
tokens] blocks, reused from block to block; it saves for backward its two inputs (references), and the
backward pass recomputes each block and writes its gradient into one float32 [B, S, W] tensor (beside
float32 copies of both inputs cut into relation heads, the size of the inputs). The student's gradient
is closed form: with G = p_s - p_t per block (zero after the row's own column), dL/dA_i = sum_j G_ij A_j
/ sqrt(d) and dL/dA_j = sum_i G_ij A_i / sqrt(d). Time: O(B R S^2) per projection and layer on each side,
forward and again backward; on stories260K (5 layers, 256 tokens, a tiny model) the term nearly doubles a
logits-only step (eval/bench_attention.py: 122 s against 66 s for 80 steps).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

PROJECTIONS = ("q_proj", "k_proj", "v_proj")
ROWS = 256  # query rows per block: [B, R, 256, S] float32 blocks (S 2048, R 8: 16 MiB per window)


def widths(heads: int, kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """Output widths of q_proj, k_proj, v_proj."""
    return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


def relation_heads(requested: int | None, student: tuple[int, int, int], teacher: tuple[int, int, int],
                   most: int) -> int:
    """The number of relation heads R: `requested`, which must divide the q/k/v widths of both sides, or
    (None) the largest R <= `most` (the fewer KV heads of the two sides, so that no relation head is
    narrower than a head) that does. Raises ValueError (one line) when `requested` does not divide."""
    named = [("student", p, w) for p, w in zip(PROJECTIONS, student)] + \
            [("teacher", p, w) for p, w in zip(PROJECTIONS, teacher)]
    if requested is not None:
        groups: dict[tuple[str, int], list[str]] = {}
        for who, p, w in named:
            if w % requested:
                groups.setdefault((who, w), []).append(p)
        bad = [f"the {who}'s {'/'.join(ps)} width {w}" for (who, w), ps in groups.items()]
        if bad:
            g = math.gcd(*(w for _, _, w in named))
            ok = [r for r in range(1, g + 1) if g % r == 0]
            raise ValueError(f"attention_relation_heads {requested} does not divide {', '.join(bad)} "
                             f"(q/k/v widths: student {'/'.join(map(str, student))}, teacher "
                             f"{'/'.join(map(str, teacher))}); choose one of {', '.join(map(str, ok))}")
        return requested
    g = math.gcd(*(w for _, _, w in named))
    return max(r for r in range(1, max(1, min(most, g)) + 1) if g % r == 0)


# ---------------------------------------------------------------- the chunked relation KL


def _heads(x: Tensor, heads: int) -> Tensor:
    """[B, S, W] -> float32 [B x R, S, W / R], contiguous (a copy of the input's size)."""
    b, s, w = x.shape
    return x.float().view(b, s, heads, w // heads).transpose(1, 2).reshape(b * heads, s, w // heads)


# what rows add to the columns after them: exp() of it is exactly 0 in float32 (and, unlike -inf, the
# teacher's and the student's log-probabilities there subtract to 0, not nan)
HIDDEN = -1e30


def _causal(i0: int, i1: int, device: torch.device) -> Tensor:
    """[i1 - i0, i1] float32: 0 where row i may see column j (j <= i), HIDDEN after it."""
    future = torch.arange(i1, device=device) > torch.arange(i0, i1, device=device)[:, None]
    return torch.zeros(future.shape, device=device).masked_fill_(future, HIDDEN)


def _logits(a: Tensor, i0: int, i1: int, mask: Tensor, out: Tensor) -> Tensor:
    """a_i . a_j / sqrt(d) + mask for query rows i0..i1-1 and columns 0..i1-1, into `out` [B x R, i1 - i0,
    i1] (scaling and the causal mask ride on the one batched matmul)."""
    return torch.baddbmm(mask, a[:, i0:i1], a[:, :i1].transpose(1, 2), alpha=1.0 / math.sqrt(a.shape[-1]), out=out)


def _buffers(a: Tensor, rows: int, count: int) -> list[Tensor]:
    """`count` flat float32 buffers of one block each, reused by every block: a fresh multi-MiB tensor per
    operation costs as much as the operation (page faults), measured on the CPU."""
    return [torch.empty(a.shape[0] * min(rows, a.shape[1]) * a.shape[1], device=a.device) for _ in range(count)]


def _block(buf: Tensor, a: Tensor, i0: int, i1: int) -> Tensor:
    """The first [B x R, i1 - i0, i1] of a flat buffer, contiguous."""
    return buf[: a.shape[0] * (i1 - i0) * i1].view(a.shape[0], i1 - i0, i1)


class _RelationKL(torch.autograd.Function):
    """sum over batch, relation heads and rows of KL(teacher row || student row), divided by B x R x S;
    gradient w.r.t. the student only, recomputed block by block in backward. Working memory: four
    float32 blocks [B x R, rows, S] (three in backward) and the inputs cut into relation heads (float32
    copies)."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, heads: int, rows: int) -> Tensor:
        a_s, a_t = _heads(student, heads), _heads(teacher, heads)
        bufs = _buffers(a_s, rows, 4)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        n = student.shape[1]
        for i0 in range(0, n, rows):
            i1 = min(n, i0 + rows)
            mask = _causal(i0, i1, student.device)
            z, pt, lt, ls = (_block(b, a_s, i0, i1) for b in bufs)
            _logits(a_t, i0, i1, mask, z)
            # p_t by softmax, not exp(log p_t): exp of the hidden columns' huge negatives takes a slow path
            torch.softmax(z, dim=-1, out=pt)
            torch.log_softmax(z, dim=-1, out=lt)
            torch.log_softmax(_logits(a_s, i0, i1, mask, z), dim=-1, out=ls)
            d = lt.sub_(ls)  # 0 after the row's own column: HIDDEN - lse is HIDDEN on both sides
            total += torch.dot(pt.view(-1), d.view(-1))  # sum of p_t (log p_t - log p_s)
        ctx.save_for_backward(student, teacher)
        ctx.args = (heads, rows)
        return total / (student.shape[0] * heads * n)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        student, teacher = ctx.saved_tensors
        heads, rows = ctx.args
        a_s, a_t = _heads(student, heads), _heads(teacher, heads)
        bufs = _buffers(a_s, rows, 3)
        b, n = student.shape[:2]
        scale = 1.0 / (b * heads * n * math.sqrt(a_s.shape[-1]))  # grad_out joins at the end (no device sync)
        grad = torch.zeros_like(a_s)  # [B x R, S, d] float32
        for i0 in range(0, n, rows):
            i1 = min(n, i0 + rows)
            mask = _causal(i0, i1, student.device)
            z, ps, pt = (_block(buf, a_s, i0, i1) for buf in bufs)
            torch.softmax(_logits(a_s, i0, i1, mask, z), dim=-1, out=ps)
            torch.softmax(_logits(a_t, i0, i1, mask, z), dim=-1, out=pt)
            g = ps.sub_(pt)  # p_s - p_t: d loss / d logits (0 after the row's own column)
            grad[:, i0:i1].baddbmm_(g, a_s[:, :i1], alpha=scale)  # the rows' own vectors
            grad[:, :i1].baddbmm_(g.transpose(1, 2), a_s[:, i0:i1], alpha=scale)  # the columns they looked at
        grad.mul_(grad_out.float())
        d = a_s.shape[-1]
        return grad.view(b, heads, n, d).transpose(1, 2).reshape(student.shape).to(student.dtype), None, None, None


def relation_kl(student: Tensor, teacher: Tensor, heads: int, *, rows: int = ROWS) -> Tensor:
    """Mean over the batch, `heads` relation heads and the tokens of KL(teacher || student) between the
    causal self-relations softmax(A_r A_r^T / sqrt(d)) of one projection. student [B, S, Ws], teacher
    [B, S, Wt] (any float dtypes; math in float32; the gradient in the student's dtype); `heads` must
    divide Ws and Wt. Memory: see the module docstring."""
    if student.dim() != 3 or teacher.shape[:2] != student.shape[:2]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} are not [B, S, W] "
                         "over the same tokens")
    if student.shape[-1] % heads or teacher.shape[-1] % heads:
        raise ValueError(f"{heads} relation heads do not divide the widths {student.shape[-1]} (student) and "
                         f"{teacher.shape[-1]} (teacher)")
    with torch.autocast(student.device.type, enabled=False):  # float32 blocks, whatever the caller's autocast
        return _RelationKL.apply(student, teacher.detach(), int(heads), int(rows))


def relation_kl_reference(student: Tensor, teacher: Tensor, heads: int) -> Tensor:
    """The same quantity with plain autograd (whole [B, R, S, S] relations): what tests hold relation_kl to."""
    n = student.shape[1]
    future = torch.arange(n, device=student.device) > torch.arange(n, device=student.device)[:, None]

    def log_relation(x: Tensor) -> Tensor:
        a = _heads(x, heads)
        z = a @ a.transpose(-1, -2) / math.sqrt(a.shape[-1])
        return torch.log_softmax(z.masked_fill(future, float("-inf")), dim=-1)

    ls, lt = log_relation(student), log_relation(teacher.detach())
    kl = torch.where(future, 0.0, lt.exp() * (lt - ls))
    return kl.sum() / (student.shape[0] * heads * n)


# ---------------------------------------------------------------- capture and the term


def projection_hooks(layer: nn.Module, store: dict[str, Tensor]) -> list[Any]:
    """Forward hooks that store the outputs of the layer's q_proj, k_proj, v_proj (whatever module sits
    there: a Linear, a LoRA layer, a fake-quantized one) into `store` by name; remove the handles when done."""
    attn: Any = layer.self_attn
    return [getattr(attn, p).register_forward_hook(lambda _m, _a, out, p=p: store.__setitem__(p, out))
            for p in PROJECTIONS]


def collect_projections(layers: nn.ModuleList, wanted: list[int]) -> tuple[dict[int, dict[str, Tensor]], list[Any]]:
    """projection_hooks on decoder layers `wanted`: {layer: {q_proj|k_proj|v_proj: [B, S, W]}} and the handles."""
    store: dict[int, dict[str, Tensor]] = {i: {} for i in wanted}
    return store, [h for i in wanted for h in projection_hooks(layers[i], store[i])]


def attention_loss(student: dict[int, dict[str, Tensor]], teacher: dict[int, dict[str, Tensor]],
                   mapping: dict[int, int], heads: int, *, rows: int = ROWS) -> Tensor:
    """The term: relation_kl of Q-Q, K-K and V-V at every (student layer, teacher layer) pair, averaged."""
    return torch.stack([relation_kl(student[s][p], teacher[t][p], heads, rows=rows)
                        for s, t in mapping.items() for p in PROJECTIONS]).mean()


def describe(heads: int, student: tuple[int, int, int], teacher: tuple[int, int, int]) -> str:
    """The stage note: which path computed the term, and its relation heads."""
    return (f"MiniLMv2 relations Q-Q, K-K, V-V from the q/k/v projections (forward hooks, before RoPE), "
            f"{heads} relation heads over q/k/v widths {'/'.join(map(str, student))} (student) and "
            f"{'/'.join(map(str, teacher))} (teacher), KL(teacher || student) per causal row")

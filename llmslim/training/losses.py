"""Distillation losses: pure functions on tensors (no model, no I/O).

logits — KL divergence between temperature-softened teacher and student distributions, times T^2 (so
  gradients keep their scale as T changes; Hinton et al. 2015). `reverse` mixes in KL(student || teacher):
  0 = forward KL(teacher || student) (mass-covering, Minitron's choice), 1 = reverse (mode-seeking).
topk — forward KL against a teacher known only by its top-k logits (teacher_topk's disk cache).
hidden — normalised MSE ||s - t||^2 / ||t||^2 per token (scale-free across layers), or 1 - cosine.
lm — next-token cross-entropy on the data.

Memory of the two logits losses, N tokens, vocabulary V (Llama-3: V = 128,256, so one [N, V] tensor is
0.26 MB per token in bf16, 0.51 MB in float32). What exists whatever the loss: the student's logits [N, V]
(the model produced them), the teacher's logits [N, V] (or its top-k [N, k]), and the gradient of the loss
with respect to the student's logits, [N, V] in the student's dtype, which autograd must hand to the
lm_head. The losses add O(N x chunk) to that, nothing of size N x V: a custom autograd function computes
per-token log-sum-exps and KL sums in float32, chunk by chunk over the vocabulary, and saves for the
backward pass its inputs (references, not copies), a few [N] vectors and (topk) [N, k]; the backward pass
recomputes the probabilities chunk by chunk and writes each chunk of the gradient straight into that one
[N, V] tensor. A token mask selects rows chunk by chunk (no masked copy of the logits). Working set: about
four float32 [N, chunk] blocks (8192 tokens, chunk 8192: 268 MB each). The costs of this: the inputs stay
alive until the backward pass (the plain formulation keeps float32 log-probabilities instead, larger),
and the exponentials are computed twice. Still inherent here: the student's full logits and their
gradient (a fused lm_head + loss would avoid both, computing logits chunk by chunk from the hidden
states); eval/bench_kl_memory.py measures this against the plain log_softmax formulation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _block(x: Tensor, i: int, chunk: int, rows: Tensor | None, scale: float) -> Tensor:
    """x[..., i:i + chunk] * scale as a fresh float32 [n, c] tensor (safe to modify in place): every row of
    the flattened leading dims, or only `rows`."""
    b = x[..., i: i + chunk]
    b = b.reshape(-1, b.shape[-1])  # a view for logits as a model yields them (contiguous [B, S, V])
    if rows is not None:
        b = b.index_select(0, rows)
    return torch.empty(b.shape, dtype=torch.float32, device=b.device).copy_(b).mul_(scale)


def _lse(x: Tensor, scale: float, chunk: int, rows: Tensor | None) -> Tensor:
    """logsumexp(x * scale) over the last dim, in float32, chunk by chunk: [n]."""
    parts = [torch.logsumexp(_block(x, i, chunk, rows, scale), dim=-1) for i in range(0, x.shape[-1], chunk)]
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


def _rows(mask: Tensor | None, student: Tensor) -> tuple[Tensor | None, int]:
    """(indices of the masked-in tokens in the flattened leading dims, or None for all; their count)."""
    if mask is None:
        return None, student[..., 0].numel()
    if mask.shape != student.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the logits' tokens {tuple(student.shape[:-1])}")
    rows = mask.reshape(-1).to(student.device).nonzero().squeeze(1)
    return rows, rows.numel()


def _new_grad(student: Tensor, rows: Tensor | None) -> Tensor:
    """The one [..., V] gradient in the student's dtype; zeros where masked-out rows are never written."""
    make = torch.empty if rows is None else torch.zeros
    return make(student.shape, dtype=student.dtype, device=student.device)


def _write(grad: Tensor, i: int, rows: Tensor | None, g: Tensor) -> None:
    """Store the float32 block g [n, c] as grad[..., i:i + c] (at `rows`), cast to the gradient's dtype."""
    dst = grad.view(-1, grad.shape[-1])[:, i: i + g.shape[-1]]
    if rows is None:
        dst.copy_(g)
    else:
        dst[rows] = g.to(grad.dtype)  # index_put_ on a view: writes into grad


class _ChunkedKL(torch.autograd.Function):
    """sum over tokens of (1 - r) KL(t || s) + r KL(s || t), on logits / T, times T^2, divided by `count`;
    gradient w.r.t. the student only, recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: Tensor | None, count: int, temperature: float,
                reverse: float, chunk: int) -> Tensor:
        inv = 1.0 / temperature
        lse_s, lse_t = _lse(student, inv, chunk, rows), _lse(teacher, inv, chunk, rows)  # [n]
        fwd, rev = torch.zeros_like(lse_s), torch.zeros_like(lse_s)
        for i in range(0, student.shape[-1], chunk):
            ls = _block(student, i, chunk, rows, inv).sub_(lse_s[:, None])  # log p_s [n, c]
            lt = _block(teacher, i, chunk, rows, inv).sub_(lse_t[:, None])  # log p_t
            pt = lt.exp() if reverse < 1 else None
            d = lt.sub_(ls)  # log p_t - log p_s
            if pt is not None:
                fwd += pt.mul_(d).sum(-1)
            if reverse:  # E_s[log p_s - log p_t]: the reverse term's gradient needs it too
                rev -= ls.exp_().mul_(d).sum(-1)
        ctx.save_for_backward(student, teacher, rows, lse_s, lse_t, rev)
        ctx.args = (count, temperature, reverse, chunk)
        return ((1 - reverse) * fwd + reverse * rev).sum() * (temperature**2 / max(count, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        student, teacher, rows, lse_s, lse_t, rev = ctx.saved_tensors
        count, temperature, reverse, chunk = ctx.args
        inv = 1.0 / temperature
        scale = grad_out.float() * (temperature / max(count, 1))  # d/dlogit of (KL / T)-terms x T^2 / count
        grad = _new_grad(student, rows)
        for i in range(0, student.shape[-1], chunk):
            ls = _block(student, i, chunk, rows, inv).sub_(lse_s[:, None])
            lt = _block(teacher, i, chunk, rows, inv).sub_(lse_t[:, None])
            ps = ls.exp()
            if reverse:  # p_s ((1 - r) + r (log p_s/p_t - KL(s||t))) - (1 - r) p_t
                d = ls.sub_(lt).sub_(rev[:, None]).mul_(reverse).add_(1 - reverse)
                g = ps.mul_(d).sub_(lt.exp_().mul_(1 - reverse))
            else:  # forward KL: p_s - p_t
                g = ps.sub_(lt.exp_())
            _write(grad, i, rows, g.mul_(scale))
        return grad, None, None, None, None, None, None


class _ChunkedTopKKL(torch.autograd.Function):
    """sum over tokens of KL(t_k || s) with t_k the teacher renormalised over its top k tokens (indices
    [n, k]), times T^2, divided by `count`: the gradient is (p_s - t_k scattered to the vocabulary) x T."""

    @staticmethod
    def forward(ctx, student: Tensor, values: Tensor, indices: Tensor, rows: Tensor | None, count: int,
                temperature: float, chunk: int) -> Tensor:
        inv = 1.0 / temperature
        k = values.shape[-1]
        lse_s = _lse(student, inv, chunk, rows)  # [n]
        picked = student.gather(-1, indices).reshape(-1, k)  # the student's logits at the teacher's top k
        vals, idx = values.reshape(-1, k), indices.reshape(-1, k)
        if rows is not None:
            picked, vals, idx = picked.index_select(0, rows), vals.index_select(0, rows), idx.index_select(0, rows)
        lt = torch.log_softmax(vals.float() * inv, dim=-1)  # [n, k]
        ls = picked.float() * inv - lse_s[:, None]
        pt = lt.exp()
        ctx.save_for_backward(student, rows, idx, pt, lse_s)
        ctx.args = (count, temperature, chunk)
        return (pt * (lt - ls)).sum() * (temperature**2 / max(count, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        student, rows, idx, pt, lse_s = ctx.saved_tensors
        count, temperature, chunk = ctx.args
        scale = grad_out.float() * (temperature / max(count, 1))
        grad = _new_grad(student, rows)
        for i in range(0, student.shape[-1], chunk):
            g = _block(student, i, chunk, rows, 1.0 / temperature).sub_(lse_s[:, None]).exp_()  # p_s
            local = idx - i  # the top-k tokens that fall in this chunk get - t_k
            inside = (local >= 0) & (local < g.shape[-1])
            g.scatter_add_(-1, local.clamp(0, g.shape[-1] - 1), torch.where(inside, -pt, 0.0))
            _write(grad, i, rows, g.mul_(scale))
        return grad, None, None, None, None, None, None


def kl_logits(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, reverse: float = 0.0,
              chunk: int = 8192, mask: Tensor | None = None) -> Tensor:
    """Mean over (unmasked) tokens of the mixed KL of temperature-softened distributions, x T^2.

    student, teacher: [..., V] logits (any float dtype; math in float32; the gradient in the student's
    dtype); mask: [...] bool, the tokens to count. Memory: see the module docstring."""
    if not 0.0 <= reverse <= 1.0:
        raise ValueError(f"reverse must be in [0, 1], got {reverse}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student.shape)} differ")
    rows, count = _rows(mask, student)
    return _ChunkedKL.apply(student, teacher.detach(), rows, count, float(temperature), float(reverse), int(chunk))


def kl_logits_reference(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, reverse: float = 0.0) -> Tensor:
    """The same quantity with plain autograd (whole vocabulary at once): what tests hold kl_logits to."""
    ls = torch.log_softmax(student.float() / temperature, -1)
    lt = torch.log_softmax(teacher.float().detach() / temperature, -1)
    fwd = (lt.exp() * (lt - ls)).sum(-1)
    rev = (ls.exp() * (ls - lt)).sum(-1)
    return ((1 - reverse) * fwd + reverse * rev).mean() * temperature**2


def kl_topk(student: Tensor, top_values: Tensor, top_indices: Tensor, *, temperature: float = 1.0,
            chunk: int = 8192, mask: Tensor | None = None) -> Tensor:
    """Forward KL against a teacher known only by its top-k logits (a disk cache of them): the teacher's
    distribution renormalised over its k most likely tokens, the student's log-probabilities (over the
    whole vocabulary) gathered there; mean over (unmasked) tokens, x T^2. student [..., V]; top_values,
    top_indices [..., k]; mask [...] bool. Memory as kl_logits (chunked over the vocabulary)."""
    if top_values.shape != top_indices.shape or top_values.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"top-k values {tuple(top_values.shape)} / indices {tuple(top_indices.shape)} do not "
                         f"match the student's logits {tuple(student.shape)}")
    rows, count = _rows(mask, student)
    return _ChunkedTopKKL.apply(student, top_values.detach(), top_indices.long(), rows, count, float(temperature),
                                int(chunk))


def hidden_loss(student: Tensor, teacher: Tensor, kind: str = "nmse") -> Tensor:
    """Mean over tokens of ||s - t||^2 / ||t||^2 (nmse) or 1 - cos(s, t) (cosine); [..., H] inputs."""
    s, t = student.float(), teacher.float().detach()
    if kind == "nmse":
        return ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"hidden loss kind must be nmse or cosine, got {kind!r}")


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy: logits [B, S, V] predict tokens[:, 1:]."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             tokens[:, 1:].reshape(-1))

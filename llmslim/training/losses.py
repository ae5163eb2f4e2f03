"""Distillation losses: pure functions on tensors (no model, no I/O).

logits — KL divergence between temperature-softened teacher and student distributions, times T^2 (so
  gradients keep their scale as T changes; Hinton et al. 2015). `reverse` mixes in KL(student || teacher):
  0 = forward KL(teacher || student) (mass-covering, Minitron's choice), 1 = reverse (mode-seeking).
  Computed in float32 in vocabulary chunks by a custom autograd function that also produces its gradient
  chunk by chunk, so a [tokens x 128k] batch never holds more than one float32 [tokens x chunk] block per
  side, in the forward or the backward pass. Two passes over the chunks: log-sum-exps, then the terms.
hidden — normalised MSE ||s - t||^2 / ||t||^2 per token (scale-free across layers), or 1 - cosine.
lm — next-token cross-entropy on the data.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _lse(x: Tensor, scale: float, chunk: int) -> Tensor:
    """logsumexp(x * scale) over the last dim, in float32, chunk by chunk: [N]."""
    parts = [torch.logsumexp(x[:, i: i + chunk].float() * scale, dim=-1) for i in range(0, x.shape[-1], chunk)]
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


class _ChunkedKL(torch.autograd.Function):
    """sum over tokens of (1 - r) KL(t || s) + r KL(s || t), on logits / T, times T^2; grad w.r.t. student."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: float, reverse: float, chunk: int) -> Tensor:
        inv = 1.0 / temperature
        lse_s, lse_t = _lse(student, inv, chunk), _lse(teacher, inv, chunk)  # [N]
        # E_s[log p_s - log p_t] for the reverse term's gradient: needs a first full pass
        rev_kl = torch.zeros_like(lse_s)
        fwd_kl = torch.zeros_like(lse_s)
        for i in range(0, student.shape[-1], chunk):
            ls = student[:, i: i + chunk].float() * inv - lse_s[:, None]  # log p_s
            lt = teacher[:, i: i + chunk].float() * inv - lse_t[:, None]  # log p_t
            fwd_kl += (lt.exp() * (lt - ls)).sum(-1)
            rev_kl += (ls.exp() * (ls - lt)).sum(-1)
        grad = torch.empty_like(student)  # d loss / d student logits, in the student's dtype
        for i in range(0, student.shape[-1], chunk):
            ls = student[:, i: i + chunk].float() * inv - lse_s[:, None]
            lt = teacher[:, i: i + chunk].float() * inv - lse_t[:, None]
            ps, pt = ls.exp(), lt.exp()
            g = (1 - reverse) * (ps - pt)  # forward KL: (p_s - p_t) / T per logit
            if reverse:
                g = g + reverse * ps * ((ls - lt) - rev_kl[:, None])  # reverse KL: p_s (log p_s/p_t - KL) / T
            grad[:, i: i + chunk] = (g * temperature).to(grad.dtype)  # x T^2 / T
        ctx.save_for_backward(grad)
        return ((1 - reverse) * fwd_kl + reverse * rev_kl).sum() * temperature**2

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def kl_logits(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, reverse: float = 0.0,
              chunk: int = 8192, mask: Tensor | None = None) -> Tensor:
    """Mean over (unmasked) tokens of the mixed KL of temperature-softened distributions, x T^2.

    student, teacher: [..., V] logits (any float dtype; math in float32); mask: [...] bool, tokens to count."""
    if not 0.0 <= reverse <= 1.0:
        raise ValueError(f"reverse must be in [0, 1], got {reverse}")
    s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]).detach()
    if mask is not None:
        keep = mask.reshape(-1)
        s, t = s[keep], t[keep]
    n = max(s.shape[0], 1)
    return _ChunkedKL.apply(s, t, float(temperature), float(reverse), int(chunk)) / n


def kl_logits_reference(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, reverse: float = 0.0) -> Tensor:
    """The same quantity with plain autograd (whole vocabulary at once): what tests hold kl_logits to."""
    ls = torch.log_softmax(student.float() / temperature, -1)
    lt = torch.log_softmax(teacher.float().detach() / temperature, -1)
    fwd = (lt.exp() * (lt - ls)).sum(-1)
    rev = (ls.exp() * (ls - lt)).sum(-1)
    return ((1 - reverse) * fwd + reverse * rev).mean() * temperature**2


def kl_topk(student: Tensor, top_values: Tensor, top_indices: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Forward KL against a teacher known only by its top-k logits (a disk cache of them): the teacher's
    distribution renormalised over its k most likely tokens, the student's log-probabilities (over the
    whole vocabulary) gathered there. student [..., V]; top_values, top_indices [..., k]."""
    ls = torch.log_softmax(student.float() / temperature, -1).gather(-1, top_indices.long())
    lt = torch.log_softmax(top_values.float() / temperature, -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean() * temperature**2


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

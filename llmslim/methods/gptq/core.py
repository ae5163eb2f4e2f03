"""GPTQ and round-to-nearest (RTN) weight quantization: pure functions on tensors.

Integer convention (compressed-tensors / vLLM, so an exporter passes values straight through): for
`bits` b, the quantized value q and the zero point z are signed integers in
[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1], stored as int8, and the weight they stand for is
(q - z) * scale. Scales and zero points are compressed-tensors' min-max ones (`calculate_qparams`):
the group's range is first widened to contain 0, then
- symmetric:  scale = max|w| / ((2^b - 1) / 2), z = 0
- asymmetric: scale = (max(w, 0) - min(w, 0)) / (2^b - 1), z = round(clamp(qmin - min(w, 0) / scale))
and q = round(clamp(w / scale + z, qmin, qmax)) (round half to even, as torch.round). A zero scale
(an all-zero group) becomes the scale dtype's eps, so no scale is ever 0, NaN or inf.

Groups: `group_size` -1 is one group per output row (per-channel); otherwise each row is cut into
groups of `group_size` consecutive input columns, and the width must be a multiple of it.

GPTQ (Frantar et al. 2022) quantizes one input column at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse of the layer's input Hessian
H = 2/n X^T X, so that ||W X - Q X|| rather than ||W - Q|| is what stays small. Here, as in the paper:
the rows of the upper Cholesky factor of H^-1 give the update directions; columns go in blocks whose
updates to later columns are deferred to one matrix product per block ("lazy batch" updates); with
act_order the columns are visited by decreasing diag(H) (most-used inputs first).
Everything is computed in float32 (float64 when W is float64, for reference checks) on the tensors' own
device; nothing here logs, prints or does I/O.

On a CPU the quantizers run on one thread (`one_thread`): GPTQ's column loop and the mse observer are
many small operations on vectors of a few hundred to a few thousand values, which a second thread does
not speed up, and whose every step waits for all of torch's threads: while another process holds a
core, that wait dominates. Measured on a 2-core EPYC with one core busy (a 1536 x 576 matrix, W4 g64,
act-order): minmax 2.82 s on 2 threads, 0.23 s on 1; mse 22.8 s and 0.69 s. One thread also makes the
results independent of the machine's thread count (reductions sum in one order).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "CrossAccumulator",
    "HessianAccumulator",
    "QuantResult",
    "asymmetric_target",
    "dequantize",
    "dequantize_groups",
    "gptq_quantize",
    "quantization_params",
    "quantize",
    "rtn_quantize",
]

_DAMP_TRIES = 5  # dampening, then x10 up to four more times, before giving up on a non-PD Hessian


@dataclass
class QuantResult:
    """A quantized [out, in] weight, in compressed-tensors' layout."""

    q: Tensor
    """[out, in] int8 quantized values in [qmin, qmax], in the weight's original column order."""
    scale: Tensor
    """[out, n_groups] scales, dtype `scale_dtype` (per-channel: n_groups = 1)."""
    zero: Tensor
    """[out, n_groups] int8 zero points (all 0 when symmetric)."""
    g_idx: Tensor | None
    """[in] int32 group of each input column (original order): set only when act_order formed the
    groups in permuted order; None means the trivial arange(in) // group_size (or per-channel)."""
    weight: Tensor
    """[out, in] dequantized weight, (q - zero[:, g]) * scale[:, g] computed in the scale dtype and
    cast to the input weight's dtype: bit-exact with compressed-tensors' `dequantize`."""
    loss: float
    """GPTQ objective trace((W - weight) H (W - weight)^T) with the H given (0 for RTN)."""
    damp_used: float = 0.0
    """Dampening actually used, as a fraction of mean(diag H) (larger than asked when H was not
    positive definite and had to be damped more); 0 for RTN."""


F = TypeVar("F", bound=Callable[..., Any])


def one_thread(fn: F) -> F:
    """Run `fn` on one CPU thread (torch's thread count restored afterwards); see the module docstring."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper  # type: ignore[return-value]


def _qrange(bits: int) -> tuple[int, int]:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _group_width(n_in: int, group_size: int) -> int:
    """Columns per group: `n_in` for per-channel (-1), else `group_size`, which must divide `n_in`."""
    if group_size == -1:
        return n_in
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or -1 (per-channel), got {group_size!r}")
    if n_in % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the input width {n_in}: "
            f"use a divisor of {n_in} or -1 (per-channel)"
        )
    return group_size


def _check_weight(W: Tensor) -> tuple[int, int]:
    if W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"expected a 2-D floating-point weight [out, in], got {tuple(W.shape)} {W.dtype}")
    return W.shape[0], W.shape[1]


def _params(mn: Tensor, mx: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Min-max quantization parameters from group minima/maxima (any shape, elementwise).

    Returns (scale as stored, in `scale_dtype`; that same scale in the minima's precision; zero point in
    that precision, holding integers). The zero point is derived from the stored (rounded) scale, so that q is chosen
    on exactly the grid a dequantizer will use.
    """
    qmin, qmax = _qrange(bits)
    mn = torch.clamp(mn, max=0.0)  # 0 must be representable exactly
    mx = torch.clamp(mx, min=0.0)
    if symmetric:
        scale = torch.maximum(mn.abs(), mx) / ((qmax - qmin) / 2)
    else:
        scale = (mx - mn) / float(qmax - qmin)
    if scale_dtype != scale.dtype:
        scale = scale.clamp(max=torch.finfo(scale_dtype).max).to(scale_dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale_dtype).eps), scale)
    s32 = scale.to(mn.dtype)  # the stored scale, in the working precision
    zero = torch.zeros_like(s32) if symmetric else (qmin - mn / s32).clamp(qmin, qmax).round()
    return scale, s32, zero


MSE_GRID = 80  # shrink factors tried by the mse observer: 1.00, 0.99, ..., 0.21


def _observe(w: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype, observer: str,
             importance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Quantization parameters of groups `w` [..., group] (the group along the last dim), as `_params`.

    minmax: the group's range. mse: the range shrunk by the factor p in {1.00, 0.99, ..., 0.21} that
    minimises the group's squared rounding error sum_j importance_j (w_j - dequant(quant(w_j)))^2, each
    group its own p; `importance` [group] (broadcast over the rows) is the Hessian diagonal when one is at
    hand (GPTQ), else 1. Clipping a few outliers buys a finer step for every other weight. p = 1 is among
    the candidates, so mse is never worse than minmax on this objective (ties keep the larger range)."""
    mn, mx = w.amin(-1), w.amax(-1)
    best = _params(mn, mx, bits, symmetric, scale_dtype)
    if observer == "minmax":
        return best
    if observer != "mse":
        raise ValueError(f"unknown observer {observer!r}")
    qmin, qmax = _qrange(bits)
    imp = importance.to(w.dtype) if importance is not None else None

    def error(params: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        _, s32, zero = params
        deq = (_quant(w, s32[..., None], zero[..., None], qmin, qmax) - zero[..., None]) * s32[..., None]
        sq = (w - deq).pow(2)
        return (sq * imp if imp is not None else sq).sum(-1)

    best_err = error(best)
    for i in range(1, MSE_GRID):
        p = 1.0 - i / 100
        cand = _params(mn * p, mx * p, bits, symmetric, scale_dtype)
        err = error(cand)
        better = err < best_err
        if better.any():
            best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))  # type: ignore[assignment]
            best_err = torch.where(better, err, best_err)
    return best


def _work_dtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _quant(w: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
    """q as floating-point integers; the same operations, in the same order, as compressed-tensors' quantize."""
    return (w / s + z).clamp_(qmin, qmax).round_()


def quantization_params(w: Tensor, bits: int, symmetric: bool, *,
                        scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Min-max scale and zero point of each row of `w` [rows, cols] -> (scale [rows] in
    `scale_dtype`, zero [rows] int8). Computed in float32 whatever w's dtype."""
    w32 = w.float()
    scale, _, zero = _params(w32.amin(-1), w32.amax(-1), bits, symmetric, scale_dtype)
    return scale, zero.to(torch.int8)


def quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """q = round(clamp(w / scale + zero, qmin, qmax)) as int8; `scale` and `zero` broadcast against
    `w` (e.g. [rows, 1] for per-row parameters of a [rows, cols] w). Computed in float32."""
    qmin, qmax = _qrange(bits)
    return _quant(w.float(), scale.float(), zero.float(), qmin, qmax).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """(q - zero) * scale, computed in scale's dtype (as compressed-tensors and vLLM do); `scale` and
    `zero` broadcast against `q`."""
    return (q.to(scale.dtype) - zero.to(scale.dtype)) * scale


def dequantize_groups(q: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor | None, gs: int,
                       dtype: torch.dtype) -> Tensor:
    """[out, in] weight from per-group parameters [out, n_groups], each column taking its group's."""
    g = g_idx if g_idx is not None else torch.arange(q.shape[1], device=q.device) // gs
    return dequantize(q, scale[:, g], zero[:, g]).to(dtype)


@one_thread
@torch.no_grad()
def rtn_quantize(W: Tensor, *, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype = torch.float32, observer: str = "minmax") -> QuantResult:
    """Round-to-nearest quantization of W [out, in] on each group's grid (min-max, or mse: see `_observe`)."""
    out, n = _check_weight(W)
    gs = _group_width(n, group_size)
    qmin, qmax = _qrange(bits)
    Wg = W.to(_work_dtype(W)).reshape(out, n // gs, gs)
    scale, s32, zero = _observe(Wg, bits, symmetric, scale_dtype, observer)  # [out, n_groups]
    q = _quant(Wg, s32[..., None], zero[..., None], qmin, qmax).reshape(out, n).to(torch.int8)
    zero8 = zero.to(torch.int8)
    weight = dequantize_groups(q, scale, zero8, None, gs, W.dtype)
    return QuantResult(q=q, scale=scale, zero=zero8, g_idx=None, weight=weight, loss=0.0)


def _inverse_cholesky(H: Tensor, dampening: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so H^-1 = U^T U), and the
    dampening fraction used: `dampening`, or ten times more (up to four times) while not PD."""
    mean_diag = H.diagonal().mean()
    if not bool(mean_diag > 0):
        raise ValueError("H is not a Hessian: the mean of its diagonal is not positive")
    frac = dampening
    for _ in range(_DAMP_TRIES):
        Hd = H.clone()
        Hd.diagonal().add_(frac * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, frac
        frac = frac * 10 if frac > 0 else 1e-3
    raise ValueError(f"H is not positive definite even with dampening {frac / 10:g} x mean(diag H)")


@one_thread
@torch.no_grad()
def gptq_quantize(W: Tensor, H: Tensor, *, bits: int, group_size: int, symmetric: bool, act_order: bool,
                  dampening: float = 0.01, block_size: int = 128, static_groups: bool = False,
                  scale_dtype: torch.dtype = torch.float32, observer: str = "minmax",
                  fixed_zero: Tensor | None = None) -> QuantResult:
    """GPTQ-quantize W [out, in] given the Hessian H [in, in] of its inputs (2/n X^T X).

    - dampening: `dampening` x mean(diag H) is added to H's diagonal (more if H is not PD, see
      `damp_used`). Dead inputs (diag H == 0) get H[i, i] = 1 and W[:, i] = 0.
    - act_order: columns are quantized by decreasing diag(H); results come back in original order.
    - Groups: per-channel parameters are computed up front from W. Grouped parameters are computed
      when GPTQ reaches a group's first column, from the error-updated weights; with act_order the
      groups are runs of `group_size` columns in visiting order, and `g_idx` maps each original
      column to its group. static_groups=True instead computes every group's parameters up front
      from W's contiguous column groups (g_idx stays None, act_order or not).
    - block_size: columns per lazy-update block; it changes speed, not the algorithm (blocks are also
      cut where a group begins so each group's parameters see all earlier updates). In exact
      arithmetic the result is the same for every block size; in floating point a different block
      size sums the same updates in another order, which moves scales computed from updated weights
      by float rounding (1e-5 relative in float32) and could move a value that sits exactly on a
      rounding boundary (tests/test_gptq_core.py finds the integers identical for block sizes 1 to
      1000, in float32 and float64).
    - observer: how each group's range is chosen (`_observe`): minmax, or mse weighted by diag(H).
    - fixed_zero [out, in] bool (a sparsity mask): those weights are quantized to the zero point (dequantized
      exactly 0) whatever the updates brought them to, and their error is compensated like any rounding error.
    """
    out, n = _check_weight(W)
    if H.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for a weight with {n} input columns, got {tuple(H.shape)}")
    gs = _group_width(n, group_size)
    qmin, qmax = _qrange(bits)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if dampening < 0:
        raise ValueError(f"dampening must be >= 0, got {dampening}")
    cd = _work_dtype(W)
    H_in = H.to(cd)
    if not bool(torch.isfinite(H_in).all()):
        raise ValueError("H contains NaN or inf")
    dev, ng = W.device, n // gs

    Wf = W.to(cd).clone()  # working copy [out, in]
    H = H_in.clone()
    dead = H.diagonal() == 0  # inputs never active: nothing to fit, quantize them to 0
    H.diagonal()[dead] = 1.0
    Wf[:, dead] = 0.0

    # groups whose parameters are fixed before any update: per-channel, or all with static_groups
    lazy = ng > 1 and not static_groups
    if lazy:
        scale = torch.empty(out, ng, dtype=scale_dtype, device=dev)  # filled as groups begin
        s_t = torch.empty(ng, out, device=dev, dtype=cd)  # [group, row] scale
        z_t = torch.empty(ng, out, device=dev, dtype=cd)  # [group, row] zero point (integers)
    else:
        Wg = Wf.reshape(out, ng, gs)
        scale, s32, zero = _observe(Wg, bits, symmetric, scale_dtype, observer, H.diagonal().reshape(ng, gs))
        s_t, z_t = s32.T.contiguous(), zero.T.contiguous()

    perm: Tensor | None = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        Wf, H = Wf[:, perm], H[perm][:, perm]
    U, damp_used = _inverse_cholesky(H, dampening)

    # group of each position in visiting order: lazy groups are runs of gs positions; fixed groups
    # follow the original column
    cols = perm if perm is not None else torch.arange(n, device=dev)
    group_of = (torch.arange(n) // gs).tolist() if lazy else (cols // gs).tolist()

    Wt = Wf.T.contiguous()  # [in, out]: row j is the j-th column visited, contiguous for the updates
    Zt = None if fixed_zero is None else (fixed_zero[:, perm] if perm is not None else fixed_zero).T.contiguous()
    Qt = torch.empty_like(Wt)
    i1 = 0
    while i1 < n:
        i2 = min(i1 + block_size, n)
        if lazy:
            k = i1 // gs
            i2 = min(i2, (k + 1) * gs)
            if i1 % gs == 0:  # a group begins: all earlier columns' updates have been applied to it
                grp = Wt[i1:i1 + gs].T  # [out, gs]
                scale[:, k], s_t[k], z_t[k] = _observe(grp, bits, symmetric, scale_dtype, observer,
                                                       H.diagonal()[i1:i1 + gs])
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]  # W1 is a view: updates land in Wt
        E1 = torch.empty_like(W1)  # scaled errors of this block, [i2 - i1, out]
        for j in range(i2 - i1):
            g = group_of[i1 + j]
            s, z, w = s_t[g], z_t[g], W1[j]
            q = _quant(w, s, z, qmin, qmax)
            if Zt is not None:
                q = torch.where(Zt[i1 + j], z, q)
            Qt[i1 + j] = q
            err = (w - (q - z) * s) / U1[j, j]
            W1[j + 1:].addr_(U1[j, j + 1:], err, alpha=-1)  # OBS update of the block's later columns
            E1[j] = err
        Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1)  # deferred update of all columns after the block
        i1 = i2

    if perm is not None:
        Qt = Qt[torch.argsort(perm)]
    q = Qt.T.to(torch.int8).contiguous()
    g_idx: Tensor | None = None
    if lazy and perm is not None:
        g_idx = torch.empty(n, dtype=torch.int32, device=dev)
        g_idx[perm] = (torch.arange(n, device=dev) // gs).to(torch.int32)
        if torch.equal(g_idx, (torch.arange(n, device=dev) // gs).to(torch.int32)):
            g_idx = None
    zero8 = z_t.T.to(torch.int8).contiguous()
    weight = dequantize_groups(q, scale, zero8, g_idx, gs, W.dtype)
    dW = W.to(cd) - weight.to(cd)
    loss = float(((dW @ H_in) * dW).sum())
    return QuantResult(q=q, scale=scale, zero=zero8, g_idx=g_idx, weight=weight, loss=loss,
                       damp_used=float(damp_used))


def hold_zeros(res: QuantResult, zeros: Tensor, group_size: int) -> QuantResult:
    """`res` with the weights marked in `zeros` [out, in] (a sparsity mask) on their group's zero point, so that
    they dequantize to exactly 0 on symmetric and asymmetric grids alike (zero points are integers)."""
    n = res.q.shape[1]
    g = res.g_idx.long() if res.g_idx is not None else torch.arange(n, device=res.q.device) // group_size
    q = torch.where(zeros, res.zero[:, g], res.q)
    weight = dequantize_groups(q, res.scale, res.zero, res.g_idx, group_size, res.weight.dtype)
    return replace(res, q=q, weight=weight)


def asymmetric_target(W: Tensor, H: Tensor, C: Tensor, dampening: float = 0.01) -> Tensor:
    """GPTAQ-style asymmetric calibration (Li et al. 2025): the weight W* [out, in] that, applied to the
    quantized model's inputs x~, best reproduces what W computes on the full-precision model's inputs x:
    argmin_V sum_t ||V x~_t - W x_t||^2 = W + W C H^-1, with H = 2/n sum x~ x~^T (the GPTQ Hessian) and
    C = 2/n sum (x - x~) x~^T (`CrossAccumulator`). Since sum ||V x~ - W x||^2 = (V - W*) H (V - W*)^T + const,
    GPTQ run on (W*, H) minimises the asymmetric objective: the error of the layers before is compensated
    here too, not only this layer's rounding. H is dampened as GPTQ dampens it (a ridge pull towards W);
    dead inputs (diag H == 0) have no x~ and C's column is 0 there."""
    cd = _work_dtype(W)
    Hd = H.to(cd).clone()
    dead = Hd.diagonal() == 0
    Hd.diagonal()[dead] = 1.0
    mean_diag = Hd.diagonal().mean()
    Hd.diagonal().add_(dampening * mean_diag)
    L = torch.linalg.cholesky(Hd)
    # W C H^-1 = (H^-1 C^T W^T)^T, H symmetric
    return (W.to(cd) + torch.cholesky_solve((W.to(cd) @ C.to(cd)).T, L).T).to(W.dtype)


class CrossAccumulator:
    """Running C = 2/n sum_t (x_t - x~_t) x~_t^T over n pairs of the same token's input to a Linear in the
    full-precision model (x) and in the quantized model (x~): the cross term of `asymmetric_target`."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.n_tokens = 0
        self.C = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, x: Tensor, x_quantized: Tensor) -> None:
        x = x.reshape(-1, self.in_features).float()
        xq = x_quantized.reshape(-1, self.in_features).float()
        m = x.shape[0]
        total = self.n_tokens + m
        self.C.mul_(self.n_tokens / total)
        self.C.addmm_((x - xq).T, xq, alpha=2.0 / total)
        self.n_tokens = total


class HessianAccumulator:
    """Running H = 2/n sum_t x_t x_t^T over the n input vectors x_t [in] of a linear layer.

    `add(x)` takes any [..., in] batch (any number of tokens, any float dtype); H is kept as a running
    mean (rescaled at each add) so its magnitude does not grow with n. `dtype` float32 (default) or
    float64; `device` defaults to that of the first batch.
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"HessianAccumulator dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.n_tokens = 0
        self._H: Tensor | None = (None if device is None else
                                  torch.zeros(in_features, in_features, dtype=dtype, device=device))

    @property
    def H(self) -> Tensor:
        """[in, in] current H (zeros before any token)."""
        if self._H is None:
            self._H = torch.zeros(self.in_features, self.in_features, dtype=self.dtype)
        return self._H

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Fold a batch x [..., in] into H."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dimension {self.in_features}, got {tuple(x.shape)}")
        if self._H is None:
            self._H = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=x.device)
        x = x.reshape(-1, self.in_features).to(device=self._H.device)
        m = x.shape[0]
        if m == 0:
            return
        total = self.n_tokens + m
        self._H.mul_(self.n_tokens / total)
        # Always a float32 (or float64) product, even for bf16 activations: a bf16 matmul rounds X^T X
        # to bf16, and on real activations (a few huge directions, others near zero) that rounding
        # multiplied the GPTQ loss by 1.5, centred or rescaled alike.
        x = x.to(self.dtype) * math.sqrt(2.0 / total)
        _add_gram(self._H, x)
        self.n_tokens = total


def _add_gram(H: Tensor, x: Tensor, panel: int = 256) -> None:
    """H += x^T x. Inputs of 3 panels or more go in column panels computing only the lower triangle and
    mirroring it. Measured (4096 tokens, 2 cores, float32): 29 vs 44 ms at width 1024, 194 vs 336 ms at
    2816. (BLAS syrk from scipy was faster alone but its thread pool then fought torch's, slowing the
    forwards around it by half.)"""
    n = x.shape[1]
    if n < 3 * panel or x.device.type != "cpu":
        H.addmm_(x.T, x)
        return
    for i in range(0, n, panel):
        j = min(i + panel, n)
        block = x[:, i:].T @ x[:, i:j]  # H[i:, i:j]: the diagonal block and everything below it
        H[i:, i:j] += block
        if j < n:
            H[i:j, j:] += block[j - i:].T

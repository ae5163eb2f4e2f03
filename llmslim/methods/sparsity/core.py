"""The tensor math of sparsegpt and wanda (no I/O, no hooks, no transformers): which weights of a Linear
W [out, in] to set to zero, and (SparseGPT) how to move the others to make up for them.

Masks are boolean [out, in], True where the weight is pruned (set to exactly zero). Structures:
- unstructured: any weights; wanda and magnitude compare within each output row, SparseGPT within a
  block of columns (all rows together, as its adaptive mask selection does);
- N:M: in each row, N of every M consecutive input columns (columns mM .. mM+M-1) are pruned.

OWL (Yin et al. 2024) spreads an unstructured sparsity over the decoder layers: `outlier_ratio` measures a
layer's share of outlier weights, `owl_sparsities` turns the layers' shares into their sparsities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..gptq.core import _inverse_cholesky, one_thread


@dataclass
class PruneResult:
    """A pruned Linear: its new weight (W's dtype, zeros exact), the mask, and the layer-wise loss."""

    weight: Tensor  # [out, in]
    mask: Tensor  # [out, in] bool, True = pruned
    loss: float  # trace((W - Ŵ) H (W - Ŵ)ᵀ) when H was given (the squared output error, up to 2/n), else 0


def _check(W: Tensor, sparsity: float, nm: tuple[int, int] | None) -> None:
    if W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"expected a 2-D floating-point weight [out, in], got {tuple(W.shape)} {W.dtype}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        if W.shape[1] % m:
            raise ValueError(f"N:M {n}:{m}: the input width {W.shape[1]} is not divisible by {m}")


def select_mask(scores: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> Tensor:
    """The weights with the lowest scores [out, in]: per output row, the round(sparsity x in) lowest
    (unstructured), or the N lowest of every M consecutive columns (N:M). Ties go to the lower column."""
    out, width = scores.shape
    mask = torch.zeros(out, width, dtype=torch.bool, device=scores.device)
    if nm is not None:
        n, m = nm
        grouped = scores.reshape(out, width // m, m)
        idx = torch.sort(grouped, dim=-1, stable=True).indices[..., :n]  # [out, groups, N]
        mask.view(out, width // m, m).scatter_(-1, idx, True)
        return mask
    k = int(round(sparsity * width))
    if k:
        idx = torch.sort(scores, dim=-1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def wanda_scores(W: Tensor, input_sq_norms: Tensor) -> Tensor:
    """Wanda's score |W_ij| x ||X_j||₂ [out, in], from the squared norm of each input column over the
    calibration tokens [in] (any positive multiple of it ranks the same, e.g. the diagonal of H = 2XᵀX/n)."""
    return W.abs().to(torch.float64) * input_sq_norms.to(device=W.device, dtype=torch.float64).clamp_min(0).sqrt()


@torch.no_grad()
def wanda_prune(W: Tensor, input_sq_norms: Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                H: Tensor | None = None) -> PruneResult:
    """Wanda: zero the lowest-scoring weights of each row (`select_mask` on `wanda_scores`), nothing else moves.
    With H, the loss is reported."""
    _check(W, sparsity, nm)
    mask = select_mask(wanda_scores(W, input_sq_norms), sparsity, nm)
    weight = W.masked_fill(mask, 0)
    return PruneResult(weight, mask, _loss(W, weight, H))


def _loss(W: Tensor, weight: Tensor, H: Tensor | None) -> float:
    if H is None:
        return 0.0
    d = W.double() - weight.double()
    return float((d @ H.to(d)).mul(d).sum())


@one_thread
@torch.no_grad()
def sparsegpt_prune(W: Tensor, H: Tensor, sparsity: float, nm: tuple[int, int] | None = None, *,
                    block_size: int = 128, dampening: float = 0.01, mask: Tensor | None = None) -> PruneResult:
    """SparseGPT on W [out, in] with the Hessian H [in, in] of its inputs (2XᵀX/n).

    Columns are visited left to right in blocks. With U the upper Cholesky factor of H⁻¹ (dampened as in
    GPTQ), U_jj² is [H_F⁻¹]_jj, the inverse Hessian's diagonal over the columns F not yet visited; the
    OBS cost of zeroing w_ij given the later columns may move is w_ij² / [H_F⁻¹]_jj (= (w_ij / U_jj)²).
    - mask selection, at the start of each block (from the weights as updated so far): unstructured,
      the round(sparsity x size) lowest costs of the block [out, block]; N:M, in each row the N lowest of
      each group of M columns, decided when the group begins (block_size is rounded to a multiple of M).
    - update, column j by column j: the pruned entries of column j go to 0, the error e = (w_j - ŵ_j) / U_jj
      moves the later columns by -e U_j,later (the closed form -w_q / [H⁻¹]_qq · H⁻¹_q,: for one weight),
      within the block at once and beyond it in one deferred product, as GPTQ does with rounding.
    `mask` [out, in] (True = prune) skips the selection: the update for a given mask. Inputs never active
    (H_jj = 0) have their column zeroed (it multiplies nothing). Computed in float32 (float64 for float64
    W); the weight comes back in W's dtype with pruned entries exactly 0."""
    _check(W, sparsity, nm)
    out, width = W.shape
    if H.shape != (width, width):
        raise ValueError(f"H must be [{width}, {width}] for a weight with {width} input columns, got {tuple(H.shape)}")
    cd = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wf = W.to(cd).clone()
    Hf = H.to(device=W.device, dtype=cd).clone()
    dead = Hf.diagonal() == 0
    Hf.diagonal()[dead] = 1.0
    Wf[:, dead] = 0.0
    U, _ = _inverse_cholesky(Hf, dampening)
    m = nm[1] if nm is not None else 1
    bs = max(m, block_size // m * m)
    pruned = torch.zeros(out, width, dtype=torch.bool, device=W.device)
    for i1 in range(0, width, bs):
        i2 = min(i1 + bs, width)
        W1, U1 = Wf[:, i1:i2], U[i1:i2, i1:i2]  # W1 is a view: the updates land in Wf
        d = U1.diagonal()
        if mask is not None:
            M1 = mask[:, i1:i2].to(W.device)
        elif nm is None:
            cost = (W1 / d) ** 2  # [out, block]
            M1 = torch.zeros_like(cost, dtype=torch.bool)
            k = int(round(sparsity * cost.numel()))
            if k:
                M1.view(-1)[torch.sort(cost.reshape(-1), stable=True).indices[:k]] = True
        else:
            M1 = torch.zeros_like(W1, dtype=torch.bool)  # filled group by group below
        E1 = torch.empty_like(W1)  # the block's scaled errors [out, block]
        for j in range(i2 - i1):
            if mask is None and nm is not None and j % m == 0:  # a group begins: choose its N in each row
                cost = (W1[:, j:j + m] / d[j:j + m]) ** 2
                M1[:, j:j + m] = select_mask(cost, 0.0, nm)
            w = W1[:, j]
            kept = w.masked_fill(M1[:, j], 0)
            err = (w - kept) / U1[j, j]
            W1[:, j + 1:].addr_(err, U1[j, j + 1:], alpha=-1)
            W1[:, j] = kept
            E1[:, j] = err
        pruned[:, i1:i2] = M1
        Wf[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)
    weight = Wf.masked_fill(pruned, 0).to(W.dtype)
    return PruneResult(weight, pruned, _loss(W, weight, H))


def magnitude_prune(W: Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    H: Tensor | None = None) -> PruneResult:
    """The baseline: the smallest |w| of each row (or of each group of M) set to zero."""
    _check(W, sparsity, nm)
    mask = select_mask(W.abs(), sparsity, nm)
    weight = W.masked_fill(mask, 0)
    return PruneResult(weight, mask, _loss(W, weight, H))


@torch.no_grad()
def outlier_ratio(linears: Sequence[tuple[Tensor, Tensor]], threshold: float) -> float:
    """OWL's layer outlier ratio D: the share of a decoder layer's weights whose Wanda score (`wanda_scores`
    of each (W [out, in], input squared norms [in]) pair) exceeds `threshold` x the mean score over all of
    the layer's pruned Linears together (one mean per layer, as the paper's code). Scores are computed
    twice (mean, then count) rather than held: one Linear's float64 scores at a time."""
    total = sum(float(wanda_scores(W, norms).sum()) for W, norms in linears)
    count = sum(W.numel() for W, _ in linears)
    if not count:
        return 0.0
    bar = threshold * total / count
    return sum(int((wanda_scores(W, norms) > bar).sum()) for W, norms in linears) / count


def owl_sparsities(ratios: Sequence[float], weights: Sequence[int], target: float, lam: float) -> list[float]:
    """Per-layer sparsities from the layers' outlier ratios D_l: S_l = target - lam x c_l / max_k |c_k|, with
    c_l = D_l minus the mean of D weighted by each layer's prunable weight count `weights`. So more
    outliers -> lower sparsity, every S_l lies in [target - lam, target + lam] (the farthest layer exactly
    lam away), and the weighted mean of S is the target (the weighted mean of c is 0). The paper's code
    min-max scales D to [0, 2 lam] and then centres it with an unweighted mean, which can put one layer
    nearly 2 lam from the target and misses the target when layers differ in size. Layers with no
    prunable weight (everything ignored) get the target and take no part. All equal: uniform."""
    if len(ratios) != len(weights):
        raise ValueError(f"{len(ratios)} outlier ratios for {len(weights)} layer weights")
    mass = math.fsum(weights)
    if not mass:
        return [target] * len(ratios)
    mean = math.fsum(d * w for d, w in zip(ratios, weights)) / mass
    centred = [d - mean if w else 0.0 for d, w in zip(ratios, weights)]
    spread = max(abs(c) for c in centred)
    if spread == 0:
        return [target] * len(ratios)
    return [target - lam * c / spread for c in centred]

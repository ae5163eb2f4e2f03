"""EoRA's tensor math (no I/O, no hooks, no transformers): the rank-r correction B·A of a quantized Linear's
error that is best where its inputs have energy.

For a Linear y = W x quantized to Q, the output error on inputs x is (W - Q) x = R x. Over calibration inputs
X [n, in] its mean square is ||R C^{1/2}||_F^2 with C = XᵀX / n [in, in]. With C = U diag(λ) Uᵀ:
    R C^{1/2} = R U diag(√λ) Uᵀ,   so   ||(R - BA) C^{1/2}||_F = ||(R - BA) U diag(√λ)||_F   (Uᵀ is orthogonal).
Let R' = R U diag(√λ) [out, in] and R' ≈ P_r S_r V_rᵀ its truncated SVD (Eckart–Young: the best rank-r
approximation of R' in Frobenius norm). Then B = P_r S_r [out, r] and A = V_rᵀ diag(1/√λ) Uᵀ [r, in] give
BA U diag(√λ) = P_r S_r V_rᵀ exactly, so BA is the best rank-r approximation of R in the weighted norm:
any rank-r M maps to the rank-r M U diag(√λ), which cannot beat the truncated SVD.
Eigenvalues below `rel_floor` x the largest are directions the inputs (numerically) never take: their
columns of R' are dropped (A gets 0 there instead of dividing by ~0), which changes the objective by at
most that floor's share of the energy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """The correction of one Linear: W ≈ Q + B @ A, with what it does to the weighted objective."""

    B: torch.Tensor  # [out, rank]  (PEFT's lora_B)
    A: torch.Tensor  # [rank, in]   (PEFT's lora_A)
    before: float  # ||R C^{1/2}||_F^2: the quantized Linear's mean squared output error on the calibration inputs
    after: float  # ||(R - BA) C^{1/2}||_F^2: the same with the correction


def weighted_error(residual: torch.Tensor, second_moment: torch.Tensor) -> float:
    """||R C^{1/2}||_F^2 = trace(R C Rᵀ), computed in float64."""
    r = residual.detach().double()
    return float(torch.einsum("oi,ij,oj->", r, second_moment.detach().double(), r))


def eora(residual: torch.Tensor, second_moment: torch.Tensor, rank: int, rel_floor: float = 1e-10) -> LowRank:
    """The rank-`rank` B, A minimising ||(R - BA) C^{1/2}||_F for residual R [out, in] and the inputs' second
    moment C [in, in] (symmetric positive semi-definite). Computed in float64; B and A come back in R's dtype."""
    if not 0 < rank <= min(residual.shape):
        raise ValueError(f"rank {rank} must lie in 1..{min(residual.shape)} for a {tuple(residual.shape)} residual")
    r = residual.detach().double()
    c = second_moment.detach().double()
    c = (c + c.T) / 2  # symmetric up to rounding: eigh reads one triangle
    lam, u = torch.linalg.eigh(c)  # ascending eigenvalues, orthonormal columns
    keep = lam > rel_floor * lam.max().clamp_min(torch.finfo(torch.float64).tiny)
    sqrt_lam = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    inv_sqrt = torch.where(keep, 1 / sqrt_lam.where(keep, torch.ones_like(lam)), torch.zeros_like(lam))
    projected = (r @ u) * sqrt_lam  # R' = R U diag(√λ)   [out, in]
    p, s, vh = torch.linalg.svd(projected, full_matrices=False)
    b = p[:, :rank] * s[:rank]  # [out, r]
    a = (vh[:rank] * inv_sqrt) @ u.T  # V_rᵀ diag(1/√λ) Uᵀ   [r, in]
    # The error left is the spectrum's tail plus the (floor-sized) energy of the dropped directions.
    before = weighted_error(r, c)
    after = max(before - float((s[:rank] ** 2).sum()), 0.0)
    return LowRank(b.to(residual.dtype), a.to(residual.dtype), before, after)

"""GPTQ/RTN core: against a dense reference GPTQ, against compressed-tensors' own quantizer, and the
properties the exporter relies on (g_idx, bit-exact dequantization, no degenerate scales)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization import dequantize as ct_dequantize
from compressed_tensors.quantization import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from llmslim.methods.gptq.core import (
    HessianAccumulator,
    dequantize,
    gptq_quantize,
    quantization_params,
    quantize,
    rtn_quantize,
)

ROWS, COLS = 16, 128


def ct_args(bits: int, group_size: int, symmetric: bool) -> QuantizationArgs:
    if group_size == -1:
        return QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="channel")
    return QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=group_size)


def correlated_inputs(n_tokens: int, cols: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Strongly correlated activations (low rank + noise) with unequal column scales."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
    X = (X + 0.3 * torch.randn(n_tokens, cols, generator=g)) * torch.randn(cols, generator=g).exp()
    X[:, list(dead)] = 0.0
    return X


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2.0 / X.shape[0] * X.T @ X


def weighted_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    d = (W.double() - Wq.double())
    return float(torch.trace(d @ H.double() @ d.T))


def reference_gptq(W, H, *, bits, group_size, symmetric, act_order, static_groups=False, dampening=0.01):
    """The paper's algorithm in its plain form, in float64: one column at a time over the full
    inverse Hessian of the not-yet-quantized columns, kept current by Gaussian elimination (no
    Cholesky, no blocks, no lazy updates). Parameters come from compressed-tensors' calculate_qparams."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    gs = n if group_size == -1 else group_size
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="channel")

    def params(cols_w):
        s, z = calculate_qparams(cols_w.amin(1), cols_w.amax(1), args)
        return s.double(), z.double()

    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    lazy = gs < n and not static_groups
    fixed = [params(W[:, k * gs:(k + 1) * gs]) for k in range(n // gs)] if not lazy else []
    Hinv = torch.linalg.inv(H + dampening * H.diagonal().mean() * torch.eye(n, dtype=H.dtype))
    Q = torch.zeros_like(W)
    pre = torch.zeros_like(W)  # w / s + z before rounding: where ties are
    scales, zeros = [], []
    g_idx = torch.zeros(n, dtype=torch.int64)
    for t, c in enumerate(order.tolist()):
        if lazy:
            if t % gs == 0:
                s, z = params(W[:, order[t:t + gs]])
                scales.append(s)
                zeros.append(z)
            g_idx[c] = t // gs
        else:
            s, z = fixed[c // gs]
        w = W[:, c].clone()
        pre[:, c] = w / s + z
        q = torch.clamp(torch.round(pre[:, c]), qmin, qmax)
        Q[:, c] = q
        err = (w - (q - z) * s) / Hinv[c, c]
        W -= err[:, None] * Hinv[c][None, :]  # Hinv row c is 0 on already-quantized columns
        Hinv -= Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    if not lazy:
        scales, zeros = [s for s, _ in fixed], [z for _, z in fixed]
        g_idx = torch.arange(n) // gs
    scale, zero = torch.stack(scales, 1), torch.stack(zeros, 1)
    return Q, scale, zero, g_idx, (Q - zero[:, g_idx]) * scale[:, g_idx], pre, order


def rows_equal_but_for_ties(q: torch.Tensor, Q: torch.Tensor, pre: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of q equal to the reference's Q, asserting that every other row first differs (in visiting
    order) on a rounding tie: symmetric min-max puts each group's most negative weight exactly on one
    (w / s = -(2^b - 1) / 2), where one ulp of a different summation order decides the rounding."""
    diff = (q.double() != Q)[:, order]
    ok = ~diff.any(1)
    for r in (~ok).nonzero().flatten().tolist():
        c = int(order[int(diff[r].nonzero()[0])])
        x = float(pre[r, c])
        assert abs(abs(x - round(x)) - 0.5) < 1e-9, f"row {r} first differs at column {c}, not a tie ({x})"
    return ok


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(ROWS, COLS, generator=g)
    W[3, 40] = 6.0  # an outlier
    H = hessian(correlated_inputs(512, COLS, seed=1, dead=(5, 77)))
    return W, H


CASES = [(b, gs, sym, ao, False) for b in (2, 3, 4, 8) for gs in (-1, 32, 64) for sym in (True, False)
         for ao in (False, True)]
CASES += [(4, gs, sym, ao, True) for gs in (32, 64) for sym in (True, False) for ao in (False, True)]


@pytest.mark.parametrize("bits,group_size,symmetric,act_order,static_groups", CASES)
def test_matches_dense_reference(layer, bits, group_size, symmetric, act_order, static_groups):
    """In float64 our blocked, Cholesky-based GPTQ is the paper's plain algorithm exactly; in float32 (how it
    runs) it stays as good as the float64 result, although rounding ties flipped by float32 cascade along a
    row on this deliberately ill-conditioned Hessian."""
    W, H = layer
    kw = dict(bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order,
              static_groups=static_groups)
    Q, scale, zero, g_idx, Wq, pre, order = reference_gptq(W, H, **kw)
    exact = gptq_quantize(W.double(), H.double(), block_size=48, scale_dtype=torch.float64, **kw)  # 48: not a divisor
    r = gptq_quantize(W, H, block_size=48, **kw)

    same = rows_equal_but_for_ties(exact.q, Q, pre, order)
    assert same.float().mean() >= 0.75
    torch.testing.assert_close(exact.scale[same], scale[same], rtol=1e-12, atol=0)
    assert torch.equal(exact.zero[same].double(), zero[same])
    torch.testing.assert_close(exact.weight[same], Wq[same], rtol=1e-12, atol=1e-14)
    for res in (exact, r):
        mine_g = res.g_idx.long() if res.g_idx is not None else torch.arange(COLS) // (COLS // scale.shape[1])
        assert torch.equal(mine_g, g_idx)

    assert r.q.dtype == torch.int8 and r.q.shape == W.shape
    assert r.zero.dtype == torch.int8 and r.scale.dtype == torch.float32
    n_groups = 1 if group_size == -1 else COLS // group_size
    assert r.scale.shape == r.zero.shape == (ROWS, n_groups)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert int(r.q.min()) >= qmin and int(r.q.max()) <= qmax
    if symmetric:
        assert not r.zero.any()
    assert (r.q.double() == Q).float().mean() >= 0.95
    assert not r.weight[:, [5, 77]].any()  # dead inputs quantize to exactly 0
    assert r.loss == pytest.approx(weighted_error(W, r.weight, H), rel=1e-3)
    assert r.loss <= 1.05 * exact.loss + 1e-6  # float32 costs nothing measurable in the objective


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size", [1, 7, 32, 128, 1000])
def test_block_size_changes_speed_not_result(layer, block_size, dtype):
    W, H = (t.to(dtype) for t in layer)
    kw = dict(bits=4, group_size=32, symmetric=False, act_order=True)
    ref = gptq_quantize(W, H, block_size=48, **kw)
    r = gptq_quantize(W, H, block_size=block_size, **kw)
    assert torch.equal(r.q, ref.q) and torch.equal(r.g_idx, ref.g_idx)  # the integers: identical
    # scales of act-order groups come from error-updated weights: float rounding of reordered sums
    torch.testing.assert_close(r.scale, ref.scale, rtol=0 if dtype == torch.float64 else 1e-5, atol=0)


@pytest.mark.parametrize("group_size,static_groups,dtype,scale_dtype", [
    (32, False, torch.float32, torch.float32),
    (64, False, torch.bfloat16, torch.bfloat16),
    (32, False, torch.float16, torch.float16),
    (32, True, torch.float32, torch.float32),
    (-1, False, torch.bfloat16, torch.float32),
])
@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_layout_is_what_a_dequantizer_reads(layer, group_size, static_groups, dtype, scale_dtype,
                                                      symmetric):
    W, H = layer
    r = gptq_quantize(W.to(dtype), H, bits=4, group_size=group_size, symmetric=symmetric, act_order=True,
                      static_groups=static_groups, scale_dtype=scale_dtype)
    assert r.weight.dtype == dtype and r.scale.dtype == scale_dtype
    if group_size == -1 or static_groups:
        assert r.g_idx is None
        g = torch.arange(COLS) // (COLS if group_size == -1 else group_size)
    else:
        assert r.g_idx is not None and r.g_idx.dtype == torch.int32 and r.g_idx.shape == (COLS,)
        assert int(r.g_idx.min()) == 0 and int(r.g_idx.max()) == COLS // group_size - 1
        assert torch.equal(torch.bincount(r.g_idx.long()), torch.full((COLS // group_size,), group_size))
        assert not torch.equal(r.g_idx.long(), torch.arange(COLS) // group_size)  # really permuted
        g = r.g_idx.long()
    assert torch.equal(dequantize(r.q, r.scale[:, g], r.zero[:, g]).to(dtype), r.weight)
    # and exactly what compressed-tensors (hence the vLLM checkpoint reader) reconstructs in the scale's
    # dtype (llmslim always stores scales in the checkpoint dtype, so that is also the model's)
    ct = ct_dequantize(r.q, r.scale, r.zero, args=ct_args(4, group_size, symmetric), dtype=scale_dtype,
                       g_idx=r.g_idx)
    assert torch.equal(ct.to(dtype), r.weight)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_equals_compressed_tensors(bits, group_size, symmetric):
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    W = torch.randn(24, 128, generator=g) * torch.rand(24, 1, generator=g)
    W[:, 7] += 3.0  # skew some groups so asymmetric zero points are not all alike
    W[2] = W[2].abs()  # a row with min > 0: the range is widened to include 0
    r = rtn_quantize(W, bits=bits, group_size=group_size, symmetric=symmetric)

    args = ct_args(bits, group_size, symmetric)
    gs = 128 if group_size == -1 else group_size
    Wg = W.reshape(24, 128 // gs, gs)
    scale, zp = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args)  # [24, n_groups]
    assert torch.equal(r.scale, scale) and torch.equal(r.zero, zp)
    assert torch.equal(r.q, ct_quantize(W, scale, zp, args, dtype=torch.int8))
    assert torch.equal(r.weight, ct_fake_quantize(W, scale, zp, args))
    assert r.g_idx is None and r.loss == 0.0
    if group_size == -1:  # the per-row helpers agree with the same grid
        s, z = quantization_params(W, bits, symmetric)
        assert torch.equal(s, scale[:, 0]) and torch.equal(z, zp[:, 0])
        q = quantize(W, s[:, None], z[:, None], bits)
        assert torch.equal(q, r.q) and torch.equal(dequantize(q, s[:, None], z[:, None]), r.weight)


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", [
    (4, -1, True, False), (4, -1, True, True), (4, 32, True, True), (4, 32, False, False),
    (3, 64, False, True), (2, 32, True, True), (8, -1, False, True),
])
def test_gptq_beats_rtn_on_the_weighted_error(bits, group_size, symmetric, act_order):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(64, COLS, generator=g)
    H = hessian(correlated_inputs(1024, COLS, seed=8))
    kw = dict(bits=bits, group_size=group_size, symmetric=symmetric)
    gptq = weighted_error(W, gptq_quantize(W, H, act_order=act_order, **kw).weight, H)
    rtn = weighted_error(W, rtn_quantize(W, **kw).weight, H)
    assert gptq < 0.8 * rtn, (gptq, rtn)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-act-order"])
def test_all_zero_rows_and_groups_get_usable_scales(layer, symmetric, method):
    W, H = layer
    W = W.clone()
    W[0] = 0.0
    W[1, 32:64] = 0.0
    kw = dict(bits=4, group_size=32, symmetric=symmetric)
    if method == "rtn":
        r = rtn_quantize(W, **kw)
    else:
        r = gptq_quantize(W, H, act_order=method.endswith("order"), static_groups=True, **kw)
    assert torch.isfinite(r.scale).all() and (r.scale > 0).all()
    assert torch.isfinite(r.weight).all()
    assert not r.weight[0].any()  # a zero row receives no error: it stays exactly 0
    # a zero group gets scale eps; GPTQ may carry earlier columns' errors into it, which then clamp to
    # at most (2^bits - 1) * eps (q - z spans the grid): numerically 0, never a blown-up weight
    assert r.weight[1, 32:64].abs().max() <= 15 * torch.finfo(torch.float32).eps
    if method != "rtn":  # and groups computed from GPTQ-updated weights never get degenerate scales either
        r = gptq_quantize(torch.zeros(4, COLS), H, act_order=True, **kw)
        assert (r.scale > 0).all() and not r.weight.any() and r.loss == 0.0


def test_dead_inputs_are_zeroed_and_do_not_break_the_factorization():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 64, generator=g)
    H = hessian(correlated_inputs(256, 64, seed=4, dead=(0, 10, 11, 63)))
    for act_order in (False, True):
        r = gptq_quantize(W, H, bits=4, group_size=16, symmetric=True, act_order=act_order)
        assert r.damp_used == 0.01 and torch.isfinite(r.weight).all()
        assert not r.weight[:, [0, 10, 11, 63]].any()


@pytest.mark.parametrize("fn", ["rtn", "gptq"])
def test_group_size_must_divide_the_width(fn):
    W = torch.randn(4, 96)
    with pytest.raises(ValueError, match=r"group_size 64 .* input width 96"):
        if fn == "rtn":
            rtn_quantize(W, bits=4, group_size=64, symmetric=True)
        else:
            gptq_quantize(W, torch.eye(96), bits=4, group_size=64, symmetric=True, act_order=False)


def test_bad_arguments_raise():
    W, H = torch.randn(4, 32), torch.eye(32)
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(W, bits=1, group_size=-1, symmetric=True)
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize(W, bits=4, group_size=0, symmetric=True)
    with pytest.raises(ValueError, match=r"H must be \[32, 32\]"):
        gptq_quantize(W, torch.eye(16), bits=4, group_size=-1, symmetric=True, act_order=False)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(W, H * float("nan"), bits=4, group_size=-1, symmetric=True, act_order=False)


def test_non_positive_definite_hessian_is_damped_more():
    g = torch.Generator().manual_seed(5)
    n = 64
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.ones(n, dtype=torch.float64)
    eig[0] = -0.05  # 1% dampening cannot fix this eigenvalue, 10% can
    H = (Qm * eig) @ Qm.T
    W = torch.randn(8, n, generator=g)
    r = gptq_quantize(W, H.float(), bits=4, group_size=-1, symmetric=True, act_order=True)
    assert r.damp_used == pytest.approx(0.1)
    assert torch.isfinite(r.weight).all() and torch.isfinite(r.scale).all()
    eig[0] = -50.0  # mean diagonal still positive, but no dampening up to 100x mean(diag) makes H PD
    with pytest.raises(ValueError, match="not positive definite even with dampening"):
        gptq_quantize(W, ((Qm * eig) @ Qm.T).float(), bits=4, group_size=-1, symmetric=True, act_order=False)
    with pytest.raises(ValueError, match="not a Hessian: the mean of its diagonal is not positive"):
        gptq_quantize(W, -torch.eye(n), bits=4, group_size=-1, symmetric=True, act_order=False)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_hessian_accumulator_streaming_equals_one_shot(dtype, rtol):
    X = correlated_inputs(300, 32, seed=9).to(torch.float64)
    acc = HessianAccumulator(32, dtype=dtype)
    assert not acc.H.any() and acc.n_tokens == 0
    # chunks of every kind: one token, 3-D batches, an empty batch, a bfloat16-free float32 batch
    chunks = [X[:1], X[1:41].reshape(4, 10, 32), X[41:41], X[41:200].float(), X[200:].reshape(2, 50, 32)]
    for c in chunks:
        acc.add(c)
    assert acc.n_tokens == 300 and acc.H.dtype == dtype
    torch.testing.assert_close(acc.H.double(), hessian(X), rtol=rtol, atol=rtol * float(hessian(X).abs().max()))
    with pytest.raises(ValueError, match="last dimension 32"):
        acc.add(torch.zeros(3, 31))


def test_hessian_of_bf16_activations_is_a_float32_product():
    """bf16 activations must not take a bf16 matmul (its bf16-rounded X^T X raised the GPTQ loss by half on
    real activations): H is the float32 product of the same bf16-valued inputs, to float32 rounding."""
    X = correlated_inputs(512, 64, seed=4).bfloat16()
    acc = HessianAccumulator(64)
    for c in X.split(128):
        acc.add(c)
    exact = hessian(X.double())
    assert acc.H.dtype == torch.float32
    err = (acc.H.double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("width", [300, 1100], ids=["one-product", "panels"])
def test_hessian_is_the_full_symmetric_product_for_narrow_and_wide_inputs(width):
    """Inputs of 3 panels or more take the lower-triangle panel path; H must be the full symmetric X^T X
    either way, also when H is read between batches."""
    X = torch.randn(70, width, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    acc = HessianAccumulator(width, dtype=torch.float64)
    acc.add(X[:25])
    torch.testing.assert_close(acc.H, hessian(X[:25]), rtol=1e-12, atol=1e-12)
    acc.add(X[25:60])
    acc.add(X[60:])
    torch.testing.assert_close(acc.H, hessian(X), rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("bits, group_size, symmetric", [(3, -1, True), (4, 32, True), (4, -1, False), (2, 32, False)])
def test_mse_observer_is_never_worse_than_minmax_on_its_objective(bits, group_size, symmetric):
    """Heavy-tailed weights (a few outliers per row): in every group the mse range is at least as good as
    min-max on the squared rounding error weighted by the Hessian diagonal (what it minimises), and better
    overall; rtn and gptq with it keep their integers in range, and gptq's own objective improves."""
    from llmslim.methods.gptq.core import _observe

    gen = torch.Generator().manual_seed(bits * 10 + (group_size > 0))
    torch.manual_seed(bits * 10 + (group_size > 0))  # StudentT samples from the global generator
    tails = torch.distributions.StudentT(2.0).sample((ROWS, COLS)).abs().clamp(max=20)
    W = torch.randn(ROWS, COLS, generator=gen) * tails
    X = torch.randn(512, COLS, generator=gen) * torch.linspace(0.1, 3, COLS)
    H = 2 / 512 * X.T @ X
    gs = COLS if group_size == -1 else group_size
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    Wg, importance = W.reshape(ROWS, COLS // gs, gs), H.diagonal().reshape(COLS // gs, gs)

    def group_errors(observer: str) -> torch.Tensor:
        _, s, z = _observe(Wg, bits, symmetric, torch.float32, observer, importance)
        deq = ((Wg / s[..., None] + z[..., None]).clamp(qmin, qmax).round() - z[..., None]) * s[..., None]
        return ((Wg - deq).pow(2) * importance).sum(-1)

    minmax, mse = group_errors("minmax"), group_errors("mse")
    assert (mse <= minmax).all() and mse.sum() < 0.95 * minmax.sum()
    for res in (rtn_quantize(W, bits=bits, group_size=group_size, symmetric=symmetric, observer="mse"),
                gptq_quantize(W, H, bits=bits, group_size=group_size, symmetric=symmetric, act_order=False,
                              static_groups=True, observer="mse")):
        assert int(res.q.min()) >= qmin and int(res.q.max()) <= qmax and (res.scale > 0).all()
    kw = dict(bits=bits, group_size=group_size, symmetric=symmetric, act_order=False, static_groups=True)
    assert gptq_quantize(W, H, **kw, observer="mse").loss < gptq_quantize(W, H, **kw).loss


def test_the_quantizers_run_on_one_cpu_thread_and_restore_the_count(monkeypatch):
    """Small sequential operations on a busy machine: one thread (llmslim/methods/gptq/core.py docstring)."""
    from llmslim.methods.gptq import core

    seen: list[int] = []
    inverse = core._inverse_cholesky
    monkeypatch.setattr(core, "_inverse_cholesky", lambda *a: (seen.append(torch.get_num_threads()), inverse(*a))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        W, X = torch.randn(32, 64), torch.randn(256, 64)
        core.gptq_quantize(W, X.T @ X / 256, bits=4, group_size=16, symmetric=True, act_order=True)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

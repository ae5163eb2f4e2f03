"""The logits losses at real-vocabulary memory: values and gradients of the chunked kl_logits / kl_topk
against plain autograd (masks, temperatures, reverse mixes, bf16 and float32), what they save for the
backward pass and their peak allocation (nothing of tokens x vocabulary beyond the one gradient), and the
recipe refusals that belong to the logits and hidden terms (teacher_topk with reverse_kl, hidden_layers
naming a teacher layer that does not exist)."""

from __future__ import annotations

import pytest
import torch
from cli_runner import run_cli
from tiny_models import tiny_recipe as recipe

from llmslim.errors import RecipeError
from llmslim.pipeline import Workspace, prepare, run
from llmslim.recipe import parse_recipe
from llmslim.training import losses


def _inputs(dtype: torch.dtype, shape=(2, 5, 100), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()
    t = (3 * torch.randn(*shape, generator=g)).to(dtype)
    return s, t


def _mask(kind: str, shape) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    return torch.arange(torch.Size(shape).numel()).reshape(shape) % 3 != 1  # two tokens of three


def _reference_grad(fn, s: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, gradient w.r.t. s) of fn on float32 copies of the kept rows, by plain autograd."""
    leaf = s.detach().float().requires_grad_()
    value = fn(leaf if mask is None else leaf[mask], mask)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # the math is float32 on both sides; a bf16 gradient is the float32 one rounded once (8 mantissa bits)
    rtol, atol = (1e-4, 1e-7) if dtype == torch.float32 else (8e-3, 1e-6)
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("temperature, reverse", [(1.0, 0.0), (2.0, 0.0), (1.0, 1.0), (1.5, 0.3)])
@pytest.mark.parametrize("mask_kind", ["none", "some", "empty"])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_kl_logits_matches_plain_autograd(dtype, temperature, reverse, mask_kind, chunk):
    s, t = _inputs(dtype)
    mask = _mask(mask_kind, s.shape[:-1])
    got = losses.kl_logits(s, t, temperature=temperature, reverse=reverse, chunk=chunk, mask=mask)
    (grad,) = torch.autograd.grad(got, s)
    assert got.dtype == torch.float32 and grad.dtype == dtype and grad.shape == s.shape

    def ref(x, m):
        kept = t.float() if m is None else t.float()[m]
        if not x.shape[0]:
            return x.sum() * 0  # no token counted: the loss is 0 (and so is its gradient)
        return losses.kl_logits_reference(x, kept, temperature=temperature, reverse=reverse)

    want, want_grad = _reference_grad(ref, s, mask)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    _close(grad, want_grad, dtype)
    if mask is not None:
        assert not grad[~mask].any()  # masked-out tokens get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mask_kind", ["none", "some"])
@pytest.mark.parametrize("k, chunk", [(5, 7), (5, 1000), (100, 13)])
def test_kl_topk_matches_plain_autograd(dtype, temperature, mask_kind, k, chunk):
    s, t = _inputs(dtype, seed=1)
    top = t.float().topk(k, dim=-1)
    mask = _mask(mask_kind, s.shape[:-1])
    got = losses.kl_topk(s, top.values, top.indices, temperature=temperature, chunk=chunk, mask=mask)
    (grad,) = torch.autograd.grad(got, s)
    assert grad.dtype == dtype

    def ref(x, m):  # the formulation kl_topk had before it was chunked
        v, ix = (top.values, top.indices) if m is None else (top.values[m], top.indices[m])
        ls = torch.log_softmax(x / temperature, -1).gather(-1, ix)
        lt = torch.log_softmax(v / temperature, -1)
        return (lt.exp() * (lt - ls)).sum(-1).mean() * temperature**2

    want, want_grad = _reference_grad(ref, s, mask)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    _close(grad, want_grad, dtype)
    if k == 100:  # every token: the top-k teacher is the teacher
        full = losses.kl_logits(s, t, temperature=temperature, mask=mask)
        assert float(got.detach()) == pytest.approx(float(full.detach()), rel=1e-5)


def test_non_contiguous_logits_and_a_scaled_upstream_gradient():
    """logits[:, :-1] cannot be flattened without a copy: the loss takes it chunk by chunk as it is; and the
    upstream gradient (a loss weight) scales the result."""
    s, t = _inputs(torch.float32, shape=(3, 6, 50))
    got = 2.5 * losses.kl_logits(s[:, :-1], t[:, :-1], chunk=16, reverse=0.5)
    (grad,) = torch.autograd.grad(got, s)
    want, want_grad = _reference_grad(lambda x, _m: 2.5 * losses.kl_logits_reference(x[:, :-1], t[:, :-1], reverse=0.5),
                                      s, None)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    _close(grad, want_grad, torch.float32)


def test_shape_mismatches_are_refused():
    s, t = _inputs(torch.float32)
    with pytest.raises(ValueError, match="mask shape"):
        losses.kl_logits(s, t, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher logits"):
        losses.kl_logits(s, t[..., :50])
    with pytest.raises(ValueError, match="reverse must be in"):
        losses.kl_logits(s, t, reverse=1.5)


# ---------------------------------------------------------------- memory

# tokens, vocabulary and chunk for the memory checks: one [N, V] float32 tensor is 2 MiB, one float32
# [N, chunk] block 128 KiB, so "the gradient and a few blocks" and "a second [N, V] tensor" are far apart
N_TOKENS, VOCAB, CHUNK = 64, 8192, 512


def _peak_bytes(fn) -> int:
    """Peak bytes held by torch's CPU allocator while fn runs, above what was held at its start: the
    profiler's allocation and free records in time order (deterministic: no RSS, no garbage collector)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _step(loss_fn, dtype: torch.dtype, mask: bool):
    """One distillation step's loss part: forward and backward on [2, 32, V] student logits, teacher given."""
    s, t = _inputs(dtype, shape=(2, N_TOKENS // 2, VOCAB), seed=3)
    m = _mask("some", s.shape[:-1]) if mask else None
    return s, lambda: loss_fn(s, t, m).backward()


OURS = {"kl_logits": lambda s, t, m: losses.kl_logits(s, t, chunk=CHUNK, mask=m, reverse=0.3),
        "kl_topk": lambda s, t, m: losses.kl_topk(s, *t.topk(16, dim=-1), chunk=CHUNK, mask=m)}


@pytest.mark.parametrize("name", sorted(OURS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mask", [False, True], ids=["all", "masked"])
def test_peak_memory_is_the_gradient_plus_a_few_chunks(name, dtype, mask):
    s, step = _step(OURS[name], dtype, mask)
    peak = _peak_bytes(step)
    grad_bytes = s.numel() * s.element_size()  # the one gradient autograd hands on (it ends up in s.grad)
    block = N_TOKENS * CHUNK * 4
    assert s.grad is not None and s.grad.dtype == dtype
    # the old kl_logits: a saved [N, V] gradient plus its scaled copy in backward, and masked copies of
    # both logit tensors; the bound leaves room for 6 float32 blocks and the [N] / [N, k] vectors
    assert peak <= grad_bytes + 6 * block + 64 * 1024, f"{peak / 2**20:.2f} MiB for a {grad_bytes / 2**20:.2f} MiB gradient"


def test_the_measurement_sees_the_plain_formulations_float32_copies():
    s, step = _step(lambda s, t, m: losses.kl_logits_reference(s, t), torch.float32, False)
    assert _peak_bytes(step) >= 3 * s.numel() * 4  # log-probabilities of both sides and their gradient


@pytest.mark.parametrize("name", sorted(OURS))
def test_nothing_of_tokens_x_vocabulary_is_saved_for_backward_but_the_inputs(name):
    """What autograd keeps between forward and backward: the inputs (references) and small vectors; the old
    kl_logits saved a whole [N, V] gradient computed in the forward pass."""
    s, t = _inputs(torch.bfloat16, shape=(2, N_TOKENS // 2, VOCAB), seed=4)
    saved: list[torch.Tensor] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = OURS[name](s, t, _mask("some", s.shape[:-1]))
    inputs = {(s.data_ptr(), s.shape), (t.data_ptr(), t.shape)}
    big = [x for x in saved if x.numel() >= N_TOKENS * CHUNK and (x.data_ptr(), x.shape) not in inputs]
    assert not big, [(tuple(x.shape), x.dtype) for x in big]
    loss.backward()


# ---------------------------------------------------------------- recipe refusals


def distill(**kw) -> dict:
    return {"method": "distill", "data": "train", "steps": 2, "batch_size": 8, "lr": 3e-3, "save_every": 5, **kw}


DROP = {"method": "drop_layers", "layers": [1]}  # 4 layers -> 3: the teacher (the original) keeps 4


@pytest.mark.parametrize("stages, message", [
    ([distill(teacher_topk=8, reverse_kl=0.5)],
     r"stages\[0\]: reverse_kl 0.5: teacher_topk distills with forward KL only"),
    ([DROP, distill(loss={"logits": 1, "hidden": 1}, hidden_layers={0: 9})],
     r"stages\[1\]\.hidden_layers: teacher layer 9 does not exist \(the teacher, the recipe's model before the "
     r"first stage, has 4 layers\)"),
    ([DROP, distill(loss={"logits": 1, "hidden": 1}, hidden_layers={0: -1})],  # not Python's last layer
     r"stages\[1\]\.hidden_layers: teacher layer -1 does not exist"),
    ([distill(loss={"hidden": 1}, hidden_layers={3: 4})], r"teacher layer 4 does not exist"),
])
def test_refused_before_any_stage_runs(tiny_tok, tmp_path, stages, message):
    """`llmslim run` plans every stage first: the refusal comes before drop_layers ran (before, a teacher
    layer past the end crashed the distill stage with an IndexError, and -1 silently meant the last one)."""
    with pytest.raises(RecipeError, match=message):
        r = parse_recipe(recipe(tmp_path, tiny_tok("llama"), stages))
        run(r)
    assert not (tmp_path / "out").exists()


def test_teacher_topk_with_forward_kl_and_an_in_range_mapping_are_accepted(tiny_tok, tmp_path):
    for i, stages in enumerate([[distill(teacher_topk=8, reverse_kl=0.0)],
                                [DROP, distill(loss={"logits": 1, "hidden": 1}, hidden_layers={0: 3, 2: 0})]]):
        r = parse_recipe(recipe(tmp_path / str(i), tiny_tok("llama"), stages))
        prepare(r, Workspace(r.spec.output))


def test_validate_prints_one_line_for_a_missing_teacher_layer(tiny_tok, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(recipe(tmp_path, tiny_tok("llama"), [DROP, distill(loss={"hidden": 1}, hidden_layers={1: 4})]))
    rc, out = run_cli("validate", str(path))
    lines = [line for line in out.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in out, out
    assert "stages[1].hidden_layers: teacher layer 4 does not exist" in lines[0]



def test_a_teacher_topk_stage_with_every_token_trains_like_full_logits(tiny_tok, tmp_path):
    """End to end through the cache and the chunked kl_topk: a top-k teacher with k = the vocabulary (512)
    is the teacher itself, so the training curve is that of plain logit distillation."""
    prune = {"method": "prune_ffn", "intermediate_size": 128, "criterion": "activation", "data": "calib"}
    curves = []
    for name, extra in (("full", {}), ("topk", {"teacher_topk": 512})):
        stages = [prune, distill(steps=3, logits_chunk=100, **extra)]  # the vocabulary in 6 chunks
        report = run(parse_recipe(recipe(tmp_path / name, tiny_tok("llama"), stages)))
        curves.append([p["logits"] for p in report["stages"][1]["notes"]["curve"]])
    assert len(curves[0]) == 3 and curves[1] == pytest.approx(curves[0], rel=1e-4)

"""The attention term (MiniLMv2 self-attention relations, llmslim.training.relations): the chunked relation
KL against plain autograd and a hand computation, the relation-head count, what it saves and its peak
memory (blocks of query rows, never a whole [R, S, S] relation), and end to end after prune_heads, with
the recipe refusals."""

from __future__ import annotations

import math

import pytest
import torch
from cli_runner import run_cli
from test_losses import _peak_bytes
from tiny_models import tiny_recipe as recipe

from llmslim.errors import RecipeError
from llmslim.pipeline import Workspace, prepare, run
from llmslim.recipe import parse_recipe
from llmslim.training import relations
from llmslim.training.config import LossWeights


def _inputs(dtype: torch.dtype, b: int = 2, s: int = 37, ws: int = 24, wt: int = 36, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(b, s, ws, generator=g)).to(dtype).requires_grad_()
    return student, (2 * torch.randn(b, s, wt, generator=g)).to(dtype)


# ---------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows", [4, 16, 1000])
@pytest.mark.parametrize("heads", [1, 3])
def test_chunked_relation_kl_matches_plain_autograd(dtype, rows, heads):
    """Student and teacher of different widths (24 and 36: d 8 and 12 with 3 relation heads), 37 tokens
    in blocks of 4 rows to all of them; the gradient in the student's dtype."""
    s, t = _inputs(dtype)
    got = 1.5 * relations.relation_kl(s, t, heads, rows=rows)  # an upstream gradient of 1.5 (a loss weight)
    (grad,) = torch.autograd.grad(got, s)
    assert got.dtype == torch.float32 and grad.dtype == dtype and grad.shape == s.shape
    leaf = s.detach().float().requires_grad_()
    want = 1.5 * relations.relation_kl_reference(leaf, t, heads)
    (want_grad,) = torch.autograd.grad(want, leaf)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    rtol, atol = (1e-4, 1e-7) if dtype == torch.float32 else (8e-3, 1e-6)  # bf16: the float32 one rounded once
    torch.testing.assert_close(grad.float(), want_grad, rtol=rtol, atol=atol)


def test_bf16_autocast_leaves_the_math_in_float32():
    """Under mixed precision (bf16 autocast, the default on a GPU) the blocks stay float32: the same value
    and gradient as without it."""
    s, t = _inputs(torch.bfloat16, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = relations.relation_kl(s, t, 3, rows=16)
    (grad,) = torch.autograd.grad(got, s)
    want = relations.relation_kl(s, t, 3, rows=16)
    (want_grad,) = torch.autograd.grad(want, s)
    assert got.dtype == torch.float32 and torch.equal(got.detach(), want.detach()) and torch.equal(grad, want_grad)


def test_relation_kl_by_hand():
    """Two tokens, width 2, one relation head: row 0 sees only itself (KL 0); row 1 is softmax(a1 . a0,
    a1 . a1) / sqrt(2) on each side. The relation ignores the scale of the whole projection only through
    the softmax: identical inputs give 0."""
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[0.0, 2.0], [1.0, -1.0]]])

    def row1(a):
        z = [float(a[1] @ a[0]) / math.sqrt(2), float(a[1] @ a[1]) / math.sqrt(2)]
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    ps, pt = row1(s[0]), row1(t[0])
    want = sum(b * math.log(b / a) for a, b in zip(ps, pt)) / 2  # mean over the 2 rows
    assert float(relations.relation_kl(s, t, 1)) == pytest.approx(want, rel=1e-5)
    assert float(relations.relation_kl(t, t, 1)) == 0.0


def test_relation_heads_default_and_refusal():
    # SmolLM2 9 -> 6 heads (KV 3 -> 2), head_dim 64: at most 2 (the fewer KV heads), and 2 divides every width
    student, teacher = relations.widths(6, 2, 64), relations.widths(9, 3, 64)
    assert relations.relation_heads(None, student, teacher, most=2) == 2
    assert relations.relation_heads(None, (18, 6, 6), (24, 12, 12), most=4) == 3  # the widths' gcd is 6
    assert relations.relation_heads(None, (30, 10, 10), (128, 64, 64), most=4) == 2  # gcd 2
    assert relations.relation_heads(None, (96, 96, 96), (128, 64, 64), most=1) == 1
    assert relations.relation_heads(16, student, teacher, most=2) == 16  # asked for: every width divides
    with pytest.raises(ValueError, match=r"^attention_relation_heads 3 does not divide the student's k_proj/v_proj "
                                         r"width 128 \(q/k/v widths: student 384/128/128, teacher 576/192/192\); "
                                         r"choose one of 1, 2, 4, 8, 16, 32, 64$"):
        relations.relation_heads(3, student, teacher, most=2)
    with pytest.raises(ValueError, match="relation heads do not divide"):
        relations.relation_kl(torch.zeros(1, 4, 6), torch.zeros(1, 4, 8), 4)
    with pytest.raises(ValueError, match="not .B, S, W. over the same tokens"):
        relations.relation_kl(torch.zeros(1, 4, 8), torch.zeros(1, 5, 8), 2)


# ---------------------------------------------------------------- memory

# 512 tokens, 4 relation heads, blocks of 32 rows: one whole float32 relation [4, 512, 512] is 4 MiB, one
# block [4, 32, 512] 256 KiB, the inputs [1, 512, 64 / 96] 128 / 192 KiB
S, HEADS, ROWS = 512, 4, 32
BLOCK = HEADS * ROWS * S * 4


def _step(fn):
    s, t = _inputs(torch.float32, b=1, s=S, ws=64, wt=96, seed=3)
    return s, lambda: fn(s, t).backward()


def test_peak_memory_is_a_few_blocks_of_rows():
    s, step = _step(lambda s, t: relations.relation_kl(s, t, HEADS, rows=ROWS))
    peak = _peak_bytes(step)
    assert s.grad is not None
    # four blocks (forward: logits, p_t, log p_t, log p_s; backward three), float32 copies of both inputs
    # cut into relation heads, the gradient and its copy in the student's layout: nothing near one whole
    # relation (16 blocks)
    inputs = (64 + 96) * S * 4
    assert peak <= 4 * BLOCK + inputs + 2 * s.numel() * 4 + 64 * 1024, f"{peak / 2**20:.2f} MiB"


def test_the_measurement_sees_the_whole_relations_of_the_plain_formulation():
    s, step = _step(lambda s, t: relations.relation_kl_reference(s, t, HEADS))
    assert _peak_bytes(step) >= 3 * HEADS * S * S * 4  # both log-relations and more, whole


def test_only_the_inputs_are_saved_for_backward():
    s, t = _inputs(torch.float32, b=1, s=S, ws=64, wt=96, seed=4)
    saved: list[torch.Tensor] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = relations.relation_kl(s, t, HEADS, rows=ROWS)
    assert {(x.data_ptr(), x.shape) for x in saved} == {(s.data_ptr(), s.shape), (t.data_ptr(), t.shape)}
    loss.backward()


# ---------------------------------------------------------------- the stage


def distill(**kw) -> dict:
    return {"method": "distill", "data": "train", "steps": 8, "batch_size": 8, "lr": 3e-3, "warmup": 1,
            "save_every": 8, **kw}


HEADS_CUT = {"method": "prune_heads", "kv_heads": 1, "criterion": "magnitude"}  # 4 heads (2 KV) -> 2 (1 KV)


def test_distill_with_attention_relations_after_prune_heads(tiny_tok, tmp_path):
    """Student q/k/v 64/32/32 wide against the teacher's 128/64/64 (GQA on both sides): 2 relation heads
    compare them; the term falls as the student trains, and the export loads and passes its check."""
    assert LossWeights().attention == 0.0  # off unless asked for (README)
    stages = [HEADS_CUT, distill(loss={"logits": 1.0, "attention": 1.0}, attention_relation_heads=2)]
    report = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("llama"), stages)))
    notes = report["stages"][1]["notes"]
    assert notes["attention"].startswith("MiniLMv2 relations Q-Q, K-K, V-V from the q/k/v projections (forward "
                                         "hooks, before RoPE), 2 relation heads over q/k/v widths 64/32/32 "
                                         "(student) and 128/64/64 (teacher)")
    assert notes["hidden_layers"] == {str(i): i for i in range(4)}  # every layer, as the hidden term maps them
    curve = notes["curve"]
    assert {"loss", "logits", "attention"} <= set(curve[0])
    assert curve[-1]["attention"] < 0.9 * curve[0]["attention"] and curve[-1]["logits"] < curve[0]["logits"]
    assert report["check"]["passed"], report["check"]


@pytest.mark.parametrize("stages, message", [
    ([HEADS_CUT, distill(loss={"logits": 1, "attention": 1}, attention_relation_heads=3)],
     r"stages\[1\]\.attention_relation_heads: attention_relation_heads 3 does not divide the student's "
     r"q_proj width 64, the student's k_proj/v_proj width 32, the teacher's q_proj width 128, the teacher's "
     r"k_proj/v_proj width 64 \(q/k/v widths: student 64/32/32, teacher 128/64/64\); choose one of 1, 2, 4, 8, "
     r"16, 32"),
    ([distill(loss={"logits": 1, "attention": 1}, teacher_topk=8)],
     r"stages\[0\]: teacher_topk caches logits only: it cannot serve the attention term"),
    ([HEADS_CUT, distill(loss={"attention": 1}, hidden_layers={0: 4})],
     r"stages\[1\]\.hidden_layers: teacher layer 4 does not exist"),
    ([distill(loss={"attention": 1}, hidden_layers={})], r"hidden_layers is empty but loss.attention is on"),
    ([{"method": "qat", "data": "train", "steps": 2, "bits": 4, "group_size": 32, "init": "rtn",
       "loss": {"logits": 1, "attention": 1}, "attention_relation_heads": 5}],
     r"stages\[0\]\.attention_relation_heads: attention_relation_heads 5 does not divide"),
])
def test_bad_attention_recipes_are_refused_in_the_plan(tiny_tok, tmp_path, stages, message):
    with pytest.raises(RecipeError, match=message):
        r = parse_recipe(recipe(tmp_path, tiny_tok("llama"), stages))
        prepare(r, Workspace(r.spec.output))


def test_a_teacher_whose_widths_the_relation_heads_do_not_divide_gets_one_line(tiny_tok, tiny, tmp_path):
    """`teacher:` with head_dim 24 (q/k/v 96/48/48): 32 relation heads divide the student (128/64/64) but
    not the teacher's k and v; `llmslim validate` says so in one line, no traceback."""
    import json

    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**json.loads((tiny("llama") / "config.json").read_text()), "head_dim": 24})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "teacher")
    path = tmp_path / "r.yaml"
    path.write_text(recipe(tmp_path, tiny_tok("llama"), [distill(loss={"logits": 1, "attention": 1},
                                                                 teacher=str(tmp_path / "teacher"),
                                                                 attention_relation_heads=32)]))
    rc, out = run_cli("validate", str(path))
    lines = [line for line in out.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in out, out
    assert ("stages[0].attention_relation_heads: attention_relation_heads 32 does not divide the teacher's "
            "k_proj/v_proj width 48 (q/k/v widths: student 128/64/64, teacher 96/48/48); choose one of 1, 2, 4, 8, "
            "16") in lines[0]

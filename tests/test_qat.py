"""qat: the fake-quant grid against rtn's, straight-through gradients, an export that is exactly the trained
model, learnable scales, QLoRA with NF4 on CPU, resume after a kill, the vLLM load check, clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from tiny_models import tiny_recipe as recipe

from llmslim.check import check_exports, vllm_run_for
from llmslim.checkpoint import Checkpoint
from llmslim.errors import RecipeError
from llmslim.methods.gptq.core import rtn_quantize
from llmslim.pipeline import Workspace, prepare, run
from llmslim.recipe import parse_recipe
from llmslim.training.fakequant import fake_quant, integers

# ---------------------------------------------------------------- the grid, pure


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (3, -1, True), (4, 64, False), (8, -1, True)])
def test_fake_quant_integers_are_rtns(bits, group, symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g)
    w[3, 7] = 9.0
    gs = 128 if group == -1 else group
    ref = rtn_quantize(w, bits=bits, group_size=group, symmetric=symmetric)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = integers(w, ref.scale, ref.zero.float(), qmin, qmax, gs)
    assert torch.equal(q, ref.q)
    torch.testing.assert_close(fake_quant(w, ref.scale, ref.zero.float(), qmin, qmax, gs), ref.weight, rtol=0, atol=0)


def test_straight_through_gradients():
    scale = torch.full((2, 1), 0.5)
    zero = torch.zeros(2, 1)
    w = torch.tensor([[0.1, 0.74, 9.0, -9.0], [0.3, -0.2, 0.0, 1.1]], requires_grad=True)
    out = fake_quant(w, scale, zero, -4, 3, 4)  # 3-bit: q in [-4, 3], so |w| > 2 is clamped
    out.backward(torch.ones_like(out))
    assert w.grad.tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]  # through round, not through clamp
    s = scale.clone().requires_grad_()
    fake_quant(w.detach(), s, zero, -4, 3, 4).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0  # LSQ: scales learn


# ---------------------------------------------------------------- the stage


def qat(**kw) -> dict:
    return {"method": "qat", "data": "train", "calib_data": "calib", "steps": 8, "batch_size": 8, "lr": 1e-2,
            "save_every": 4, "bits": 4, "group_size": 32, "lora": {"r": 4, "alpha": 8}, **kw}


def test_the_export_is_the_trained_model(tiny_tok, tmp_path):
    """The perplexity the stage measures in memory at its last step, with the fake-quantized model, equals
    the export's, reloaded from disk by transformers: the integers written are the ones trained."""
    report = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("llama"), [qat(eval_data="heldout", learn_scales=True)],
                                     eval={"perplexity": ["heldout"]})))
    notes = report["stages"][0]["notes"]
    in_memory = notes["eval"][-1]["ppl"]
    assert report["eval"]["after"]["perplexity"]["heldout"]["ppl"] == pytest.approx(in_memory, rel=1e-5)
    assert len(notes["curve"]) == 8 and all(p["loss"] >= 0 for p in notes["curve"])
    assert " of " in notes["integers_changed_by_training"] and notes["grid"] == "W4 g32 symmetric"
    config = json.loads((Path(report["output"]) / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    ckpt = Checkpoint(report["output"])
    scales = ckpt.read([n for n in ckpt.names if n.endswith("weight_scale")])
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in scales.values())  # learned, still valid


@pytest.mark.parametrize("init, ptq", [("rtn", {"method": "rtn"}), ("gptq", {"method": "gptq", "data": "calib"})])
def test_a_start_with_zero_steps_of_change_is_the_ptq_stage(tiny_tok, tmp_path, init, ptq):
    """With a learning rate too small to move any integer, qat's export equals the PTQ stage's on the same grid:
    rtn's, or gptq's with its defaults (act-order on static groups), so training starts from the best PTQ."""
    a = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("qwen3"), [qat(init=init, lr=1e-12, steps=2)])))
    b = run(parse_recipe(recipe(tmp_path / "b", tiny_tok("qwen3"), [{**ptq, "bits": 4, "group_size": 32}])))
    ta, tb = Checkpoint(a["output"]), Checkpoint(b["output"])
    x, y = ta.read(ta.names), tb.read(tb.names)
    assert x.keys() == y.keys()
    differ = {k: int((x[k] != y[k]).sum()) for k in x if k.endswith(("weight_packed", "weight_scale"))
              and not torch.equal(x[k], y[k])}
    assert not differ, differ  # tensor -> how many of its packed words or scales differ
    assert a["stages"][0]["notes"]["integers_changed_by_training"].startswith("0 of ")


TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def test_the_nf4_merge_computes_what_peft_computes(tiny):
    """QLoRA's merge (dequantized NF4 base + (alpha / r) B A, as plain Linears) against peft's own forward of
    the NF4 model with its adapters, with adapters that move the logits: equal within float noise. Merging
    into the float weights instead of the NF4 ones, or without the alpha / r scale, is far outside it."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    from llmslim.methods.qat import merge_nf4, nf4_lora

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny("llama"), dtype=torch.float32).eval()

    names = [f"model.layers.{i}.{t}" for i in range(4) for t in TARGETS]
    torch.manual_seed(0)
    model = nf4_lora(load(), names, 4, 8.0, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at zero; trained adapters are not
            p.data = 0.05 * torch.randn(p.shape, generator=g)
    tokens = torch.randint(3, 512, (2, 24), generator=g)
    with torch.no_grad():
        want = model(input_ids=tokens).logits  # peft: NF4 matmul + scale * B(A(x))
        with model.disable_adapter():
            nf4_alone = model(input_ids=tokens).logits
        deltas = {n: m.get_delta_weight("default") for n, m in model.get_base_model().named_modules()
                  if hasattr(m, "base_layer")}
        merged = merge_nf4(model)
        got = merged(input_ids=tokens).logits
        float_base = load()  # the float weights + the same deltas: what a merge that skipped NF4 would write
        for n, d in deltas.items():
            float_base.get_submodule(n).weight.data += d
        unscaled = copy.deepcopy(merged)  # the merge without alpha / r (= 2 here)
        for n, d in deltas.items():
            unscaled.get_submodule(n).weight.data -= d / 2
        wrong = {"float base": float_base(input_ids=tokens).logits, "no alpha/r": unscaled(input_ids=tokens).logits}
    assert not any(isinstance(m, Linear4bit) or hasattr(m, "lora_A") for m in merged.modules())  # plain Linears
    tol = 1e-4 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol
    assert float((nf4_alone - want).abs().max()) > 100 * tol  # the adapters matter
    for what, logits in wrong.items():
        assert float((logits - want).abs().max()) > 10 * tol, what


def test_an_evaluation_between_qlora_steps_leaves_the_nf4_weights_as_training_uses_them(tiny):
    """A forward in eval mode (eval_data's perplexity during training) changes nothing training sees: the
    gradients of every adapter and the dequantized NF4 weights are the same after it. On a CPU with
    AVX512_BF16, bitsandbytes 0.50 repacks an NF4 weight for its inference kernel at such a forward, after which
    its matmul has no backward (the gradient through the frozen base is dropped) and dequantize_4bit misreads
    it: a QLoRA run with eval_data trained on a broken gradient and merged noise until nf4_lora turned the
    repacking off. (Elsewhere bitsandbytes never repacks; the test holds there as well.)"""
    from transformers import AutoModelForCausalLM

    from llmslim.methods.qat import _dequantized, nf4_lora

    names = [f"model.layers.{i}.{t}" for i in range(4) for t in TARGETS]
    torch.manual_seed(0)
    model = nf4_lora(AutoModelForCausalLM.from_pretrained(tiny("llama"), dtype=torch.float32), names, 4, 8.0,
                     torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = 0.05 * torch.randn(p.shape, generator=g)
    tokens = torch.randint(3, 512, (2, 24), generator=g)
    bases = {n: m.base_layer.weight for n, m in model.get_base_model().named_modules() if hasattr(m, "base_layer")}

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before, dense = gradients(), {n: _dequantized(w).clone() for n, w in bases.items()}
    model.eval()
    with torch.no_grad():
        model(input_ids=tokens)
    after = gradients()
    assert len(before) == 2 * len(names) and after.keys() == before.keys()
    for n in before:
        assert torch.allclose(after[n], before[n], rtol=1e-4, atol=1e-7), n
    assert all(torch.equal(_dequantized(w), dense[n]) for n, w in bases.items())


def test_qlora_nf4_stage_writes_the_nf4_base_plus_a_rank_r_update(tiny_tok, tmp_path):
    """The stage's export, per target Linear: its weight minus bitsandbytes' NF4 round trip of the input
    weight is the trained adapters' update, nonzero and of rank r (here 4); every other tensor is the
    input's. Exporting the float weights plus the update, or the NF4 weights without it, fails this."""
    import bitsandbytes.functional as bnbf

    stage = qat(base="nf4", bits=4, group_size=128, steps=3)
    stage.pop("calib_data")
    report = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("llama"), [stage])))
    assert report["stages"][0]["notes"]["base"].startswith("nf4") and report["check"]["passed"]
    src, out = Checkpoint(tiny_tok("llama")), Checkpoint(report["output"])
    before, after = src.read(src.names), out.read(out.names)
    assert before.keys() == after.keys()
    targets = {f"model.layers.{i}.{t}.weight" for i in range(4) for t in TARGETS}
    for name, w in after.items():
        if name not in targets:
            assert torch.equal(w, before[name]), name
            continue
        packed, state = bnbf.quantize_4bit(before[name], blocksize=64, compress_statistics=True, quant_type="nf4")
        update = (w - bnbf.dequantize_4bit(packed, state)).double()
        s = torch.linalg.svdvals(update)
        assert s[0] > 1e-4 and s[4] <= 1e-4 * s[0], (name, s[:6].tolist())


def test_a_killed_qat_resumes_to_the_same_export(tiny_tok, tmp_path):
    model = tiny_tok("llama")
    stages = [qat(steps=10, save_every=4)]
    ref = run(parse_recipe(recipe(tmp_path / "ref", model, stages)))
    path = tmp_path / "killed" / "r.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(recipe(tmp_path / "killed", model, stages))
    rc, out = run_cli("run", str(path), "--quiet", env={"LLMSLIM_CRASH_AT": "train.saved:2"})
    assert rc == -9, out
    rc, out = run_cli("run", str(path), "--quiet")
    assert rc == 0 and "resuming the training at step 8 of 10" in out, out
    a, b = Checkpoint(ref["output"]), Checkpoint(tmp_path / "killed" / "out")
    ta, tb = a.read(a.names), b.read(b.names)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)  # integers, scales and the rest, exactly


@pytest.mark.vllm
def test_qat_exports_load_in_vllm(tiny_tok, tmp_path):
    outs = [run(parse_recipe(recipe(tmp_path / name, tiny_tok("llama"), [stage])))["output"]
            for name, stage in (("w4", qat(steps=4)), ("w8a8", qat(steps=4, bits=8, group_size=-1, activation_bits=8)))]
    for out, r in zip(outs, check_exports(outs, "vllm")):
        assert r.passed, r.detail
        # where this machine has the kernels (llmslim.cpu's tables): greedy tokens equal to transformers'
        plan = vllm_run_for(out)
        assert r.generated == (plan.generates and plan.faithful), r.detail


@pytest.mark.parametrize("stage, message", [
    (qat(base="nf4", bits=3), r"base nf4 is bitsandbytes' 4-bit NormalFloat"),
    (qat(group_size=128, bits=4), r"stages\[0\]\.group_size: group_size 128 does not divide the input width"),
    (qat(trainable="all"), r"trainable must be lora"),
    (qat(lora={"r": 4, "dropout": 0.1}), r"lora.dropout must be 0 for qat"),
])
def test_bad_qat_recipes_get_one_line(tiny_tok, tmp_path, stage, message):
    with pytest.raises(RecipeError, match=message):
        r = parse_recipe(recipe(tmp_path, tiny_tok("llama", intermediate_size=192), [stage]))
        prepare(r, Workspace(r.spec.output))


def test_qlora_is_refused_under_fsdp(tiny_tok, tmp_path, monkeypatch):
    """`accelerate launch --use_fsdp` sets ACCELERATE_USE_FSDP: NF4 bases cannot be sharded, said up front."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    stage = qat(base="nf4", group_size=128)
    stage.pop("calib_data")
    r = parse_recipe(recipe(tmp_path, tiny_tok("llama"), [stage]))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.base: base nf4 cannot train under FSDP"):
        prepare(r, Workspace(r.spec.output))


def test_qat_refuses_moe_models(tiny, tmp_path):
    r = parse_recipe(recipe(tmp_path, tiny("mixtral"), [qat()]))
    with pytest.raises(RecipeError, match=r"qat trains LoRA adapters on Linear layers and MoE experts are fused"):
        prepare(r, Workspace(r.spec.output))

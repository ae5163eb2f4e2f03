"""[10] post-training quantization beyond plain GPTQ: awq (scale search and folding), gptaq (asymmetric
calibration), and how they compose with gptq/rtn through the pipeline: unchanged function where the
method promises it, objectives never worse than their start, resume after a kill, clear errors."""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import pytest
import torch
from fault_runs import export_differences, llmslim_run
from tiny_models import tiny_recipe
from transformers import AutoModelForCausalLM

from llmslim.errors import RecipeError
from llmslim.layerwise import layer_output
from llmslim.methods import autoround, awq
from llmslim.methods.gptq.core import (
    CrossAccumulator,
    HessianAccumulator,
    asymmetric_target,
    gptq_quantize,
    rtn_quantize,
)
from llmslim.pipeline import Workspace, prepare, run
from llmslim.recipe import parse_recipe


def logits_of(path: Path | str, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def report_of(out: Path) -> dict:
    return json.loads((out / "llmslim_report.json").read_text())


# ---------------------------------------------------------------- awq: the search


def _outlier_inputs(gen: torch.Generator, tokens: int = 512, width: int = 64) -> torch.Tensor:
    """Activations with a few loud channels (as real LLM inputs have): where AWQ's scaling pays."""
    x = torch.randn(tokens, width, generator=gen)
    x[:, :4] *= 20
    return x


@pytest.mark.parametrize("duo, group", [(True, -1), (False, -1), (True, 32)])
def test_awq_search_is_never_worse_than_no_scaling_and_wins_on_loud_channels(duo, group):
    gen = torch.Generator().manual_seed(0)
    x, W = _outlier_inputs(gen), torch.randn(48, 64, generator=gen)

    def q(w: torch.Tensor) -> torch.Tensor:
        return rtn_quantize(w, bits=3, group_size=group, symmetric=True).weight

    found = awq.search_scale(x, W, q, grid=20, duo_scaling=duo, group_size=group)
    plain = float((x @ q(W).T - x @ W.T).pow(2).mean())
    assert found.error_unscaled == pytest.approx(plain, rel=1e-6)
    assert found.error <= found.error_unscaled
    assert found.alpha is not None and found.error < 0.9 * plain  # loud channels: scaling helps (by 19 % or more here)
    assert found.scale[:4].min() > found.scale[4:].max()  # ... by scaling the loud channels up
    s = found.scale
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    # uniform inputs, uniform weights: nothing to gain, and the search says so rather than making it worse
    x2 = torch.randn(512, 64, generator=gen)
    flat = awq.search_scale(x2, W, q, grid=5, duo_scaling=duo, group_size=group)
    assert flat.error <= flat.error_unscaled


@pytest.mark.parametrize("arch, block, linears", [
    ("llama", "self_attn", ("q_proj", "k_proj", "v_proj")),  # through softmax attention and o_proj
    ("llama", "mlp", ("gate_proj", "up_proj")),  # through the activation, the product and down_proj
    ("gemma3", "self_attn", ("q_proj", "k_proj", "v_proj")),  # per-head q/k norms, scaled attention
])
def test_awq_module_objective_picks_the_candidate_with_the_smallest_block_output_error(arch, block, linears):
    """The `module` search (weights swapped in as Q(W s) / s on unscaled inputs) against a direct computation:
    each candidate folded for real (Q(W s) on inputs x / s), the block's output compared with the original's."""
    from tiny_models import build_model

    model = build_model(arch).double().eval()
    layer = model.model.layers[0]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 24, 128, generator=gen, dtype=torch.float64)
    h[..., :4] *= 20  # loud hidden channels: scaling pays
    kind = getattr(layer.self_attn, "layer_type", None)  # Gemma 3: a rotary base per attention kind
    rotary = model.model.rotary_emb(h, torch.arange(24)[None], *([kind] if kind else []))
    calls: list = []
    handle = layer.get_submodule(block).register_forward_pre_hook(lambda _m, a, kw: calls.append((a, kw)),
                                                                   with_kwargs=True)
    with torch.no_grad():
        layer(h, position_embeddings=rotary, attention_mask=None)
    handle.remove()
    parent = layer.get_submodule(block)
    lins = [parent.get_submodule(n) for n in linears]
    W = torch.cat([lin.weight.float() for lin in lins])
    x = awq._hidden(calls[0])
    x_mean = x.reshape(-1, 128).abs().mean(0).float()

    def q(w: torch.Tensor) -> torch.Tensor:
        return rtn_quantize(w, bits=3, group_size=32, symmetric=True).weight

    found = awq.search(x_mean, W, q, awq.module_error(parent, lins, calls), grid=10, group_size=32)
    assert all(torch.equal(lin.weight.float(), w) for lin, w in zip(lins, W.split([l.out_features for l in lins])))

    def direct(s: torch.Tensor) -> float:
        moved = copy.deepcopy(parent)
        for n, w in zip(linears, q(W * s).split([lin.out_features for lin in lins])):
            moved.get_submodule(n).weight.data = w.double()
        args, kw = calls[0]
        scaled = ((args[0] / s.double(),), kw) if args else ((), {**kw, "hidden_states": x / s.double()})
        with torch.no_grad():
            out, ref = layer_output(moved(*scaled[0], **scaled[1])), layer_output(parent(*args, **kw))
        return float((out - ref).pow(2).mean())

    errors = [(direct(s), alpha) for alpha, s in awq.candidates(x_mean, awq.weight_profile(W, 32), 10)]
    best, alpha = min(errors, key=lambda e: e[0])
    assert found.alpha == alpha and alpha is not None
    assert found.error == pytest.approx(best, rel=1e-4)
    assert found.error_unscaled == pytest.approx(errors[0][0], rel=1e-4)
    assert found.error < 0.9 * found.error_unscaled
    assert sorted(e for e, _ in errors)[1] > best * (1 + 1e-3)  # a clear winner: not decided by float noise


# ---------------------------------------------------------------- awq: folding keeps the function


@pytest.mark.parametrize("arch, model_kw, maps, search", [
    ("llama", {"gqa": False}, {"qkv", "o", "gate_up", "down"}, {}),  # no GQA: v -> o is folded too
    ("llama", {"gqa": False}, {"qkv", "o", "gate_up", "down"}, {"objective": "linear"}),
    ("llama", {}, {"qkv", "gate_up", "down"}, {"objective": "module", "tokens": 100}),  # a sample of sequences
    ("qwen2", {}, {"qkv", "gate_up", "down"}, {}),  # q/k/v biases
    ("qwen3", {}, {"qkv", "gate_up", "down"}, {}),  # per-head q/k norms after the projections
    ("gemma3", {"gqa": False}, {"qkv", "o", "gate_up", "down"}, {}),  # (1 + weight) norms, pre/post sandwich norms
    ("gemma3", {}, {"qkv", "gate_up", "down"}, {"objective": "module", "tokens": 100}),  # sliding + global masks
])
def test_awq_folding_leaves_the_unquantized_logits_unchanged(tiny_tok, tmp_path, arch, model_kw, maps, search):
    src = tiny_tok(arch, **model_kw)
    stage = {"method": "awq", "data": "calib", "bits": 3, "group_size": 32, **search}
    recipe = parse_recipe(tiny_recipe(tmp_path, src, [stage]))
    run(recipe)
    out = Path(recipe.spec.output)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    before, after = logits_of(src, ids), logits_of(out, ids)
    assert float((before - after).abs().max()) <= 1e-5 * float(before.abs().max())
    layers = report_of(out)["stages"][0]["notes"]["layers"]
    assert set(layers["0"]) == maps
    scaled = [m for d in layers.values() for m, v in d.items() if v["alpha"] is not None]
    assert scaled, "no mapping was scaled: the test would not see a wrong fold"
    assert all(v["error"] <= v["error_unscaled"] for d in layers.values() for v in d.values())
    changed = AutoModelForCausalLM.from_pretrained(out).state_dict()
    original = AutoModelForCausalLM.from_pretrained(src).state_dict()
    assert any(not torch.equal(changed[k], original[k]) for k in original if "layernorm" in k)


@pytest.mark.parametrize("stages, message", [
    ([{"method": "awq", "data": "calib", "bits": 4, "group_size": 32},
      {"method": "rtn", "bits": 3, "group_size": 32}],
     r"stages\[1\]\.bits: the awq stage before searched its scales with bits 4; this stage rounds with bits 3: "
     r"set bits: 3 on the awq stage, or leave it out there"),
    ([{"method": "awq", "data": "calib", "bits": 4, "group_size": 64}],
     r"stages\[0\]\.group_size: group_size 64 does not divide the input width 96 of down_proj"),
    ([{"method": "awq", "data": "calib", "bits": 4, "group_size": 32, "ignore": ["lm_head", "down_proj"]},
      {"method": "rtn", "bits": 4, "group_size": 32}],
     r"stages\[1\]\.ignore: the awq stage before searched its scales with ignore \['lm_head', 'down_proj'\]; "
     r"this stage rounds with ignore \['lm_head'\]"),
    ([{"method": "awq", "data": "calib", "group_size": 32, "ignore": ["lm_head", "down_prj"]}],
     r"stages\[0\]\.ignore: 'down_prj' matches no Linear of the model"),
    ([{"method": "awq", "data": "calib", "group_size": 32, "ignore": ["re:(.*"]}],
     r"stages\[0\]: ignore\[0\]: 're:\(\.\*' is not a valid regex"),
    ([{"method": "awq", "data": "calib", "group_size": 32, "ignore": ["v_proj"]}],
     r"stages\[0\]\.ignore: .*keeps only some of"),
])
def test_awq_grid_must_fit_the_model_and_the_quantization_that_follows(tiny, tmp_path, stages, message):
    with pytest.raises(RecipeError, match=message):  # at parsing (a bad regex) or at planning
        recipe = parse_recipe(tiny_recipe(tmp_path, tiny("llama", intermediate_size=96), stages))
        prepare(recipe, Workspace(recipe.spec.output))


def test_awq_leaves_ignored_linears_alone_and_matches_the_stage_that_keeps_them(tiny_tok, tmp_path):
    # group_size 32 does not divide the 72-wide down_proj: kept unquantized by both stages, as the benchmark's
    # W4 g32 row on stories260K (172-wide) does
    src = tiny_tok("llama", intermediate_size=72)
    grid = {"bits": 4, "group_size": 32, "ignore": ["lm_head", "down_proj"]}
    recipe = parse_recipe(tiny_recipe(tmp_path, src, [{"method": "awq", "data": "calib", **grid},
                                                      {"method": "rtn", **grid}]))
    run(recipe)
    out = Path(recipe.spec.output)
    layers = report_of(out)["stages"][0]["notes"]["layers"]
    assert all(d["down"] == {"alpha": None, "error": 0.0, "error_unscaled": 0.0, "ignored": True}
               for d in layers.values())
    assert any(d["gate_up"]["alpha"] is not None for d in layers.values()), "nothing scaled: the test sees nothing"
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    downs = [k for k in original if k.endswith("down_proj.weight")]
    assert downs and all(torch.equal(exported[k], original[k]) for k in downs)  # neither scaled nor quantized


def test_awq_refuses_moe_models(tiny, tmp_path):
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny("mixtral"), [{"method": "awq", "data": "calib",
                                                                   "group_size": 32}]))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.method: mixtral: awq scales dense Linears"):
        prepare(recipe, Workspace(recipe.spec.output))


def test_killed_awq_then_gptq_resumes_per_layer_and_ends_byte_identical(tiny_tok, tmp_path):
    stages = [{"method": "awq", "data": "calib", "bits": 4, "group_size": 32, "observer": "mse"},
              {"method": "gptq", "data": "calib", "bits": 4, "group_size": 32, "observer": "mse", "gptaq": True}]

    def recipe(name: str) -> Path:
        path = tmp_path / name / "recipe.yaml"
        path.write_text(tiny_recipe(tmp_path / name, tiny_tok("llama"), stages))
        return path

    rc, out = llmslim_run(recipe("uninterrupted"))
    assert rc == 0, out[-3000:]
    killed = recipe("killed")
    for point in ("awq.layer:2", "gptq.layer:1"):  # gptq resumes its full-precision stream too (gptaq)
        rc, out = llmslim_run(killed, crash_at=point)
        assert rc == -signal.SIGKILL, f"{point} was not reached: {out[-3000:]}"
    rc, out = llmslim_run(killed)
    assert rc == 0, out[-3000:]
    report = report_of(tmp_path / "killed" / "out")
    assert report["stages"][0]["notes"]["layers_from_earlier_run"] == 2
    assert report["stages"][1]["notes"]["layers_from_earlier_run"] == 1
    assert export_differences(tmp_path / "uninterrupted" / "out", tmp_path / "killed" / "out") == []


# ---------------------------------------------------------------- gptaq


def _streams(gen: torch.Generator, tokens: int = 2000, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-precision inputs x and the quantized model's x~ = x A + noise: a systematic drift, as the
    error of quantized layers before causes."""
    x = torch.randn(tokens, width, generator=gen) * torch.linspace(0.2, 3, width)
    drift = torch.eye(width) + 0.1 * torch.randn(width, width, generator=gen)
    return x, x @ drift + 0.05 * torch.randn(tokens, width, generator=gen)


def test_asymmetric_target_is_the_least_squares_fit_to_the_full_precision_outputs():
    gen = torch.Generator().manual_seed(0)
    x, xq = _streams(gen)
    W = torch.randn(24, 32, generator=gen)
    h, c = HessianAccumulator(32), CrossAccumulator(32)
    for a, b in zip(x.split(300), xq.split(300)):  # batches fold into the same running means
        h.add(b)
        c.add(a, b)
    assert torch.allclose(c.C, 2 / len(x) * (x - xq).T @ xq, rtol=1e-4, atol=1e-5)
    target = asymmetric_target(W.double(), h.H.double(), c.C.double(), dampening=0.0)
    lstsq = torch.linalg.lstsq(xq.double(), (x @ W.T).double()).solution.T
    assert torch.allclose(target, lstsq, rtol=1e-4, atol=1e-4)  # H and C are float32 running means

    def error(V: torch.Tensor) -> float:
        return float((xq @ V.T - x @ W.T).pow(2).mean())

    plain = gptq_quantize(W, h.H, bits=3, group_size=-1, symmetric=True, act_order=True)
    asym = gptq_quantize(asymmetric_target(W, h.H, c.C), h.H, bits=3, group_size=-1, symmetric=True, act_order=True)
    assert error(asym.weight) < 0.5 * error(plain.weight)  # the drift is compensated, not only the rounding
    assert int(asym.q.min()) >= -4 and int(asym.q.max()) <= 3


def test_gptaq_refuses_moe_models(tiny, tmp_path):
    stage = {"method": "gptq", "data": "calib", "group_size": 32, "gptaq": True}
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny("qwen3_moe"), [stage]))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.gptaq: qwen3_moe: gptaq calibrates dense Linears"):
        prepare(recipe, Workspace(recipe.spec.output))


# ---------------------------------------------------------------- autoround


@pytest.mark.parametrize("bits, group, symmetric", [(3, -1, True), (4, 32, True), (4, 32, False), (2, 64, False)])
def test_autoround_starts_at_rtn_and_stays_on_the_grid(bits, group, symmetric):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 128, generator=gen) * torch.rand(48, 1, generator=gen)
    r = autoround.Rounding.start(W, group)
    start = autoround.final_weights(W, r, bits=bits, group_size=group, symmetric=symmetric, scale_dtype=torch.float32)
    rtn = rtn_quantize(W, bits=bits, group_size=group, symmetric=symmetric)
    assert torch.equal(start.q, rtn.q) and torch.equal(start.scale, rtn.scale) and torch.equal(start.zero, rtn.zero)
    fake = autoround.fake_quant(W, r, bits=bits, group_size=group, symmetric=symmetric)
    assert torch.allclose(fake, rtn.weight, atol=1e-6)
    # parameters pushed beyond their ranges by big steps come back into them, and the integers stay in range
    for p in r.tensors():
        p.grad = torch.randn(p.shape, generator=gen)
    autoround.signed_step(r, lr=3.0)
    assert float(r.v.abs().max()) == 0.5 and float(r.alpha.min()) == 0.5 and float(r.beta.max()) <= 1.0
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for full_range in (False, True):
        moved = autoround.final_weights(W, r, bits=bits, group_size=group, symmetric=symmetric,
                                        scale_dtype=torch.bfloat16, full_range=full_range)
        assert int(moved.q.min()) >= qmin and int(moved.q.max()) <= qmax and not torch.equal(moved.q, start.q)
        assert bool(torch.isfinite(moved.scale.float()).all()) and bool((moved.scale != 0).all())
        assert moved.scale.dtype == torch.bfloat16
        assert bool((moved.scale > 0).all()) or (symmetric and full_range)
        fake = autoround.fake_quant(W, r, bits=bits, group_size=group, symmetric=symmetric, full_range=full_range)
        exact = autoround.final_weights(W, r, bits=bits, group_size=group, symmetric=symmetric,
                                        scale_dtype=torch.float32, full_range=full_range)
        assert torch.allclose(fake, exact.weight, atol=1e-6)


@pytest.mark.parametrize("bits, group", [(3, -1), (4, 32), (8, 64)])
def test_autoround_full_range_puts_each_groups_largest_weight_on_qmin_with_a_finer_step(bits, group):
    """The full-range symmetric start: the largest-magnitude weight of every group is exactly qmin * scale
    (the scale negative where that weight is positive), every integer in [qmin, qmax], the step
    2^(b-1) / (2^(b-1) - 1/2) times finer than rtn's, and the rounding error below rtn's."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(64, 256, generator=gen) * torch.rand(64, 1, generator=gen)
    r = autoround.Rounding.start(W, group)
    full = autoround.final_weights(W, r, bits=bits, group_size=group, symmetric=True, scale_dtype=torch.float32,
                                   full_range=True)
    rtn = rtn_quantize(W, bits=bits, group_size=group, symmetric=True)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert int(full.q.min()) == qmin and int(full.q.max()) <= qmax and bool((full.zero == 0).all())
    gs = W.shape[1] if group == -1 else group
    Wg = W.reshape(W.shape[0], -1, gs)
    largest = Wg.gather(-1, Wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(largest, qmin * full.scale, rtol=1e-6)
    assert bool(((full.scale < 0) == (largest > 0)).all())
    assert torch.allclose(full.scale.abs() / rtn.scale, torch.tensor((qmax - qmin) / 2 / 2 ** (bits - 1)))
    assert float((full.weight - W).pow(2).sum()) < float((rtn.weight - W).pow(2).sum())


def test_autoround_learns_a_layer_better_than_rtn_and_never_ends_worse(tiny):
    """One decoder layer of a tiny Llama at W3: the learned rounding lowers the layer's output error below
    round-to-nearest's; after one step far too large (every parameter thrown to its bound) the learned
    parameters are worse and the start is kept. Either way the layer computes with exactly the returned (on-grid) weights."""
    from llmslim.checkpoint import Checkpoint, LazyModel
    from llmslim.layerwise import capture_inputs, run_layer, walk
    from llmslim.methods.gptq.format import QuantFormat

    ckpt = Checkpoint(tiny("llama"))
    lazy = LazyModel(ckpt, torch.float32)
    inputs = capture_inputs(lazy, torch.randint(3, 500, (8, 32), generator=torch.Generator().manual_seed(0)))
    step = next(walk(lazy, inputs, release=False))
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    original = {k: v.clone() for k, v in step.layer.state_dict().items()}
    targets = run_layer(step.layer, step.inputs)
    for lr, iters, learned in ((None, 30, True), (5.0, 1, False)):
        step.layer.load_state_dict(original)
        cfg = autoround.AutoRoundConfig(data="c", bits=3, group_size=32, iters=iters, lr=lr)
        formats = dict.fromkeys(names, QuantFormat.of(cfg))
        results, notes = autoround.learn_layer(step.layer, formats, step.inputs, targets, cfg, torch.float32,
                                               torch.Generator().manual_seed(0))
        assert notes["learned_kept"] is learned, notes
        assert notes["objective"] <= notes["objective_rtn"]
        if learned:
            assert notes["objective"] < 0.9 * notes["objective_rtn"]
        for n in names:
            lin = step.layer.get_submodule(n)
            assert isinstance(lin.weight, torch.nn.Parameter) and torch.equal(lin.weight, results[n].weight)
            assert int(results[n].q.min()) >= -4 and int(results[n].q.max()) <= 3
        after = run_layer(step.layer, step.inputs)
        measured = sum(float((a - y).pow(2).sum()) for a, y in zip(after, targets)) / sum(y.numel() for y in targets)
        assert measured == pytest.approx(notes["objective"], rel=1e-4)


def test_autoround_export_loads_and_reproduces_the_stage_weights(tiny_tok, tmp_path):
    stage = {"method": "autoround", "data": "calib", "bits": 4, "group_size": 32, "iters": 5}
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_tok("qwen3"), [stage]))
    run(recipe)
    out = Path(recipe.spec.output)
    report = report_of(out)
    notes = report["stages"][0]["notes"]
    assert notes["scheme"] == "W4A16" and len(notes["layers"]) == 4
    assert all(d["objective"] <= d["objective_rtn"] for d in notes["layers"])
    assert report["check"]["passed"] is True, report["check"]  # transformers: the reload == the stage's weights


@pytest.mark.parametrize("stage, message", [
    ({"method": "autoround", "data": "calib", "bits": 8, "group_size": -1, "activation_bits": 8},
     r"autoround is weight-only"),
    ({"method": "autoround", "data": "calib", "observer": "mse"}, r"autoround learns each group's clipping range"),
])
def test_bad_autoround_parameters_get_one_clear_line(tiny, tmp_path, stage, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tiny_recipe(tmp_path, tiny("llama"), [stage]))


# ---------------------------------------------------------------- mixed precision


MIXED = {"method": "rtn", "bits": 4, "group_size": 32,
         "groups": [{"targets": ["down_proj"], "bits": 8, "group_size": -1},
                    {"targets": [r"re:model\.layers\.0\.self_attn\.[qkv]_proj"], "bits": 8}]}


def test_mixed_precision_config_groups_match_the_written_tensors(tiny_tok, tmp_path):
    import re

    from safetensors import safe_open

    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_tok("qwen2"), [MIXED]))
    run(recipe)
    out = Path(recipe.spec.output)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = list(config["config_groups"].values())
    schemes = {(g["weights"]["num_bits"], g["weights"]["group_size"]) for g in groups}
    assert schemes == {(4, 32), (8, None), (8, 32)}, schemes  # compressed-tensors writes per channel as None

    def scheme_of(name: str) -> tuple[int, int | None]:
        hits = [g for g in groups if any(re.fullmatch(t[3:], name) for t in g["targets"])]
        assert len(hits) == 1, (name, hits)
        return hits[0]["weights"]["num_bits"], hits[0]["weights"]["group_size"]

    expected = {"model.layers.0.self_attn.q_proj": (8, 32), "model.layers.1.self_attn.q_proj": (4, 32),
                "model.layers.0.self_attn.o_proj": (4, 32), "model.layers.2.mlp.down_proj": (8, None),
                "model.layers.3.mlp.gate_proj": (4, 32)}
    tensors = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    for name, (bits, group) in expected.items():
        assert scheme_of(name) == (bits, group)
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        out_features, in_features = tensors[f"{name}.weight_shape"].tolist()
        assert packed.shape == (out_features, in_features * bits // 32)
        assert scale.shape == (out_features, 1 if group is None else in_features // group)
    assert not any(k.endswith(".weight") and "proj" in k and "layers" in k for k in tensors)
    report = report_of(out)
    assert report["check"]["passed"], report["check"]
    # bytes: the plan's estimate is what was written
    stage = report["stages"][0]
    assert stage["bytes_after"] == pytest.approx(sum(p.stat().st_size for p in out.glob("*.safetensors")), rel=0.01)


@pytest.mark.parametrize("groups, message", [
    ([{"targets": ["q_proj"], "bits": 8}], r"stages\[0\]\.groups: groups put q_proj, k_proj, v_proj of layer 0 in "
                                           r"different precisions; vLLM runs them as one matrix"),
    ([{"targets": ["dow_proj"], "bits": 8}], r"stages\[0\]\.groups: groups\[0\]: \['dow_proj'\] matches no "
                                             r"quantized Linear"),
    ([{"targets": ["re:(("], "bits": 8}], r"groups\[0\]\.targets\[0\]: 're:\(\(' is not a valid regex"),
    ([{"targets": ["down_proj"], "bits": 8, "group_size": 64}], r"stages\[0\]\.group_size: group_size 64 does not "
                                                                r"divide the input width 96 of down_proj"),
])
def test_bad_mixed_precision_groups_get_one_clear_line(tiny, tmp_path, groups, message):
    stage = {"method": "gptq", "data": "calib", "bits": 4, "group_size": 32, "groups": groups}
    with pytest.raises(RecipeError, match=message):
        recipe = parse_recipe(tiny_recipe(tmp_path, tiny("llama", intermediate_size=96), [stage]))
        prepare(recipe, Workspace(recipe.spec.output))


def test_what_vllm_cannot_load_on_this_kind_of_machine_is_said_by_a_pure_function():
    from llmslim.methods.configs.gptq import RtnConfig
    from llmslim.methods.gptq.format import QuantFormat

    def limitation(gpu: bool, **kw) -> str | None:
        return QuantFormat.of(RtnConfig(**kw)).vllm_limitation(gpu)

    mixed = {"bits": 4, "groups": [{"targets": ["down_proj"], "bits": 8}]}
    assert limitation(True, **mixed) is None and limitation(True, bits=8) is None
    assert "CPU build loads 4-bit weight-only Linears only, not 8-bit (in groups)" in limitation(False, **mixed)
    assert "not 8-bit (it serves those on GPUs)" in limitation(False, bits=8)
    w8a8 = {"bits": 8, "group_size": -1, "activation_bits": 8}
    assert limitation(False, **w8a8) is None and limitation(False, bits=4, group_size=32) is None
    assert "not 3 (in groups)" in limitation(True, bits=4, groups=[{"targets": ["down_proj"], "bits": 3}])


def test_bits_vllm_cannot_serve_in_a_group_are_refused_with_check_vllm(tiny, tmp_path):
    stage = {"method": "rtn", "bits": 4, "group_size": 32, "groups": [{"targets": ["down_proj"], "bits": 3}]}
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny("llama"), [stage], export={"check": "vllm"}))
    with pytest.raises(RecipeError, match=r"export\.check: vllm: vLLM's compressed-tensors kernels take 4 or 8 weight "
                                          r"bits, not 3 \(in groups\)"):
        prepare(recipe, Workspace(recipe.spec.output))


# ---------------------------------------------------------------- vLLM


@pytest.mark.vllm
def test_every_ptq_export_loads_in_vllm(tiny_tok, tmp_path):
    """W4 exports of awq + gptq, gptq with gptaq, autoround (full range: negative scales), and a
    mixed-precision export in one vLLM process: each loads, and where this machine has vLLM's weight-only kernel (AVX-512 CPUs, GPUs)
    generates the same greedy tokens as transformers (near-ties allowed: bf16). Mixed: 8-bit down_proj
    and 4-bit elsewhere on a GPU; on a CPU, whose vLLM loads 4-bit weight-only only, per-channel
    down_proj and g32 elsewhere (two config groups all the same)."""
    from llmslim.check import check_exports, vllm_run_for

    down = {"bits": 8, "group_size": -1} if torch.cuda.is_available() else {"bits": 4, "group_size": -1}
    w4 = {"bits": 4, "group_size": 32}
    cases = {"awq-gptq-llama": ("llama", [{"method": "awq", "data": "calib", **w4},
                                          {"method": "gptq", "data": "calib", **w4}]),
             "gptaq-qwen3": ("qwen3", [{"method": "gptq", "data": "calib", **w4, "gptaq": True}]),
             "autoround-qwen2": ("qwen2", [{"method": "autoround", "data": "calib", **w4, "iters": 2}]),
             "mixed-llama": ("llama", [{"method": "gptq", "data": "calib", **w4,
                                        "groups": [{"targets": ["down_proj"], **down}]}])}
    outs = []
    for name, (arch, stages) in cases.items():
        recipe = parse_recipe(tiny_recipe(tmp_path / name, tiny_tok(arch), stages))
        run(recipe)
        outs.append(recipe.spec.output)
    from safetensors.torch import load_file

    scales = [t for f in sorted(Path(outs[2]).glob("*.safetensors")) for k, t in load_file(f).items()
              if k.endswith("weight_scale")]
    assert any(bool((t < 0).any()) for t in scales)  # autoround's full-range grid: vLLM gets negative scales
    for out, result in zip(outs, check_exports(outs, "vllm")):
        assert result.passed, (out, result.detail)
        if vllm_run_for(out).generates:
            assert result.generated and "agrees with transformers" in result.detail, result.detail
        else:
            assert not result.generated and result.detail.startswith("vLLM loads the export"), result.detail


# ---------------------------------------------------------------- automatic mixed precision


def test_allocation_spends_the_budget_on_the_best_gain_per_bit():
    from llmslim.methods.gptq.mixed import allocate

    gains, costs = [10.0, 1.0, 6.0, 0.0, 3.0], [10, 1, 3, 1, 6]
    # gain per cost: 1.0, 1.0, 2.0, 0, 0.5 -> item 2 first, then 0 (10, fits in 14), then 1 (1), then 4 (no)
    assert allocate(gains, costs, budget=14) == [True, True, True, False, False]
    assert allocate(gains, costs, budget=2) == [False, True, False, False, False]  # 2 does not fit, 1 does
    assert allocate(gains, costs, budget=0) == [False] * 5
    assert allocate([1.0, -1.0], [1, 1], budget=10) == [True, False]  # no gain, no upgrade


def test_sensitivity_weighs_errors_by_the_inputs_second_moment():
    from llmslim.methods.gptq.mixed import sensitivity

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=gen)
    quiet, loud = torch.ones(64), torch.ones(64)
    loud[:8] = 100.0
    assert sensitivity(W, loud, 3, -1, True) > 5 * sensitivity(W, quiet, 3, -1, True)
    assert sensitivity(W, quiet, 3, -1, True) > sensitivity(W, quiet, 4, -1, True) > sensitivity(W, quiet, 8, -1, True)


def test_mixed_allocation_meets_its_budget_and_exports_what_it_chose(tiny_tok, tmp_path):
    stage = {"method": "gptq", "data": "calib", "bits": 4, "group_size": 32, "mixed": {"target_bits": 5.5}}
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_tok("llama"), [stage]))
    run(recipe)
    out = Path(recipe.spec.output)
    report = report_of(out)
    allocation = report["stages"][0]["notes"]["mixed"]
    assert 4 < allocation["average_bits"] <= 5.5 and 0 < allocation["targets_upgraded"] < allocation["targets"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    bits = sorted(g["weights"]["num_bits"] for g in config["config_groups"].values())
    assert bits[0] == 4 and bits[-1] == 8
    eight = [t for g in config["config_groups"].values() if g["weights"]["num_bits"] == 8 for t in g["targets"]]
    assert len(eight) == len(allocation["upgraded"])  # one exact pattern per upgraded Linear
    assert report["check"]["passed"], report["check"]  # every tensor shape-checked against its config group


@pytest.mark.parametrize("stage, message", [
    ({"method": "rtn", "mixed": {"target_bits": 5}}, r"mixed measures sensitivity on calibration data"),
    ({"method": "gptq", "data": "calib", "bits": 4, "mixed": {"target_bits": 9}},
     r"mixed\.target_bits 9 must lie between bits 4 and mixed\.high_bits 8"),
    ({"method": "gptq", "data": "calib", "bits": 4, "mixed": {"target_bits": 5},
      "groups": [{"targets": ["down_proj"], "bits": 8}]}, r"give either groups \(by hand\) or mixed"),
])
def test_bad_mixed_parameters_get_one_clear_line(tiny, tmp_path, stage, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tiny_recipe(tmp_path, tiny("llama"), [stage]))

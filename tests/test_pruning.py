"""prune_heads and prune_ffn on tiny models of every architecture: exact equivalence with masking, every
criterion, plan == export, clear errors, exports that vLLM serves, and the Minitron recipe."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import run_cli
from conftest import REPO
from tiny_models import build_model, sample_text
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from llmslim.adapters import Adapter
from llmslim.check import check_exports
from llmslim.checkpoint import Checkpoint
from llmslim.errors import RecipeError
from llmslim.methods import importance as imp
from llmslim.methods.prune_ffn import FfnPruner
from llmslim.methods.prune_heads import HeadPruner
from llmslim.pipeline import Workspace, prepare, run
from llmslim.plan import PlanState, make_plan
from llmslim.recipe import load_recipe, parse_recipe

# ---------------------------------------------------------------- pure cores


@pytest.mark.parametrize("width, m, expected", [
    (8191.6, 64, 8192), (8160.0, 64, 8128), (8161.0, 64, 8192), (110.08, 64, 128), (20.0, 64, 64), (0.4, 64, 64),
    (96.0, 64, 64), (127.0, 1, 127), (31.5, 16, 32)])
def test_round_to_multiple_is_nearest_halves_down_never_zero(width, m, expected):
    assert imp.round_to_multiple(width, m) == expected


def test_ratio_and_selection_cores():
    assert imp.kept_from_ratio(8, 0.5) == 4 and imp.kept_from_ratio(4, 0.125) == 3  # 3.5: halves remove more
    assert imp.kept_from_ratio(2, 0.9) == 0 and imp.kept_from_ratio(2, 0.2) == 2
    assert imp.scaled_width(128, 0.5, 16) == 64 and imp.scaled_width(40, 0.9, 64) == 40  # never grows
    assert imp.top_k(torch.tensor([0.5, 2.0, 0.5, 1.0]), 2) == [1, 3]
    assert imp.top_k(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]  # ties keep the lower index
    assert imp.query_heads([0, 2], 3) == [0, 1, 2, 6, 7, 8]
    assert imp.head_rows([1, 3], 2).tolist() == [2, 3, 6, 7]
    assert imp.group_sum(torch.arange(6.0), 3).tolist() == [1.0, 5.0, 9.0]
    means, counts = imp.window_means(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 2]), 3)
    assert means.flatten().tolist() == [2.0, 0.0, 5.0] and counts.tolist() == [2, 0, 1]
    agg = imp.Aggregate(1)
    agg.add(means, counts > 0)
    assert agg.scores().item() == pytest.approx((4 + 25) ** 0.5) and agg.windows == 2


# ---------------------------------------------------------------- tiny models through the pipeline


@pytest.fixture(scope="module")
def model_with_tokenizer(tiny_tok):
    return tiny_tok


def recipe_text(root: Path, model: Path, stages: list, **extra) -> str:
    text = root / "text.txt"
    if not text.exists():
        root.mkdir(parents=True, exist_ok=True)
        text.write_text(sample_text())
    return yaml.safe_dump({
        "model": str(model), "output": str(root / "out"), "seed": extra.pop("seed", 0),
        "data": {"calib": {"path": str(text), "fraction": [0.0, 0.5], "samples": 8, "seq_len": 64}},
        "stages": stages, "export": {"check": extra.pop("check", "transformers")}, **extra})


# (case id, arch, tiny-model options, head stage, FFN stage): every criterion on dense and MoE FFNs.
CASES = [
    ("llama", "llama", {}, {"kv_heads": 1, "criterion": "activation"},
     {"intermediate_size": 128, "criterion": "activation"}),
    ("llama-mha-tied", "llama", {"gqa": False, "tied": True}, {"ratio": 0.5, "criterion": "taylor"},
     {"ratio": 0.5, "criterion": "magnitude"}),
    ("mistral", "mistral", {}, {"kv_heads": 1, "criterion": "magnitude"},
     {"intermediate_size": 192, "criterion": "taylor"}),
    ("qwen2", "qwen2", {}, {"kv_heads": 1, "criterion": "activation"},  # exported as Llama: qwen2_as_llama
     {"ratio": 0.5, "criterion": "random"}),
    ("qwen3-tied", "qwen3", {"tied": True}, {"kv_heads": 1, "criterion": "taylor"},
     {"intermediate_size": 128, "criterion": "activation"}),
    ("mixtral", "mixtral", {}, {"kv_heads": 1, "criterion": "random"},
     {"intermediate_size": 64, "criterion": "activation"}),
    ("mixtral-mha", "mixtral", {"gqa": False}, {"ratio": 0.25, "criterion": "activation"},
     {"ratio": 0.5, "multiple_of": 32, "criterion": "random"}),
    ("qwen2_moe", "qwen2_moe", {}, None, {"ratio": 0.5, "multiple_of": 16, "criterion": "taylor"}),
    ("qwen2_moe-mha-tied", "qwen2_moe", {"gqa": False, "tied": True}, None,
     {"intermediate_size": 48, "multiple_of": 16, "criterion": "magnitude"}),
    ("qwen3_moe-mha", "qwen3_moe", {"gqa": False}, {"ratio": 0.5, "criterion": "magnitude"},
     {"ratio": 0.5, "multiple_of": 16, "criterion": "activation"}),
    ("gemma3", "gemma3", {}, {"kv_heads": 1, "criterion": "activation"},  # GeGLU, q/k norms, head_dim 64
     {"intermediate_size": 128, "criterion": "taylor"}),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def pruned(model_with_tokenizer, tmp_path_factory):
    """pruned(case id) -> (source dir, recipe text, report): each case runs once per module."""
    cache: dict = {}

    def get(case_id: str):
        if case_id not in cache:
            _, arch, kw, heads, ffn = next(c for c in CASES if c[0] == case_id)
            src = model_with_tokenizer(arch, **kw)
            stages = [{"method": "prune_heads", "data": "calib", **heads}] if heads else []
            stages.append({"method": "prune_ffn", "data": "calib", **ffn})
            text = recipe_text(tmp_path_factory.mktemp(case_id), src, stages)
            cache[case_id] = (src, text, run(parse_recipe(text)))
        return cache[case_id]

    return get


def mask(model: torch.nn.Module, heads_kept: dict | None, ffn_kept: dict | None) -> torch.nn.Module:
    """The unpruned model with the removed heads and channels zeroed: o_proj input columns of removed
    query heads, down_proj columns of removed channels (per expert, and in the shared expert)."""
    adapter = Adapter.for_config(model.config)
    shape = adapter.shape(model.config)
    group, hd = shape.heads // shape.kv_heads, shape.head_dim
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers(model)):
            if heads_kept is not None:
                q_heads = imp.query_heads(heads_kept[str(i)]["attention"], group)
                removed = [h for h in range(shape.heads) if h not in q_heads]
                layer.self_attn.o_proj.weight[:, imp.head_rows(removed, hd)] = 0
            if ffn_kept is None:
                continue
            kept = ffn_kept[str(i)]

            def zero(weight: torch.Tensor, keep: list[int]) -> None:  # weight [H, I]: zero the removed columns
                weight[:, [c for c in range(weight.shape[1]) if c not in keep]] = 0

            if "mlp" in kept:
                zero(layer.mlp.down_proj.weight, kept["mlp"])
            if "experts" in kept:
                for e, keep in enumerate(kept["experts"]):
                    zero(layer.mlp.experts.down_proj[e], keep)
            if "shared_expert" in kept:
                zero(layer.mlp.shared_expert.down_proj.weight, kept["shared_expert"])
    return model


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_pruning_equals_masking_and_matches_the_plan(pruned, case_id):
    src, _, report = pruned(case_id)
    out = Path(report["output"])
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    kept = {s["method"]: s["notes"]["kept"] for s in report["stages"]}
    reference = mask(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(),
                     kept.get("prune_heads"), kept["prune_ffn"])
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, reference(x).logits, rtol=0, atol=1e-5)
    # the plan (what `llmslim validate` prints) is what was exported
    plan, config = report["plan"][-1], exported.config
    shape = Adapter.for_config(config).shape(config)
    assert (plan["heads"], plan["kv_heads"], plan["head_dim"], plan["ffn"], plan["shared_ffn"]) == \
           (shape.heads, shape.kv_heads, shape.head_dim, shape.ffn, shape.shared_ffn)
    params = sum(p.numel() for p in exported.parameters())
    assert plan["params"] == params == report["stages"][-1]["params_after"]
    assert shape.heads % shape.kv_heads == 0
    assert shape.heads < AutoConfig.from_pretrained(src).num_attention_heads or "prune_heads" not in kept
    assert report["check"]["passed"] and "same greedy tokens" in report["check"]["detail"]
    for s in report["stages"]:
        assert ("whole model" in s["peak_note"]) == (s["notes"]["criterion"] == "taylor")


def test_moe_widths_scale_together(pruned):
    _, _, report = pruned("qwen2_moe")
    notes = report["stages"][-1]["notes"]
    assert (notes["ffn"], notes["shared_ffn"], notes["dense_ffn"]) == ("64 -> 32", "128 -> 64", "256 -> 128")
    config = AutoConfig.from_pretrained(report["output"])
    assert (config.moe_intermediate_size, config.shared_expert_intermediate_size, config.intermediate_size) == (32, 64, 128)
    kept = notes["kept"]
    assert set(kept["1"]) == {"mlp"} and set(kept["0"]) == {"experts", "shared_expert"}  # layer 1 is dense
    assert len(kept["0"]["experts"]) == 4 and all(len(k) == 32 for k in kept["0"]["experts"])


@pytest.mark.parametrize("case_id", ["llama", "qwen2_moe"])
def test_validate_prints_the_exported_parameter_count(pruned, tmp_path, case_id):
    _, text, report = pruned(case_id)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    rc, out = run_cli("validate", str(recipe))
    assert rc == 0, out
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(report["output"]).parameters())
    assert f"{params:,}" in out


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_moe", "qwen3", "mixtral", "gemma3"])
def test_head_surgery_in_memory_equals_masking(arch):
    """The surgery itself, on architectures whose exports the plan refuses (Qwen2 biases) or accepts."""
    model = build_model(arch)
    with torch.no_grad():
        for layer in model.model.layers:  # make every bias matter
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    adapter = Adapter.for_config(model.config)
    kept = {str(i): {"attention": [i % 2]} for i in range(4)}  # alternate which KV group stays
    reference = mask(copy.deepcopy(model), kept, None)
    pruner = HeadPruner(adapter, model.config, adapter.with_heads(model.config, 2, 1))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            pruner.edit(layer, kept[str(i)])
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (2 * adapter.shape(model.config).head_dim, 128)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=1e-5)


def test_expert_activation_scores_follow_the_router():
    model = build_model("mixtral")
    block = model.model.layers[0].mlp
    adapter = Adapter.for_config(model.config)
    col = FfnPruner(adapter, model.config, model.config).collector(model.model.layers[0], 0)
    x = torch.randn(3, 10, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        col.batch = (3, 10)
        block(x)
        col.remove()
        scores = col.scores()["experts"]  # [E, I]
        flat = x.reshape(30, 128)
        _, _, top = block.gate(flat)
        experts = block.experts
        for e in range(4):
            square_sum = torch.zeros(128, dtype=torch.float64)
            for w in range(3):
                rows = flat[w * 10:(w + 1) * 10][(top[w * 10:(w + 1) * 10] == e).any(-1)]
                if len(rows):
                    gate, up = (rows @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
                    square_sum += (torch.nn.functional.silu(gate) * up).abs().mean(0).double() ** 2
            torch.testing.assert_close(scores[e], square_sum.sqrt(), rtol=1e-5, atol=1e-7)
        # experts that no calibration token reaches are ranked by their weights instead (and reported)
        col = FfnPruner(adapter, model.config, model.config).collector(model.model.layers[0], 0)
        col.batch = (1, 4)
        experts(flat[:4], torch.tensor([[0, 1]] * 4), torch.full((4, 2), 0.5))
        col.remove()
        scores = col.scores()["experts"]
        magnitude = FfnPruner(adapter, model.config, model.config).weight_scores(model.model.layers[0], 0, False)
        assert col.unrouted == [2, 3] and torch.equal(scores[2:], magnitude["experts"][2:])
        assert not torch.equal(scores[:2], magnitude["experts"][:2])


def kill_structure(path: Path, moe: bool) -> None:
    """Zero every weight of KV group 1 (with its query heads) and of FFN channels 0..half-1 in layer 0."""
    model = AutoModelForCausalLM.from_pretrained(path)
    attn = model.model.layers[0].self_attn
    shape = Adapter.for_config(model.config).shape(model.config)
    group, hd = shape.heads // shape.kv_heads, shape.head_dim
    q_rows, kv_rows = imp.head_rows(imp.query_heads([1], group), hd), imp.head_rows([1], hd)
    with torch.no_grad():
        attn.q_proj.weight[q_rows] = 0
        attn.k_proj.weight[kv_rows] = 0
        attn.v_proj.weight[kv_rows] = 0
        attn.o_proj.weight[:, q_rows] = 0
        if moe:
            experts = model.model.layers[0].mlp.experts
            width = experts.down_proj.shape[2]
            experts.gate_up_proj[:, : width // 2] = 0
            experts.gate_up_proj[:, width: width + width // 2] = 0
            experts.down_proj[:, :, : width // 2] = 0
        else:
            mlp = model.model.layers[0].mlp
            width = mlp.down_proj.weight.shape[1]
            mlp.gate_proj.weight[: width // 2] = 0
            mlp.up_proj.weight[: width // 2] = 0
            mlp.down_proj.weight[:, : width // 2] = 0
    model.save_pretrained(path)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("criterion", ["activation", "magnitude", "taylor"])
def test_criteria_remove_dead_heads_and_channels(model_with_tokenizer, tmp_path, arch, criterion):
    src = tmp_path / "model"
    shutil.copytree(model_with_tokenizer(arch), src)
    kill_structure(src, moe=arch == "mixtral")
    half = 128 if arch == "llama" else 64
    stages = [{"method": "prune_heads", "kv_heads": 1, "criterion": criterion, "data": "calib"},
              {"method": "prune_ffn", "intermediate_size": half, "criterion": criterion, "data": "calib"}]
    report = run(parse_recipe(recipe_text(tmp_path, src, stages, check="none")))
    heads, ffn = (s["notes"]["kept"]["0"] for s in report["stages"])
    assert heads["attention"] == [0]
    want = list(range(half, 2 * half))
    assert ffn["mlp"] == want if arch == "llama" else all(k == want for k in ffn["experts"])


def test_random_criterion_follows_the_recipe_seed(model_with_tokenizer, tmp_path):
    def kept(seed: int, root: Path) -> list:
        stages = [{"method": "prune_ffn", "intermediate_size": 128, "criterion": "random"}]
        report = run(parse_recipe(recipe_text(root, model_with_tokenizer("llama"), stages, seed=seed, check="none")))
        return [report["stages"][0]["notes"]["kept"][str(i)]["mlp"] for i in range(4)]

    a, b, c = (kept(s, tmp_path / n) for s, n in ((1, "a"), (1, "b"), (2, "c")))
    assert a == b and a != c and a[0] != a[1]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("arch, stage, message", [
    ("llama", {"method": "prune_heads", "kv_heads": 2, "criterion": "magnitude"},
     r"stages\[0\]\.kv_heads: the model has 2 KV heads per layer; kv_heads must be fewer \(1-1\)"),
    ("llama", {"method": "prune_heads", "kv_heads": 5, "criterion": "magnitude"}, r"kv_heads must be fewer"),
    ("llama", {"method": "prune_heads", "ratio": 0.9, "criterion": "magnitude"},
     r"stages\[0\]\.ratio: ratio 0.9 would remove all 2 KV heads"),
    ("llama", {"method": "prune_heads", "ratio": 0.2, "criterion": "magnitude"},
     r"ratio 0.2 removes no head: heads go in groups of 2 query heads per KV head"),
    ("llama", {"method": "prune_ffn", "intermediate_size": 300, "criterion": "magnitude"},
     r"stages\[0\]\.intermediate_size: the FFN width is 256; intermediate_size must be smaller"),
    ("llama", {"method": "prune_ffn", "intermediate_size": 100, "criterion": "magnitude"},
     r"100 is not a multiple of multiple_of \(64\): use 64 or 128, or lower multiple_of"),
    ("llama", {"method": "prune_ffn", "ratio": 0.1, "criterion": "magnitude"},
     r"ratio 0.1 of the FFN width 256 gives 230.4, which rounds to 256 with multiple_of 64: nothing would be removed"),
    ("qwen2_moe", {"method": "prune_heads", "ratio": 0.5, "criterion": "magnitude"},
     r"stages\[0\]\.ratio: qwen2_moe models cannot lose heads: vLLM derives their head_dim as hidden_size / "
     r"num_attention_heads \(128 / 2 after pruning\).*no other MoE architecture"),
    ("qwen2_moe", {"method": "prune_ffn", "intermediate_size": 32, "criterion": "magnitude"},
     r"32 is not a multiple of multiple_of \(64\), or lower multiple_of"),
])
def test_impossible_targets_are_refused_by_the_plan(tiny, tmp_path, arch, stage, message):
    recipe = parse_recipe(recipe_text(tmp_path, tiny(arch), [stage]))
    with pytest.raises(RecipeError, match=message):
        prepare(recipe, Workspace(recipe.spec.output))


def test_sliding_window_qwen2_cannot_lose_heads(tmp_path):
    from tiny_models import save_tiny

    src = save_tiny("qwen2", tmp_path / "m", use_sliding_window=True, sliding_window=64,
                    layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"])
    recipe = parse_recipe(recipe_text(tmp_path, src, [{"method": "prune_heads", "kv_heads": 1,
                                                       "criterion": "magnitude"}]))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.kv_heads: this Qwen2 model uses sliding-window attention"):
        prepare(recipe, Workspace(recipe.spec.output))


def test_head_pruned_qwen2_is_exported_as_llama_with_its_tokenizer(pruned):
    """Qwen2 with q/k/v biases, untied head, head_dim 32, kv_heads 2 -> 1: a LlamaForCausalLM whose o_proj
    bias is zero, same tokenizer files (logits: test_pruning_equals_masking...; vLLM: the vLLM test)."""
    src, _, report = pruned("qwen2")
    out = Path(report["output"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["attention_bias"] is True and config["head_dim"] == 32 and config["num_key_value_heads"] == 1
    assert config["tie_word_embeddings"] is False
    notes = report["stages"][0]["notes"]
    assert notes["architecture"].startswith("Qwen2ForCausalLM -> LlamaForCausalLM: vLLM's Qwen2 derives head_dim")
    ckpt = Checkpoint(out)
    biases = ckpt.read([n for n in ckpt.names if n.endswith("o_proj.bias")])
    assert len(biases) == 4 and all(not b.any() for b in biases.values())
    q_bias = ckpt.read(["model.layers.0.self_attn.q_proj.bias"])["model.layers.0.self_attn.q_proj.bias"]
    assert q_bias.shape == (64,) and q_bias.abs().sum() > 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("stage, message", [
    ({"method": "prune_heads", "kv_heads": [1, 2, 1, 2]},
     r"stages\[0\]\.kv_heads: per-layer \(non-uniform\) head counts are not supported: vLLM and transformers"),
    ({"method": "prune_ffn", "intermediate_size": {0: 128, 1: 64}},
     r"stages\[0\]\.intermediate_size: per-layer \(non-uniform\) FFN widths are not supported"),
    ({"method": "prune_heads", "kv_heads": 1, "ratio": 0.5, "data": "calib"}, r"give exactly one of 'kv_heads'"),
    ({"method": "prune_ffn", "criterion": "magnitude"}, r"give exactly one of 'intermediate_size'"),
    ({"method": "prune_ffn", "ratio": 0.5}, r"criterion 'activation' measures the model on text: set 'data'"),
    ({"method": "prune_heads", "kv_heads": 1, "criterion": "taylor"}, r"criterion 'taylor' measures the model"),
    ({"method": "prune_ffn", "ratio": 1.5, "criterion": "random"}, r"stages\[0\]\.ratio: input should be less than 1"),
])
def test_bad_parameters_are_refused_with_a_clear_message(tiny, tmp_path, stage, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe_text(tmp_path, tiny("llama"), [stage]))


# ---------------------------------------------------------------- vLLM


@pytest.mark.vllm
def test_pruned_exports_serve_in_vllm_with_the_same_tokens(pruned):
    dirs = [pruned(case)[2]["output"] for case in ("llama", "qwen2", "qwen3-tied", "mixtral")]
    for d, r in zip(dirs, check_exports(dirs, "vllm")):
        assert r.passed and r.generated, f"{d}: {r.detail}"
        assert "agree on 4 x 32 greedy tokens" in r.detail


# ---------------------------------------------------------------- the Minitron recipe

MINITRON = REPO / "recipes" / "minitron-llama-3.1-8b.yaml"
# Llama-3.1-8B's shape, and a stand-in with the same heads, KV heads and FFN/hidden ratio (3.5).
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=False)
STAND_IN = dict(LLAMA_8B, vocab_size=512, hidden_size=256, intermediate_size=896, num_hidden_layers=2, head_dim=8,
                max_position_embeddings=4096)


def test_minitron_recipe_plans_llama_8b_to_about_5b(tmp_path):
    recipe = load_recipe(MINITRON, [f"output={tmp_path / 'out'}"])
    config = LlamaConfig(**LLAMA_8B)
    state = PlanState(config, Adapter.for_config(config), torch.bfloat16)
    rows, _ = make_plan(recipe, state)
    first, last = rows[0], rows[-1]
    assert 8.0e9 < first.params < 8.1e9
    assert (last.shape.hidden, last.shape.heads, last.shape.kv_heads, last.shape.ffn) == (4096, 16, 4, 8192)
    assert 4.9e9 < last.params < 5.0e9


def test_minitron_recipe_validates_offline_on_a_stand_in(tmp_path):
    model = tmp_path / "stand-in"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**STAND_IN)).save_pretrained(model)
    overrides = [f"model={model}", f"output={tmp_path / 'out'}"]
    recipe = load_recipe(MINITRON, overrides)
    rows = prepare(recipe, Workspace(recipe.spec.output))[3]
    s = rows[-1].shape
    assert (s.hidden, s.heads, s.kv_heads, s.ffn) == (256, 16, 4, 512)  # same cuts as on the 8B model
    rc, out = run_cli("validate", str(MINITRON), *[a for o in overrides for a in ("--set", o)],
                      env={"HF_HUB_OFFLINE": "1"})
    assert rc == 0, out
    assert "valid, 3 stage(s)" in out

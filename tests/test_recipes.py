"""The real-model recipes in recipes/: each validates offline against a tiny stand-in of its architecture
(`llmslim validate --stand-in`, planned on the real config bundled in llmslim/assets/configs), their
real-shape plans match hand arithmetic, and the cheap ones run end to end on a stand-in with local text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import run_cli
from conftest import REPO
from tiny_models import add_tokenizer, sample_text

from llmslim.loading import looks_like_hub_id
from llmslim.recipe import load_recipe
from llmslim.standin import (
    bundled_config,
    find_config,
    load_config,
    real_plan,
    save_stand_in,
    stand_in_config,
)

RECIPES = REPO / "recipes"
# recipes that name a Hub model (the others name a directory on this disk: tests/test_docs.py plans them)
HUB_RECIPES = sorted(p for p in RECIPES.glob("*.yaml")
                     if looks_like_hub_id(m := yaml.safe_load(p.read_text())["model"]) and not (REPO / m).exists())
ISSUE_RECIPES = ["minitron-llama-3.1-8b.yaml", "qwen3-8b-gptq-w4a16.yaml", "llama-3.1-8b-w8a8-cpu.yaml",
                 "mixtral-8x7b-experts-6-gptq-w4.yaml", "qwen3-30b-a3b-prune-experts.yaml",
                 "llama-3.2-1b-moefy.yaml", "qwen3-1.7b-qat-w4.yaml"]
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def test_the_library_holds_every_recipe_with_a_header():
    assert sorted(p.name for p in HUB_RECIPES) == sorted(ISSUE_RECIPES) == sorted(CHEAP)  # each runs on a stand-in
    for name in ISSUE_RECIPES:
        text = (RECIPES / name).read_text()
        header = text.split("\nmodel:", 1)[0]
        for part in ("llmslim run recipes/" + name, "Hardware", "Time (estimate)", "Expect (estimate)"):
            assert part in header, f"{name}: header lacks {part!r}"
        assert bundled_config(yaml.safe_load(text)["model"]).is_file(), f"{name}: no bundled config"


@pytest.mark.parametrize("path", HUB_RECIPES, ids=lambda p: p.name)
def test_recipe_validates_offline_on_a_stand_in(path, tmp_path):
    """The real CLI, offline, with an empty Hugging Face cache: the bundled config gives the real plan."""
    rc, out = run_cli("validate", str(path), "--stand-in", "--quiet", cwd=REPO,
                      env={**OFFLINE, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "COLUMNS": "200"})
    assert rc == 0, out
    recipe = load_recipe(path)
    config = load_config(bundled_config(recipe.spec.model))
    rows = real_plan(recipe, config)
    assert f"valid on a stand-in of {config.model_type}" in out and f"{len(recipe.stages)} stage(s)" in out
    assert "bundled with llmslim" in out
    assert f"{rows[0].params:,}" in out and f"{rows[-1].params:,}" in out  # the real model's numbers


def test_validate_stand_in_names_the_options_when_no_config_is_found(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: nobody/no-such-model\noutput: out\nstages: [{method: rtn, bits: 4}]\n")
    rc, out = run_cli("validate", str(recipe), "--stand-in", env={**OFFLINE, "HF_HUB_CACHE": str(tmp_path / "c")})
    assert rc == 2, out
    assert "model: nobody/no-such-model: no config.json found" in out and "huggingface-cli download" in out
    assert "Traceback" not in out


def test_a_local_config_comes_before_the_bundled_one(tmp_path):
    (tmp_path / "config.json").write_text(bundled_config("Qwen/Qwen3-1.7B").read_text())
    assert find_config(str(tmp_path), None) == (tmp_path / "config.json", "local directory")


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B", "Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B",
                                   "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B", "meta-llama/Llama-3.2-1B"])
def test_stand_in_keeps_the_architecture(model):
    real = load_config(bundled_config(model))
    small = stand_in_config(real)
    assert (small.model_type, type(small)) == (real.model_type, type(real))
    assert small.num_attention_heads // small.num_key_value_heads == real.num_attention_heads // real.num_key_value_heads
    assert small.head_dim == 32 and small.num_hidden_layers == 2 and small.vocab_size == 512
    for field in ("num_local_experts", "num_experts", "num_experts_per_tok", "tie_word_embeddings"):
        assert getattr(small, field, None) == getattr(real, field, None), field
    width = "moe_intermediate_size" if hasattr(real, "moe_intermediate_size") else "intermediate_size"
    ratio = getattr(real, width) / real.hidden_size
    assert abs(getattr(small, width) / small.hidden_size - ratio) <= 64 / small.hidden_size  # one rounding step
    assert getattr(small, width) % 128 == 0  # group-128 quantization plans on the stand-in as on the model


def _moe_params(vocab, hidden, layers, heads, kv, head_dim, experts, ffn, qk_norm=False):
    """Hand count of an untied MoE model: embeddings + lm_head, then per layer attention, router, experts
    (gate, up, down) and two norms, plus the final norm."""
    attention = 2 * heads * head_dim * hidden + 2 * kv * head_dim * hidden + (2 * head_dim if qk_norm else 0)
    per_layer = attention + experts * hidden + experts * 3 * hidden * ffn + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def test_expert_pruning_plans_match_hand_arithmetic():
    mixtral = real_plan(load_recipe(RECIPES / "mixtral-8x7b-experts-6-gptq-w4.yaml"),
                        load_config(bundled_config("mistralai/Mixtral-8x7B-v0.1")))
    assert mixtral[0].params == _moe_params(32000, 4096, 32, 32, 8, 128, 8, 14336) == 46_702_792_704
    assert mixtral[1].params == _moe_params(32000, 4096, 32, 32, 8, 128, 6, 14336) == 35_428_241_408
    assert mixtral[1].shape.experts == 6 and mixtral[1].shape.top_k == 2
    assert mixtral[2].bytes < 0.21 * mixtral[0].bytes  # W4 g128: 4 bits + a bf16 scale per 128 weights
    qwen = real_plan(load_recipe(RECIPES / "qwen3-30b-a3b-prune-experts.yaml"),
                     load_config(bundled_config("Qwen/Qwen3-30B-A3B")))
    assert qwen[0].params == _moe_params(151936, 2048, 48, 32, 4, 128, 128, 768, qk_norm=True) == 30_532_122_624
    assert qwen[1].params == _moe_params(151936, 2048, 48, 32, 4, 128, 96, 768, qk_norm=True) == 23_281_219_584
    assert qwen[1].bytes == 2 * qwen[1].params  # bf16, no quantization


def test_gptq_w4a16_plan_matches_hand_arithmetic():
    rows = real_plan(load_recipe(RECIPES / "qwen3-8b-gptq-w4a16.yaml"), load_config(bundled_config("Qwen/Qwen3-8B")))
    linear = 36 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 12288)  # q, o, k, v, gate, up, down
    assert rows[0].params == 8_190_735_360 and rows[0].bytes == 2 * rows[0].params
    # int4 weights (half a byte) + one bf16 scale per group of 128; everything else stays bf16
    expected = linear // 2 + linear // 128 * 2 + 2 * (rows[0].params - linear)
    assert abs(rows[1].bytes - expected) < 1e-4 * expected, (rows[1].bytes, expected)


# ---------------------------------------------------------------- end to end on stand-ins


def _stand_in(model_id: str, path: Path) -> Path:
    """A stand-in of `model_id` (float32: quick on any CPU) with a small tokenizer."""
    save_stand_in(stand_in_config(load_config(bundled_config(model_id))), path, torch.float32)
    return add_tokenizer(path)


# per recipe: --set overrides that shorten it (the data sources are replaced by local text below). Mixtral
# covers expert pruning and GPTQ (of MoE experts) in one run; the dense GPTQ recipe is the same stage.
def one_step(stage: int) -> list[str]:
    """Overrides that shrink a training stage to one small step (the stand-in run checks the plumbing)."""
    return [f"stages.{stage}.{k}={v}" for k, v in (("steps", 1), ("warmup", 0), ("batch_size", 2), ("grad_accum", 1),
                                                    ("save_every", 1), ("eval_every", 1))]


# Every recipe, with the overrides that make its stand-in run take seconds.
CHEAP = {
    "mixtral-8x7b-experts-6-gptq-w4.yaml": [],
    "llama-3.2-1b-moefy.yaml": ["stages.0.tokens=256", *one_step(1)],
    "qwen3-8b-gptq-w4a16.yaml": [],
    "llama-3.1-8b-w8a8-cpu.yaml": [],
    "qwen3-30b-a3b-prune-experts.yaml": [],
    "minitron-llama-3.1-8b.yaml": one_step(2),
    "qwen3-1.7b-qat-w4.yaml": one_step(0),
}
QUANTIZING = {"gptq", "rtn", "awq", "autoround", "qat"}


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_cheap_recipe_runs_end_to_end_on_a_stand_in(name, tmp_path):
    recipe = load_recipe(RECIPES / name)
    model = _stand_in(recipe.spec.model, tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(sample_text(600))
    local = {"calib": f"{{path: {text}, fraction: [0.0, 0.5], samples: 4, seq_len: 64}}",
             "train": f"{{path: {text}, fraction: [0.0, 0.5], seq_len: 64}}",
             "wiki": f"{{path: {text}, fraction: [0.5, 1.0], samples: 2, seq_len: 64}}"}
    sets = [f"model={model}", f"output={tmp_path / 'out'}", "dtype=float32", "export.check=transformers",
            *(f"data.{n}={local[n]}" for n in recipe.spec.data), *CHEAP[name]]
    rc, out = run_cli("run", str(RECIPES / name), "--quiet", *[a for s in sets for a in ("--set", s)],
                      env=OFFLINE, cwd=REPO)
    assert rc == 0, out
    report = json.loads((tmp_path / "out" / "llmslim_report.json").read_text())
    assert report["check"]["passed"] and [s["method"] for s in report["stages"]] == [s.method for s in recipe.stages]
    assert report["eval"]["after"]["perplexity"]["wiki"]["ppl"] > 1
    # the export is what the stand-in's plan promised
    stand_in = load_recipe(RECIPES / name, [f"model={model}", f"output={tmp_path / 'o2'}", "dtype=float32"])
    rows = real_plan(stand_in, load_config(model / "config.json"))
    assert report["size"]["after"]["params"] == rows[-1].params
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    s = rows[-1].shape
    assert config.get("num_local_experts", config.get("num_experts")) == (s.experts or None)
    assert ("quantization_config" in config) == any(st.method in QUANTIZING for st in recipe.stages)

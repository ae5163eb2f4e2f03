"""A real LLM end to end: SmolLM2-135M-Instruct (converted from its GGUF wheel) through a short recipe, drop
two layers then GPTQ W4 g64 on a few WikiText-2 windows, exported, and served by vLLM with the same greedy
tokens as transformers. Where vLLM has no W4A16 kernel (CPUs without AVX-512, llmslim.cpu) the recipe stops
after the layer drop, whose float32 export vLLM serves exactly on every CPU."""

from __future__ import annotations

import json

import pytest
import yaml
from cli_runner import run_cli
from conftest import SHARED, need

from llmslim import cpu

WIKI_VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
pytestmark = pytest.mark.vllm


def test_a_real_model_recipe_is_exported_and_served_by_vllm(smollm2, tmp_path):
    need(WIKI_VALID)
    w4 = cpu.vllm_cpu_run("weight_only", cpu.detect())
    stages = [{"method": "drop_layers", "count": 2, "criterion": "block_influence", "data": "calib"}]
    if w4.generates:
        stages.append({"method": "gptq", "bits": 4, "group_size": 64, "data": "calib"})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(smollm2), "output": str(tmp_path / "out"),
        "data": {"calib": {"path": str(WIKI_VALID), "samples": 4, "seq_len": 128}},
        "stages": stages, "export": {"check": "vllm"}}))
    rc, out = run_cli("run", str(recipe), "--quiet", timeout=1800)  # about 5 CPU-minutes; slower on a busy machine
    assert rc == 0, out[-3000:]
    report = json.loads((tmp_path / "out" / "llmslim_report.json").read_text())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 28
    assert ("quantization_config" in config) == w4.generates
    check = report["check"]
    assert check["passed"] and check["backend"] == "vllm", check
    assert "vLLM" in check["detail"] and "cannot be compared" not in check["detail"], check

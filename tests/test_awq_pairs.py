"""awq searches its scales on exactly the grid the following quantizer rounds to: grid fields it leaves out
are taken from that stage at parsing (autoround's full-range grid included), and a pair whose grids differ
in any field (bits, group size, symmetry, observer, per-channel fallback, full range, ignore) or whose
second stage mixes precisions is refused in one line naming the field and what to set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_recipe

from llmslim.errors import RecipeError
from llmslim.methods import autoround, awq
from llmslim.methods.configs.gptq import Grid
from llmslim.methods.gptq.core import rtn_quantize
from llmslim.pipeline import Workspace, prepare, run
from llmslim.recipe import parse_recipe

AWQ = {"method": "awq", "data": "calib"}


def planned(tiny, tmp_path: Path, stages: list) -> list:
    """The stage configs of a recipe on a tiny Llama, after parsing and planning."""
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny("llama"), stages))
    prepare(recipe, Workspace(recipe.spec.output))
    return [s.config for s in recipe.stages]


@pytest.mark.parametrize("following", [
    {"method": "autoround", "data": "calib", "bits": 3, "group_size": 32},  # full range by default
    {"method": "autoround", "data": "calib", "bits": 4, "group_size": -1, "full_range": False},
    {"method": "gptq", "data": "calib", "bits": 4, "group_size": 32, "observer": "mse", "ignore": ["lm_head", "down_proj"]},
    {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": False, "per_channel_fallback": True},
])
def test_awq_takes_the_grid_of_the_stage_that_follows(tiny, tmp_path, following):
    awq_cfg, next_cfg = planned(tiny, tmp_path, [AWQ, following])
    assert Grid.of(awq_cfg) == Grid.of(next_cfg)
    assert awq_cfg.full_range == following.get("full_range", following["method"] == "autoround")


@pytest.mark.parametrize("given, following, message", [
    ({"full_range": False}, {"method": "autoround", "data": "calib", "group_size": 32},
     r"stages\[1\]\.full_range: the awq stage before searched its scales with full_range false; this stage rounds "
     r"with full_range true: set full_range: true on the awq stage \(or full_range: false on this one\)"),
    ({"full_range": True}, {"method": "gptq", "data": "calib", "group_size": 32},
     r"stages\[1\]\.full_range: .* with full_range true; this stage rounds with full_range false: set full_range: "
     r"false on the awq stage$"),
    ({"observer": "mse"}, {"method": "autoround", "data": "calib", "group_size": 32},
     r"stages\[1\]\.observer: .* with observer mse; this stage rounds with observer minmax: set observer: minmax "
     r"on the awq stage, or leave it out there: awq takes the following stage's"),
    ({"observer": "minmax"}, {"method": "rtn", "group_size": 32, "observer": "mse"},
     r"stages\[1\]\.observer: .* with observer minmax; this stage rounds with observer mse"),
    ({"per_channel_fallback": False}, {"method": "rtn", "group_size": 32, "per_channel_fallback": True},
     r"stages\[1\]\.per_channel_fallback: .* with per_channel_fallback false; this stage rounds with "
     r"per_channel_fallback true"),
    ({"group_size": 32}, {"method": "gptq", "data": "calib", "group_size": 32, "groups": [{"targets": ["down_proj"], "bits": 8}]},
     r"stages\[1\]\.groups: the awq stage before searched its scales on one grid \(bits 4, group_size 32\) for "
     r"every Linear; groups \(mixed precision by hand\) gives some Linears another: drop awq or groups"),
    ({"group_size": 32}, {"method": "gptq", "data": "calib", "group_size": 32, "mixed": {"target_bits": 5}},
     r"stages\[1\]\.mixed: .* mixed \(automatic mixed precision\) gives some Linears another"),
])
def test_awq_pairs_whose_grids_differ_are_refused(tiny, tmp_path, given, following, message):
    with pytest.raises(RecipeError, match=message):
        planned(tiny, tmp_path, [{**AWQ, **given}, following])


@pytest.mark.parametrize("bits, group", [(4, 32), (3, -1), (2, 32)])
def test_awq_searches_on_autorounds_exact_start(tiny, tmp_path, bits, group):
    """Before autoround (full range by default), awq's search rounds every candidate exactly as autoround's
    start does (its RTN on the full-range grid), not on gptq/rtn's grid."""
    cfg = planned(tiny, tmp_path, [AWQ, {"method": "autoround", "data": "calib", "bits": bits, "group_size": group}])[0]
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    start = autoround.final_weights(W, autoround.Rounding.start(W, group), bits=bits, group_size=group,
                                    symmetric=True, scale_dtype=torch.float32, full_range=True).weight
    searched = awq.grid_quantizer(cfg, group)(W)
    assert torch.equal(searched, start)
    assert not torch.equal(searched, rtn_quantize(W, bits=bits, group_size=group, symmetric=True).weight)
    # and before gptq mse: its observer's grid
    cfg = planned(tiny, tmp_path / "mse", [AWQ, {"method": "gptq", "data": "calib", "bits": bits, "group_size": group,
                                                "observer": "mse"}])[0]
    mse = rtn_quantize(W, bits=bits, group_size=group, symmetric=True, observer="mse").weight
    assert torch.equal(awq.grid_quantizer(cfg, group)(W), mse)


def test_awq_then_autoround_runs_on_the_full_range_grid(tiny_tok, tmp_path):
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny_tok("llama"), [
        AWQ, {"method": "autoround", "data": "calib", "bits": 4, "group_size": 32, "iters": 2}]))
    run(recipe)
    report = json.loads((Path(recipe.spec.output) / "llmslim_report.json").read_text())
    assert report["stages"][0]["notes"]["grid"] == "W4 g32 full range minmax"
    assert recipe.as_dict()["stages"][0]["full_range"] is True  # what is hashed and recorded: the completed config

"""sparsegpt and wanda: the cores against direct references (one-weight OBS update, Wanda's score by definition,
N:M masks exact per group, SparseGPT's reconstruction error below magnitude pruning and Wanda's, OWL's outlier
ratio and layer profile), tiny-model runs (the sparsity counted in the export, per layer under OWL, the zeros kept
through gptq and through training: distill with all weights or LoRA, qat), the recipes refused before anything
runs, and a run killed mid-stage that resumes to the same export with the same OWL profile."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import load_file
from test_pipeline import make_recipe
from tiny_models import add_tokenizer, save_tiny

from llmslim.methods.sparsity.core import (
    magnitude_prune,
    outlier_ratio,
    owl_sparsities,
    select_mask,
    sparsegpt_prune,
    wanda_prune,
    wanda_scores,
)


def _problem(seed: int, out: int = 32, n_in: int = 64, tokens: int = 600) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """W [out, in], inputs X [tokens, in] with slightly correlated channels of scales 0.1..10 (in random order),
    and H = 2XᵀX/n."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, n_in, dtype=torch.float64)[torch.randperm(n_in, generator=g)]
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) * scales
    x = x @ (torch.eye(n_in, dtype=torch.float64) + 0.05 * torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    w = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    return w, x, 2 * x.T @ x / tokens


def _output_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm((w - pruned) @ x.T))  # ||(W - Ŵ) Xᵀ||_F


# ---------------------------------------------------------------- the pure cores


@pytest.mark.parametrize("q", [0, 17])
def test_sparsegpt_one_weight_is_the_closed_form_obs_update(q):
    """Zeroing column q of every row, the columns before it fixed: w - w_q / [H_F⁻¹]_qq · [H_F⁻¹]_q,: over the
    columns F = q.. still free (for q = 0, the whole H⁻¹: the textbook OBS update)."""
    w, _, h = _problem(0)
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[:, q] = True
    res = sparsegpt_prune(w, h, 0.0, mask=mask, dampening=0.0, block_size=8)
    hinv = torch.linalg.inv(h[q:, q:])
    want = w.clone()
    want[:, q:] -= (w[:, q:q + 1] / hinv[0, 0]) * hinv[0:1, :]
    torch.testing.assert_close(res.weight, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(res.mask, mask) and (res.weight[:, q] == 0).all()
    # and the loss it reports is that of the closed form, w_q² / [H_F⁻¹]_qq summed over the rows
    assert res.loss == pytest.approx(float((w[:, q] ** 2).sum() / hinv[0, 0]), rel=1e-8)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(nm):
    w, x, h = _problem(1)
    sg = sparsegpt_prune(w, h, 0.5, nm, block_size=16, dampening=0.0)
    wd = wanda_prune(w, h.diagonal(), 0.5, nm)
    mg = magnitude_prune(w, 0.5, nm)
    for res in (sg, wd, mg):
        assert int(res.mask.sum()) == w.numel() // 2 and torch.equal(res.weight == 0, res.mask)
    e_sg, e_wd, e_mg = (_output_error(w, r.weight, x) for r in (sg, wd, mg))
    assert e_sg < 0.8 * e_wd and e_wd < e_mg, (e_sg, e_wd, e_mg)
    assert sg.loss == pytest.approx(_output_error(w, sg.weight, x) ** 2 * 2 / x.shape[0], rel=1e-8)
    # float32 weights give the same masks up to float rounding, and exact zeros
    sg32 = sparsegpt_prune(w.float(), h.float(), 0.5, nm, block_size=16, dampening=0.0)
    assert sg32.weight.dtype == torch.float32 and torch.equal(sg32.weight == 0, sg32.mask)
    assert (sg32.mask != sg.mask).float().mean() < 0.02


def test_wanda_scores_and_masks_by_definition():
    w, x, h = _problem(2)
    norms = (x ** 2).sum(0)  # ||X_j||²
    scores = wanda_scores(w, norms)
    torch.testing.assert_close(scores, w.abs() * x.norm(dim=0)[None, :])
    res = wanda_prune(w, norms, 0.25)
    for i in range(w.shape[0]):  # per output row, the 16 lowest of 64
        lowest = set(torch.argsort(scores[i])[:16].tolist())
        assert set(res.mask[i].nonzero().squeeze(1).tolist()) == lowest
    # the diagonal of H ranks the same (a positive multiple of the squared norms)
    assert torch.equal(wanda_prune(w, h.diagonal(), 0.25).mask, res.mask)
    assert torch.equal(res.weight, w.masked_fill(res.mask, 0))


@pytest.mark.parametrize("prune", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_n_m_masks_are_exact_in_every_group(prune, nm):
    w, _, h = _problem(3)
    res = sparsegpt_prune(w, h, 0.0, nm, block_size=20) if prune == "sparsegpt" else wanda_prune(w, h.diagonal(), 0, nm)
    n, m = nm
    zeros = (res.weight == 0).reshape(w.shape[0], -1, m).sum(-1)
    assert (zeros == n).all() and torch.equal(res.weight == 0, res.mask)
    if prune == "wanda":  # the N lowest scores of each group
        groups = wanda_scores(w, h.diagonal()).reshape(w.shape[0], -1, m)
        kept = groups.masked_fill(res.mask.reshape(groups.shape), float("inf")).amin(-1)
        dropped = groups.masked_fill(~res.mask.reshape(groups.shape), float("-inf")).amax(-1)
        assert (dropped <= kept).all()


def test_select_mask_and_cores_refuse_bad_input():
    w, _, h = _problem(4, n_in=30)
    with pytest.raises(ValueError, match="input width 30 is not divisible by 4"):
        sparsegpt_prune(w, h, 0.5, (2, 4))
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        wanda_prune(w, h.diagonal(), 1.0)
    assert int(select_mask(torch.rand(3, 30), 0.0).sum()) == 0


def test_outlier_ratio_by_definition():
    """The share of the layer's scores above M x their mean, the mean taken over all its Linears together."""
    a, b = torch.ones(2, 4), torch.ones(1, 4)
    b[0, 0] = 30.0  # scores with unit norms: eleven 1s, one 30 -> mean 41/12 ~ 3.42
    norms = torch.ones(4)
    assert outlier_ratio([(a, norms), (b, norms)], 5.0) == pytest.approx(1 / 12)  # 30 > 17.1: one of 12
    assert outlier_ratio([(a, norms), (b, norms)], 10.0) == 0.0  # 30 < 34.2
    # the input norms weigh in: column 3's input 100x louder (norm² 1e4) makes its weights the outliers
    loud = torch.tensor([1.0, 1.0, 1.0, 1e4])
    assert outlier_ratio([(a, loud), (torch.ones(1, 4), loud)], 2.0) == pytest.approx(3 / 12)


def test_owl_profile_bounds_weighted_mean_and_order():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 40, (1,), generator=g))
        ratios = (torch.rand(n, generator=g) * 0.05).tolist()
        weights = torch.randint(1, 10**6, (n,), generator=g).tolist()
        target, lam = 0.3 + 0.4 * float(torch.rand(1, generator=g)), 0.1 * float(torch.rand(1, generator=g))
        s = owl_sparsities(ratios, weights, target, lam)
        assert all(target - lam - 1e-12 <= v <= target + lam + 1e-12 for v in s)
        assert max(abs(v - target) for v in s) == pytest.approx(lam)  # the farthest layer: exactly lambda away
        assert sum(v * w for v, w in zip(s, weights)) / sum(weights) == pytest.approx(target, abs=1e-12)
        order = sorted(range(n), key=lambda i: ratios[i])  # more outliers -> lower sparsity
        assert all(s[i] >= s[j] for i, j in zip(order, order[1:]))
    # a big layer counts more: the weighted mean, not the plain one, is the target
    s = owl_sparsities([0.01, 0.02, 0.03, 0.05], [10, 10, 10, 30], 0.5, 0.08)
    assert s == pytest.approx([0.58, 0.548, 0.516, 0.452]) and sum(s) / 4 != pytest.approx(0.5)
    assert owl_sparsities([0.02] * 3, [5, 6, 7], 0.5, 0.08) == [0.5] * 3  # no difference: uniform
    # a layer with nothing to prune takes no part and gets the target
    assert owl_sparsities([0.9, 0.01, 0.03], [0, 1, 1], 0.5, 0.1) == pytest.approx([0.5, 0.6, 0.4])


# ---------------------------------------------------------------- a tiny model


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _exported_linears(out: Path, suffixes: tuple[str, ...] = LINEARS) -> dict[str, torch.Tensor]:
    """The decoder Linears' weights of an export, decompressed by our own reference decoder if quantized."""
    from llmslim.formats.compressed import densify

    tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    qconfig = json.loads((out / "config.json").read_text()).get("quantization_config")
    if qconfig:
        tensors = densify(tensors, qconfig, torch.float32)
    return {k: t for k, t in tensors.items()
            if k.startswith("model.layers.") and k.endswith(".weight") and k[:-7].endswith(suffixes)}


def _count_zeros(out: Path, suffixes: tuple[str, ...] = LINEARS) -> tuple[int, int]:
    weights = _exported_linears(out, suffixes).values()
    return sum(int((t == 0).sum()) for t in weights), sum(t.numel() for t in weights)


@pytest.fixture(scope="module")
def wanda_gptq_run(tmp_path_factory):
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    tmp = tmp_path_factory.mktemp("sparse")
    src = save_tiny("llama", tmp / "model", layers=2)
    add_tokenizer(src)
    stages = [{"method": "wanda", "data": "calib", "structure": "2:4"},
              {"method": "gptq", "data": "calib", "bits": 4, "group_size": 32, "symmetric": False}]
    report = run(parse_recipe(make_recipe(tmp, src, stages)))
    return src, Path(report["output"]), report


def test_wanda_then_gptq_keeps_every_zero_counted(wanda_gptq_run):
    _, out, report = wanda_gptq_run
    sparse, quant = report["stages"][0]["notes"], report["stages"][1]["notes"]
    assert sparse["structure"] == "2:4" and sparse["sparsity_measured"] == 0.5 and sparse["linears_pruned"] == 14
    # every zero of the sparsity stage is still exactly zero (rounding to the grid adds a few more)
    assert quant["zeros_before"] == quant["zeros_kept"] == sparse["zeros"] <= quant["zeros_after"]
    assert 0.5 <= quant["sparsity_measured"] < 0.52
    config = json.loads((out / "config.json").read_text())
    assert not config["quantization_config"].get("sparsity_config")  # empty: vLLM 0.32 refuses targets
    # the export, decompressed: every group of 4 inputs of every Linear still has (at least) its 2 zeros
    weights = _exported_linears(out)
    assert len(weights) == 14
    for w in weights.values():
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all()
    assert _count_zeros(out)[0] == quant["zeros_after"]
    assert report["check"]["passed"], report["check"]


@pytest.fixture(scope="module")
def sparsegpt_run(tmp_path_factory):
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    tmp = tmp_path_factory.mktemp("sparsegpt")
    src = save_tiny("llama", tmp / "model")
    add_tokenizer(src)
    stages = [{"method": "sparsegpt", "data": "calib", "sparsity": [0.5, 0.6, 0.4, 0.3], "ignore": ["lm_head", "o_proj"],
               "block_size": 32}]
    report = run(parse_recipe(make_recipe(tmp, src, stages)))
    return Path(report["output"]), report


def test_sparsegpt_exports_dense_with_the_measured_sparsity_in_report_and_card(sparsegpt_run):
    from llmslim.card import build_card

    out, report = sparsegpt_run
    notes = report["stages"][0]["notes"]
    zeros, total = _count_zeros(out, ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    assert notes["zeros"] == zeros and notes["weights_pruned_linears"] == total
    assert notes["sparsity_measured"] == pytest.approx(zeros / total, abs=1e-6)
    assert notes["sparsity_measured"] == pytest.approx(0.45, abs=0.005)
    assert [d["sparsity"] for d in notes["layers"]] == [0.5, 0.6, 0.4, 0.3]
    o_zeros, _ = _count_zeros(out, ("o_proj",))
    assert o_zeros == 0  # ignored
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in json.dumps(config)
    assert report["check"]["passed"], report["check"]
    card = build_card(out, "me/tiny-sparse")
    assert "sparsity_measured: 0.45" in card and "structure: unstructured" in card


def test_vllm_serves_the_sparse_export_dense_with_transformers_greedy_tokens(sparsegpt_run):
    """vLLM 0.32 loads the zeros-in-place export as the dense model it is (no sparsity_config), judged as every
    export (llmslim.check: the same greedy tokens as transformers)."""
    from llmslim.check import check_exports

    out, _ = sparsegpt_run
    result = check_exports([out], "vllm")[0]
    assert result.passed and result.generated, result.detail


def test_quantizers_hold_masked_weights_at_exactly_zero_on_asymmetric_grids():
    """gptq with the mask as fixed zeros, and rtn + hold_zeros (what rtn and autoround get after a sparsity
    stage): every masked weight dequantizes to 0; gptq's error feedback does not refill them."""
    from llmslim.methods.gptq.core import gptq_quantize, hold_zeros, rtn_quantize

    w, _, h = _problem(5)
    pruned = wanda_prune(w.float(), h.diagonal(), 0.5, (2, 4))
    grid = {"bits": 4, "group_size": 16, "symmetric": False}
    free = gptq_quantize(pruned.weight, h.float(), act_order=True, static_groups=True, **grid)
    assert (free.weight[pruned.mask] != 0).any()  # without the mask, the updates fill the zeros
    held = gptq_quantize(pruned.weight, h.float(), act_order=True, static_groups=True, fixed_zero=pruned.mask, **grid)
    assert (held.weight[pruned.mask] == 0).all()
    assert torch.equal(hold_zeros(held, pruned.mask, 16).q, held.q)  # already on the zero points
    rtn = hold_zeros(rtn_quantize(pruned.weight, **grid), pruned.mask, 16)
    assert (rtn.weight[pruned.mask] == 0).all()


# ---------------------------------------------------------------- OWL, and the masks through training


def _run(tmp: Path, stages: list, layers: int = 2, **extra) -> tuple[Path, Path, dict]:
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    src = save_tiny("llama", tmp / "model", layers=layers)
    add_tokenizer(src)
    report = run(parse_recipe(make_recipe(tmp, src, stages, **extra)))
    return src, Path(report["output"]), report


TRAIN = {"data": "calib", "steps": 2, "batch_size": 2, "lr": 1e-3}


@pytest.fixture(scope="module")
def owl_distill_run(tmp_path_factory):
    """wanda with profile owl (layer 0's down_proj left dense: layers of unequal size), then distill training
    every weight."""
    stages = [{"method": "wanda", "data": "calib", "profile": "owl", "owl_threshold": 3, "sparsity": 0.5,
               "ignore": ["lm_head", "model.layers.0.mlp.down_proj"]},
              {"method": "distill", **TRAIN, "trainable": "all"}]
    return _run(tmp_path_factory.mktemp("owl"), stages, layers=4, export={"check": "none"})


def test_owl_spreads_the_target_over_layers_and_distill_keeps_every_zero(owl_distill_run):
    src, out, report = owl_distill_run
    notes, train = report["stages"][0]["notes"], report["stages"][1]["notes"]
    layers = notes["layers"]
    chosen = [d["sparsity"] for d in layers]
    assert notes["profile"] == "owl" and notes["sparsity_per_layer"] == pytest.approx(chosen, abs=1e-6)
    assert len(notes["owl"]["outlier_ratio_per_layer"]) == 4 and notes["owl"]["lambda"] == 0.08
    sizes = [sum(d["weights"] for d in layer["linears"].values()) for layer in layers]
    assert len(set(sizes)) == 2  # layer 0 is smaller
    assert sum(s * w for s, w in zip(chosen, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-12)
    assert max(abs(s - 0.5) for s in chosen) == pytest.approx(0.08) and all(abs(s - 0.5) <= 0.08 + 1e-12 for s in chosen)
    assert notes["sparsity_target"] == 0.5 and notes["sparsity_measured"] == pytest.approx(0.5, abs=0.003)
    # counted in the export, after training: each row of each Linear of layer l has round(S_l x in) zeros
    original = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    for name, w in _exported_linears(out).items():
        i = int(name.split(".")[2])
        if name == "model.layers.0.mlp.down_proj.weight":
            assert not (w == 0).any()  # ignored
            continue
        assert ((w == 0).sum(1) == round(chosen[i] * w.shape[1])).all(), name
        kept = w != 0
        assert (w[kept] != original[name][kept]).float().mean() > 0.9, name  # wanda moved none: distill did
    assert train["sparsity_kept"]["zeros_before"] == train["sparsity_kept"]["zeros_kept"] == notes["zeros"]
    assert train["sparsity_kept"]["zeros_after"] == notes["zeros"] and train["sparsity_kept"]["linears_masked"] == 27


def _two_of_four(weights: dict[str, torch.Tensor]) -> None:
    assert len(weights) == 14
    for name, w in weights.items():
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all(), name


def test_wanda_2_4_then_distill_lora_then_gptq_ends_2_4(tmp_path):
    """The adapters' update is masked in the forward and in the merge; gptq then keeps the zeros."""
    stages = [{"method": "wanda", "data": "calib", "structure": "2:4"},
              {"method": "distill", **TRAIN, "trainable": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
              {"method": "gptq", "data": "calib", "bits": 4, "group_size": 32}]
    _, out, report = _run(tmp_path, stages, export={"check": "none"})
    sparse, train, quant = (st["notes"] for st in report["stages"])
    kept = train["sparsity_kept"]
    assert kept["zeros_before"] == kept["zeros_kept"] == kept["zeros_after"] == sparse["zeros"]
    assert train["trainable"] == "lora r=4, merged" and len(train["curve"]) == 2
    assert quant["zeros_before"] == quant["zeros_kept"] == sparse["zeros"]
    _two_of_four(_exported_linears(out))


def test_wanda_2_4_then_qat_exports_2_4_integers(tmp_path):
    """qat's start holds the zeros on the grid's zero points, its forward and export keep them there."""
    stages = [{"method": "wanda", "data": "calib", "structure": "2:4"},
              {"method": "qat", **TRAIN, "lr": 1e-2, "bits": 4, "group_size": 32, "symmetric": False,
               "lora": {"r": 4, "alpha": 8}}]
    _, out, report = _run(tmp_path, stages, export={"check": "none"})
    sparse, train = (st["notes"] for st in report["stages"])
    kept = train["sparsity_kept"]
    assert kept["zeros_before"] == kept["zeros_kept"] == sparse["zeros"] <= kept["zeros_after"]
    assert not train["integers_changed_by_training"].startswith("0 of")
    weights = _exported_linears(out)  # the integers, dequantized by our reference decoder
    _two_of_four(weights)
    assert sum(int((w == 0).sum()) for w in weights.values()) == kept["zeros_after"]


# ---------------------------------------------------------------- refused before anything runs


@pytest.mark.parametrize("stages, kw, message", [
    ([{"method": "wanda", "data": "calib", "structure": "2:4"}], {"intermediate_size": 170},
     r"stages\[0\]\.structure: structure '2:4' needs input widths divisible by 4; mlp\.down_proj has 170"),
    ([{"method": "sparsegpt", "data": "calib", "sparsity": 1.0}], {}, r"sparsity 1 is outside \[0, 1\)"),
    ([{"method": "sparsegpt", "data": "calib", "sparsity": -0.1}], {}, r"sparsity -0.1 is outside \[0, 1\)"),
    ([{"method": "wanda", "data": "calib", "structure": "4:4"}], {}, r"structure '4:4'.*needs 0 < N < M"),
    ([{"method": "wanda", "data": "calib", "structure": "2-4"}], {}, r"structure '2-4': use unstructured or \"N:M\""),
    ([{"method": "wanda", "data": "calib", "structure": "2:4", "sparsity": 0.6}], {},
     r"structure '2:4' sets the sparsity to 2/4 = 0.5"),
    ([{"method": "wanda", "data": "calib", "sparsity": [0.5, 0.5]}], {},
     r"stages\[0\]\.sparsity: 2 per-layer sparsities for a model of 4 decoder layers"),
    ([{"method": "wanda", "data": "calib", "profile": "owl", "structure": "2:4"}], {},
     r"stages\[0\]: structure '2:4': profile owl varies the sparsity per layer, which N:M fixes"),
    ([{"method": "sparsegpt", "data": "calib", "profile": "owl", "sparsity": [0.5, 0.5, 0.5, 0.5]}], {},
     r"stages\[0\]: sparsity: profile owl chooses each layer's sparsity itself around one target"),
    ([{"method": "wanda", "data": "calib", "profile": "owl", "sparsity": 0.9, "owl_lambda": 0.2}], {},
     r"owl_lambda 0.2: layers would range over \[0.7, 1.1\]"),
    ([{"method": "wanda", "data": "calib", "owl_lambda": 0.1}], {}, r"owl_lambda applies to profile: owl only"),
    ([{"method": "wanda", "data": "calib"}, {"method": "qat", "data": "calib", "steps": 2, "merge": False}], {},
     r"stages\[1\]\.merge: merge: false serves the LoRA adapter apart, dense over the base, which would fill"),
    ([{"method": "wanda", "data": "calib"}, {"method": "qat", "data": "calib", "steps": 2, "base": "nf4"}], {},
     r"stages\[1\]\.base: base nf4 merges its dense adapters"),
    ([{"method": "wanda", "data": "calib", "structure": "2:4"}, {"method": "gptq", "data": "calib"},
      {"method": "distill", "data": "calib", "steps": 2}], {},
     r"stages\[2\]: only eora can follow the quantization in stages\[1\]; training after quantization is what "
     r"qat is for: put it before the quantizing stage, or train with qat in its place"),
    ([{"method": "wanda", "data": "calib"}, {"method": "prune_ffn", "data": "calib", "intermediate_size": 128}], {},
     r"stages\[1\]: prune_ffn cannot follow the sparsity stage in stages\[0\] \(it changes the shapes"),
])
def test_bad_sparsity_recipes_are_refused_in_one_line(tiny_tok, tmp_path, stages, kw, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(make_recipe(tmp_path, tiny_tok("llama", **kw), stages))
    rc, out = run_cli("validate", str(recipe))
    lines = [line for line in out.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and re.search(message, lines[0]), out
    assert not (tmp_path / "out.work").exists()


# ---------------------------------------------------------------- killed mid-stage, resumed


def test_killed_sparsegpt_resumes_mid_model_with_the_same_export(tmp_path):
    """Profile owl: the sparsities chosen before the kill are read back, not measured again."""
    src = save_tiny("llama", tmp_path / "model")
    add_tokenizer(src)
    stages = [{"method": "sparsegpt", "data": "calib", "profile": "owl", "sparsity": 0.6, "owl_threshold": 3}]
    recipes = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        recipes[name] = tmp_path / name / "r.yaml"
        recipes[name].write_text(make_recipe(tmp_path / name, src, stages))
    rc, log = run_cli("run", str(recipes["a"]), "--quiet")
    assert rc == 0, log
    rc, log = run_cli("run", str(recipes["b"]), "--quiet", env={"LLMSLIM_CRASH_AT": "sparsity.layer:2"})
    assert rc != 0
    scratch = tmp_path / "b" / "out.work" / "stages" / "00-sparsegpt.scratch"
    assert len(list(scratch.glob("layer-*.safetensors"))) == 2 and (scratch / "owl-profile.json").is_file()
    rc, log = run_cli("run", str(recipes["b"]), "--quiet")
    assert rc == 0, log
    assert "2 of 4 layers were pruned by an earlier run; continuing at layer 2" in log
    assert "reusing the OWL profile an earlier run chose" in log
    a = {k: v for f in (tmp_path / "a" / "out").glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in (tmp_path / "b" / "out").glob("*.safetensors") for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / n / "out" / "llmslim_report.json").read_text())["stages"][0]["notes"]
              for n in ("a", "b"))
    assert rb["layers_from_earlier_run"] == 2 and rb["sparsity_per_layer"] == ra["sparsity_per_layer"]
    assert len(set(rb["sparsity_per_layer"])) == 4 and rb["sparsity_measured"] == pytest.approx(0.6, abs=0.005)

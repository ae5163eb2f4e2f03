"""eora: the rank-r correction of a quantized Linear that is best in the inputs' norm (core, against a direct
computation), the PEFT files it writes (peft loads them and computes base + B·A), a tiny-model run after gptq
(every Linear's objective drops, the corrected model is closer to the unquantized one than the base alone), the
recipes refused before anything runs, and a run killed mid-stage that resumes to the same adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import run_cli
from test_pipeline import make_recipe
from tiny_models import add_tokenizer, save_tiny

from llmslim.formats.lora import adapter_dir, max_rank, merge_into, read_adapter, write_adapter
from llmslim.methods.eora.core import eora, weighted_error


def _problem(seed: int, out: int = 48, n_in: int = 64, tokens: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual R [out, in] and the second moment C of inputs whose channels differ in scale by 10^3."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))[0]  # energy not axis-aligned
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, n_in, dtype=torch.float64)
    x = x @ mix
    return r, x.T @ x / tokens


def _sqrtm(c: torch.Tensor) -> torch.Tensor:
    lam, u = torch.linalg.eigh(c)
    return u @ torch.diag(lam.clamp_min(0).sqrt()) @ u.T


# ---------------------------------------------------------------- the pure core


@pytest.mark.parametrize("seed, rank", [(0, 8), (1, 16), (2, 1)])
def test_core_is_the_best_rank_r_approximation_in_the_weighted_norm(seed, rank):
    r, c = _problem(seed)
    lr = eora(r, c, rank)
    assert lr.B.shape == (48, rank) and lr.A.shape == (rank, 64)
    half = _sqrtm(c)
    # the objectives it reports are the explicit ||(R - BA) C^{1/2}||_F^2
    assert lr.before == pytest.approx(float(torch.linalg.norm(r @ half) ** 2), rel=1e-9)
    assert lr.after == pytest.approx(float(torch.linalg.norm((r - lr.B @ lr.A) @ half) ** 2), rel=1e-7)
    # the direct reference (C full rank): truncate R C^{1/2} by SVD, map back with C^{-1/2}
    u, s, vh = torch.linalg.svd(r @ half)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(half)
    torch.testing.assert_close(lr.B @ lr.A, best, rtol=1e-6, atol=1e-8)
    assert lr.after == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-7)
    # plain SVD of R (blind to the inputs) is worse in the weighted norm; so is any nearby rank-r matrix
    u0, s0, vh0 = torch.linalg.svd(r)
    plain = (u0[:, :rank] * s0[:rank]) @ vh0[:rank]
    assert weighted_error(r - plain, c) > 1.2 * lr.after
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(5):
        b = lr.B + 1e-3 * torch.randn(lr.B.shape, generator=g, dtype=torch.float64)
        a = lr.A + 1e-3 * torch.randn(lr.A.shape, generator=g, dtype=torch.float64)
        assert weighted_error(r - b @ a, c) >= lr.after


def test_core_ignores_directions_the_inputs_never_take():
    """A singular C (inputs in a 20-dimensional subspace): no division by ~0, and still optimal."""
    g = torch.Generator().manual_seed(3)
    r = torch.randn(32, 64, generator=g, dtype=torch.float64)
    x = torch.randn(200, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 64, generator=g, dtype=torch.float64)
    c = x.T @ x / 200
    lr = eora(r, c, 8)
    assert torch.isfinite(lr.A).all() and torch.isfinite(lr.B).all()
    s = torch.linalg.svdvals(r @ _sqrtm(c))
    assert lr.after == pytest.approx(float((s[8:] ** 2).sum()), rel=1e-6, abs=1e-9)
    assert weighted_error(r - lr.B @ lr.A, c) == pytest.approx(lr.after, rel=1e-6, abs=1e-9)


def test_core_refuses_a_rank_beyond_the_matrix():
    r, c = _problem(0, out=8)
    with pytest.raises(ValueError, match="rank 16 must lie in 1..8"):
        eora(r, c, 16)


# ---------------------------------------------------------------- the PEFT files


def test_adapter_files_load_in_peft_and_compute_base_plus_ba(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = save_tiny("llama", tmp_path / "model", layers=2)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    pairs, linears = {}, []
    for i, layer in enumerate(base.model.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                full = f"model.layers.{i}.{name}"
                linears.append(full)
                rank = 16 if name.endswith("down_proj") else 8  # a rank_pattern entry too
                pairs[full] = (0.05 * torch.randn(mod.out_features, rank, generator=g),
                               0.05 * torch.randn(rank, mod.in_features, generator=g))
    write_adapter(tmp_path / "model" / "eora", pairs, torch.float32, linears)
    folder = adapter_dir(tmp_path / "model")
    assert folder is not None and max_rank(folder) == 16
    config, read = read_adapter(folder)
    assert config["r"] == config["lora_alpha"] == 8 and config["target_modules"] == sorted(
        {n.rsplit(".", 1)[-1] for n in linears})
    assert set(config["rank_pattern"].values()) == {16} and config["alpha_pattern"] == {
        k: 16.0 for k in config["rank_pattern"]}
    assert all(torch.equal(read[k][0], pairs[k][0]) and torch.equal(read[k][1], pairs[k][1]) for k in pairs)

    ids = torch.randint(3, 512, (2, 12), generator=g)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(),
                                           str(folder)).eval()
    merged = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    merge_into(merged, folder)
    by_hand = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, (b, a) in pairs.items():
            by_hand.get_submodule(name).weight += b @ a
        expected = by_hand(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)  # the adapter does something


# ---------------------------------------------------------------- a tiny model: gptq W4 g32 -> eora rank 8


def _stages(**eora_kw) -> list[dict]:
    return [{"method": "gptq", "data": "calib", "bits": 4, "group_size": 32},
            {"method": "eora", "data": "calib", "rank": 8, **eora_kw}]


@pytest.fixture(scope="module")
def eora_run(tmp_path_factory):
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    tmp = tmp_path_factory.mktemp("eora")
    src = save_tiny("llama", tmp / "model")
    add_tokenizer(src)
    report = run(parse_recipe(make_recipe(tmp, src, _stages(ranks={"down_proj": 16}))))
    return src, Path(report["output"]), report


def test_gptq_then_eora_lowers_every_objective_and_brings_the_model_closer(eora_run):
    from llmslim.check import load_for_check, transformers_model

    src, out, report = eora_run
    notes = report["stages"][1]["notes"]
    assert report["check"]["passed"] and "same greedy tokens as before export" in report["check"]["detail"]
    linears = [(i, name, d) for layer in notes["layers"] for i in [layer["layer"]]
               for name, d in layer["linears"].items()]
    assert len(linears) == 4 * 7 == notes["linears"]
    assert all(d["after"] < d["before"] for _, _, d in linears), linears
    assert all(d["rank"] == (16 if name.endswith("down_proj") else 8) for _, name, d in linears)
    assert notes["objective_after"] < notes["objective_before"]
    config = json.loads((out / "eora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and set(config["rank_pattern"].values()) == {16}
    assert 0 < notes["adapter_fraction_of_base"] == pytest.approx(
        notes["adapter_bytes"] / sum(f.stat().st_size for f in out.glob("*.safetensors")), rel=1e-3)
    assert (out / "config.json").is_file() and "quantization_config" in json.loads((out / "config.json").read_text())

    # transformers + peft over the dequantized base vs the base alone, both against the unquantized model
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = reference(ids).logits
        corrected = transformers_model(out)(ids).logits
        base = load_for_check(out)(ids).logits
    assert float((corrected - want).pow(2).mean()) < 0.97 * float((base - want).pow(2).mean())


def test_perplexity_measures_the_export_with_its_adapter(eora_run):
    """llmslim's eval (the recipe's `eval: perplexity` and `llmslim eval`) loads the packed base dense and adds the
    corrections: the logits peft computes over the base, not the base's."""
    from llmslim.check import load_for_check, transformers_model
    from llmslim.evaluate.harness import load_for_perplexity

    _, out, _ = eora_run
    model, act = load_for_perplexity(out, torch.float32)
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got, peft, base = model(ids).logits, transformers_model(out)(ids).logits, load_for_check(out)(ids).logits
    assert act is None
    torch.testing.assert_close(got, peft, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)


def test_the_export_report_records_the_adapter_files(eora_run):
    _, out, report = eora_run
    files = {f["path"] if isinstance(f, dict) else f for f in report["export"]["files"]}
    assert any("eora/adapter_model.safetensors" in str(f) for f in files), files


# ---------------------------------------------------------------- refused before anything runs


@pytest.mark.parametrize("stages, message", [
    (_stages(rank=12), r"stages\[1\]\.rank: found 12.*allowed: 8, 16, 32, 64, 128 or 256"),
    ([{"method": "eora", "data": "calib", "rank": 8}], r"stages\[0\]\.method: eora compensates the rounding error of "
                                                        r"a quantizing stage before it"),
    (_stages(rank=128), r"stages\[1\]\.rank: rank 128 is larger than the smaller dimension of "
                        r"model\.layers\.0\.self_attn\.k_proj \(64 x 128\)"),
    (_stages(ranks={"down_prj": 16}), r"stages\[1\]\.ranks: 'down_prj' matches no quantized Linear"),
])
def test_bad_eora_recipes_are_refused_in_one_line(tiny_tok, tmp_path, stages, message):
    import re

    recipe = tmp_path / "r.yaml"
    recipe.write_text(make_recipe(tmp_path, tiny_tok("llama"), stages))
    rc, out = run_cli("validate", str(recipe))
    lines = [line for line in out.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and re.search(message, lines[0]), out
    assert not (tmp_path / "out.work").exists()


# ---------------------------------------------------------------- killed mid-stage, resumed


def test_killed_eora_resumes_mid_model_with_the_same_adapter(tmp_path):
    src = save_tiny("llama", tmp_path / "model")
    add_tokenizer(src)
    recipes = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        recipes[name] = tmp_path / name / "r.yaml"
        recipes[name].write_text(make_recipe(tmp_path / name, src, _stages()))
    rc, log = run_cli("run", str(recipes["a"]), "--quiet")
    assert rc == 0, log
    rc, log = run_cli("run", str(recipes["b"]), "--quiet", env={"LLMSLIM_CRASH_AT": "eora.layer:2"})
    assert rc != 0
    scratch = tmp_path / "b" / "out.work" / "stages" / "01-eora.scratch"
    assert len(list(scratch.glob("layer-*.safetensors"))) == 2
    assert (tmp_path / "b" / "out.work" / "stages" / "00-gptq").is_dir()
    rc, log = run_cli("run", str(recipes["b"]), "--quiet")
    assert rc == 0, log
    assert "2 of 4 layers were compensated by an earlier run; continuing at layer 2" in log
    _, a = read_adapter(tmp_path / "a" / "out" / "eora")
    _, b = read_adapter(tmp_path / "b" / "out" / "eora")
    assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    rb = json.loads((tmp_path / "b" / "out" / "llmslim_report.json").read_text())
    assert rb["stages"][1]["notes"]["layers_from_earlier_run"] == 2
    assert not list((tmp_path / "b" / "out.work" / "stages").glob("*-gptq"))  # kept only while eora needed it
    assert yaml.safe_load((tmp_path / "b" / "out" / "llmslim_recipe.yaml").read_text())["stages"][1]["method"] == "eora"


def served_on_a_cpu(out: Path, repo_id: str, port: int, monkeypatch, capsys) -> tuple[str, str]:
    """(what `llmslim serve OUT --dry-run` prints on an AVX-512 CPU, the model card of OUT pushed as repo_id)."""
    from llmslim import cpu
    from llmslim.card import build_card
    from llmslim.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "detect", lambda: cpu.FAMILY_FEATURES["avx512"])
    assert main(["serve", str(out), "--port", str(port), "--dry-run", "--quiet"]) == 0
    return capsys.readouterr().out, build_card(out, repo_id)


def test_serve_and_the_model_card_serve_the_adapter(eora_run, monkeypatch, capsys):
    _, out, _ = eora_run
    printed, card = served_on_a_cpu(out, "me/tiny-w4-eora", 9124, monkeypatch, capsys)
    assert f"--enable-lora --lora-modules=eora={out}/eora --max-lora-rank=16" in printed, printed
    assert "huggingface-cli download me/tiny-w4-eora --local-dir tiny-w4-eora" in card
    assert "--enable-lora --lora-modules=eora=tiny-w4-eora/eora --max-lora-rank=16" in card
    assert 'PeftModel.from_pretrained(base, "tiny-w4-eora/eora")' in card


def test_vllm_serves_the_adapter_with_transformers_peft_greedy_tokens(eora_run):
    """vLLM (--enable-lora, a LoRARequest; max_lora_rank 16 for the down_proj override) against transformers +
    peft on the same prompts, judged as every export (llmslim.check)."""
    from llmslim.check import check_exports

    _, out, _ = eora_run
    result = check_exports([out], "vllm")[0]
    assert result.passed and result.generated, result.detail

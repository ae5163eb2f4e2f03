"""qat with `merge: false`: the frozen quantized base plus the trained LoRA adapter, written apart. The export's
adapter loads in peft and, over the compressed-tensors base, computes what the training-time model computed; it
equals the same run's merged model (base + (alpha / r) B A, llmslim's own merge); the refusals (a rank vLLM does
not take, a second adapter) are one line each; a killed run resumes to the same files; vLLM serves it with the
adapter. With base nf4 (QLoRA): the input's dense weights plus the adapter, which a following gptq keeps unchanged
beside its W4 base (through a kill too); only a quantizer may follow; vLLM serves both exports with the adapter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from test_eora import served_on_a_cpu
from tiny_models import tiny_recipe as recipe

from llmslim.checkpoint import Checkpoint
from llmslim.formats.lora import adapter_dir, max_rank, merge_into, read_adapter

TOKENS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))


def qat(**kw) -> dict:
    return {"method": "qat", "data": "train", "calib_data": "calib", "steps": 6, "batch_size": 8, "lr": 1e-2,
            "save_every": 3, "bits": 4, "group_size": 32, "merge": False, "lora": {"r": 8, "alpha": 16}, **kw}


@pytest.fixture(scope="module")
def unmerged(tiny_tok, tmp_path_factory):
    """A merge: false run, with the logits the training-time model (QatLinear student) gives on TOKENS."""
    import llmslim.methods.qat as qat_method
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    seen: dict = {}
    original = qat_method.train_student

    def spy(ctx, cfg, student):
        result, notes, in_memory = original(ctx, cfg, student)
        with torch.no_grad():
            seen["logits"] = result.model(input_ids=TOKENS).logits.float()
        return result, notes, in_memory

    qat_method.train_student = spy
    try:
        tmp = tmp_path_factory.mktemp("qat-unmerged")
        report = run(parse_recipe(recipe(tmp / "a", tiny_tok("llama"), [qat()])))
    finally:
        qat_method.train_student = original
    return Path(report["output"]), report, seen["logits"]


def _base(out: Path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(
        run_compressed=False)).eval()


def test_the_adapter_computes_what_training_computed(unmerged):
    """peft over the exported base equals the training-time model (float noise); so does llmslim's own merge
    (base + (alpha / r) B A: the merged model of the same run); the base alone, or the adapter with scaling 1
    instead of alpha / r = 2, is far from it."""
    from peft import PeftModel

    out, report, trained = unmerged
    notes = report["stages"][0]["notes"]
    assert notes["adapter"] == "qat" and notes["rank"] == 8 and report["check"]["passed"], report["check"]
    folder = adapter_dir(out)
    assert folder == out / "qat" and max_rank(folder) == 8
    config, pairs = read_adapter(folder)
    assert config["r"] == 8 and config["lora_alpha"] == 16 and len(pairs) == 4 * 7
    assert any(float(b.abs().max()) > 0 for b, _ in pairs.values())  # trained: peft starts B at zero
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    with torch.no_grad():
        peft = PeftModel.from_pretrained(_base(out), str(folder)).eval()
        got = peft(input_ids=TOKENS).logits
        with peft.disable_adapter():
            alone = peft(input_ids=TOKENS).logits
        merged = _base(out)
        merge_into(merged, folder)
        ours = merged(input_ids=TOKENS).logits
        unscaled = _base(out)
        for name, (b, a) in pairs.items():
            unscaled.get_submodule(name).weight.data += b @ a
        wrong = unscaled(input_ids=TOKENS).logits
    tol = 1e-4 * float(trained.abs().max())
    assert float((got - trained).abs().max()) <= tol
    assert float((ours - trained).abs().max()) <= tol
    assert float((alone - trained).abs().max()) > 100 * tol  # the adapter matters
    assert float((wrong - trained).abs().max()) > 10 * tol  # and its scaling alpha / r


def test_the_base_is_the_frozen_start(unmerged, tiny_tok, tmp_path):
    """The base integers are the stage's start (init rtn here: rtn's export on the same grid), untouched by
    training; the adapter carries everything training learned."""
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    a = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("llama"), [qat(init="rtn", steps=2)])))
    b = run(parse_recipe(recipe(tmp_path / "b", tiny_tok("llama"), [{"method": "rtn", "bits": 4, "group_size": 32}])))
    ta, tb = Checkpoint(a["output"]), Checkpoint(b["output"])
    x, y = ta.read(ta.names), tb.read(tb.names)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x if k.endswith(("weight_packed",
                                                                                         "weight_scale")))
    assert (Path(a["output"]) / "qat" / "adapter_model.safetensors").is_file()
    # a GPTQ start: another task's run (other training) on the same calibration data has the same base
    out, _, _ = unmerged
    c = run(parse_recipe(recipe(tmp_path / "c", tiny_tok("llama"), [qat(lr=1e-3, steps=2)])))
    tc, tf = Checkpoint(c["output"]), Checkpoint(out)
    assert tc.names == tf.names and all(torch.equal(tc.read([n])[n], tf.read([n])[n]) for n in tc.names)


@pytest.mark.parametrize("stage, message", [
    (qat(lora={"r": 4, "alpha": 8}), r"merge: false writes an adapter vLLM serves: lora\.r must be one of 8, 16, "
                                      r"32, 64, 128, 256 \(got 4\), or use merge: true"),
    ([qat(), {"method": "eora", "data": "calib", "rank": 8}],
     r"stages\[1\]\.method: a stage before this one \(eora, or qat with merge: false\) already wrote the model's LoRA"),
])
def test_refusals_are_one_line(stage, message, tiny_tok, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(recipe(tmp_path, tiny_tok("llama"), stage if isinstance(stage, list) else [stage]))
    rc, out = run_cli("validate", str(path))
    lines = [line for line in out.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and re.search(message, lines[0]), out


def test_serve_and_the_card_serve_the_qat_adapter(unmerged, monkeypatch, capsys):
    out, _, _ = unmerged
    printed, card = served_on_a_cpu(out, "me/tiny-qat", 9125, monkeypatch, capsys)
    assert f"--enable-lora --lora-modules=qat={out}/qat --max-lora-rank=8" in printed, printed
    assert "--enable-lora --lora-modules=qat=tiny-qat/qat --max-lora-rank=8" in card
    assert "the LoRA adapter its quantization-aware training learned in `qat/` (rank 8)" in card and "NF4" not in card
    assert 'PeftModel.from_pretrained(base, "tiny-qat/qat")' in card


@pytest.mark.vllm
def test_vllm_serves_the_unmerged_w4_export_with_its_adapter(unmerged):
    """vLLM (--enable-lora, a LoRARequest) against transformers + peft, judged as every export (llmslim.check)."""
    from llmslim.check import check_exports

    out, _, _ = unmerged
    result = check_exports([out], "vllm")[0]
    assert result.passed and result.generated, result.detail


# ---------------------------------------------------------------- base nf4, merge: false


def nf4(**kw) -> dict:
    # eval_data: an evaluation in eval mode between steps must leave the NF4 weights as training uses them
    stage = qat(base="nf4", group_size=128, steps=4, save_every=2, eval_data="heldout", **kw)
    stage.pop("calib_data")
    return stage


GPTQ_W4 = {"method": "gptq", "data": "calib", "bits": 4, "group_size": 32}
AWQ = {"method": "awq", "data": "calib", "bits": 4, "group_size": 32}


def _same_adapter(a: Path, b: Path) -> bool:
    (ca, pa), (cb, pb) = read_adapter(a), read_adapter(b)
    return ca == cb and pa.keys() == pb.keys() and all(torch.equal(pa[k][0], pb[k][0]) and
                                                       torch.equal(pa[k][1], pb[k][1]) for k in pa)


@pytest.fixture(scope="module")
def nf4_alone(tiny_tok, tmp_path_factory):
    """qat base nf4, merge: false, nothing after it: the input's dense weights plus the adapter."""
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    tmp = tmp_path_factory.mktemp("qat-nf4-alone")
    return run(parse_recipe(recipe(tmp / "a", tiny_tok("llama"), [nf4()])))


@pytest.fixture(scope="module")
def nf4_then_gptq(tiny_tok, tmp_path_factory):
    """The same qat stage followed by gptq W4: the adapter beside the compressed-tensors base."""
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    tmp = tmp_path_factory.mktemp("qat-nf4-gptq")
    return run(parse_recipe(recipe(tmp / "a", tiny_tok("llama"), [nf4(), GPTQ_W4])))


def test_nf4_apart_alone_is_the_input_weights_plus_the_adapter(nf4_alone, tiny_tok):
    """The base is the input's own weights (not their NF4 rounding), every tensor equal; the adapter is trained
    (B moved from peft's zeros), with the trained alpha; the notes measure how far NF4 moves the weights."""
    out = Path(nf4_alone["output"])
    notes = nf4_alone["stages"][0]["notes"]
    assert notes["adapter"] == "qat" and notes["rank"] == 8 and nf4_alone["check"]["passed"], nf4_alone["check"]
    moved = re.fullmatch(r"NF4, which the adapter trained over, moves the base weights by ([\d.]+) % of their norm",
                         notes["nf4_shift"])
    assert moved and float(moved.group(1)) == pytest.approx(_nf4_shift(tiny_tok("llama")), abs=0.006)
    assert "next_grid_shift" not in notes  # nothing quantizes after it
    src, got = Checkpoint(tiny_tok("llama")), Checkpoint(out)
    a, b = src.read(src.names), got.read(got.names)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    config, pairs = read_adapter(adapter_dir(out))
    assert config["r"] == 8 and config["lora_alpha"] == 16 and len(pairs) == 4 * 7
    assert any(float(b.abs().max()) > 0 for b, _ in pairs.values())
    _peft_is_what_llmslim_evaluates(out)


def _nf4_shift(model: Path) -> float:
    """bitsandbytes' NF4 round trip (blocks of 64, double quantization) of the decoder Linears, in % of their norm."""
    import bitsandbytes.functional as bnbf

    ckpt = Checkpoint(model)
    weights = ckpt.read([n for n in ckpt.names if n.startswith("model.layers.") and n.endswith("proj.weight")])
    moved = norm = 0.0
    for w in weights.values():
        packed, state = bnbf.quantize_4bit(w.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
        moved += float((bnbf.dequantize_4bit(packed, state) - w.float()).pow(2).sum())
        norm += float(w.float().pow(2).sum())
    assert len(weights) == 4 * 7
    return 100 * (moved / norm) ** 0.5


def _peft_is_what_llmslim_evaluates(out: Path) -> None:
    """peft over the export (a compressed-tensors base decoded to dense) gives the logits of the model llmslim's
    perplexity loads (the adapter merged by llmslim); the adapter moves them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmslim.evaluate.harness import load_for_perplexity

    quantized = "quantization_config" in json.loads((out / "config.json").read_text())
    with torch.no_grad():
        base = _base(out) if quantized else AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        peft = PeftModel.from_pretrained(base, str(out / "qat")).eval()
        got = peft(input_ids=TOKENS).logits
        with peft.disable_adapter():
            alone = peft(input_ids=TOKENS).logits
        ours = load_for_perplexity(out, "float32")[0](input_ids=TOKENS).logits
    tol = 1e-4 * float(got.abs().max())
    assert float((ours - got).abs().max()) <= tol
    assert float((alone - got).abs().max()) > 100 * tol


def test_nf4_apart_then_gptq_keeps_the_adapter(nf4_then_gptq, nf4_alone):
    """gptq W4 after it: the export is compressed-tensors plus the qat stage's adapter, unchanged (the same
    recipe's stage alone wrote the same tensors); peft over the export computes what llmslim's own evaluation
    loads (the base decoded, the adapter merged by llmslim), and the adapter moves the logits."""
    out = Path(nf4_then_gptq["output"])
    qat_notes, gptq_notes = (s["notes"] for s in nf4_then_gptq["stages"])
    assert nf4_then_gptq["check"]["passed"], nf4_then_gptq["check"]
    assert re.fullmatch(r"rounding the base weights to the next stage's W4 grid \(rtn\) moves them by [\d.]+ % of "
                        r"their norm", qat_notes["next_grid_shift"])
    assert gptq_notes["adapter_kept"] == "qat/ of the stage before, unchanged; trained over NF4, not over this " \
                                         "stage's grid"
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert adapter_dir(out) == out / "qat" and _same_adapter(out / "qat", Path(nf4_alone["output"]) / "qat")
    _peft_is_what_llmslim_evaluates(out)


@pytest.mark.parametrize("after, message", [
    ({"method": "distill", "data": "train", "steps": 2}, r"stages\[1\]: distill cannot follow stages\[0\] \(qat, "
                                                         r"base nf4, merge: false\).*put distill before the qat stage"),
    ({"method": "wanda", "data": "calib", "sparsity": 0.5}, r"stages\[1\]: wanda cannot follow stages\[0\].*"
                                                            r"prune first, then train with qat base: grid, merge: true"),
    ({"method": "prune_ffn", "ratio": 0.25, "criterion": "magnitude"}, r"stages\[1\]: prune_ffn cannot follow stages\[0\]"),
    ({"method": "eora", "data": "calib", "rank": 8}, r"stages\[1\]: eora cannot follow stages\[0\].*a model has "
                                                      r"one adapter: drop eora, or use merge: true"),
    ([GPTQ_W4, {"method": "eora", "data": "calib", "rank": 8}], r"stages\[2\]\.method: a stage before this one "
                                                               r"\(eora, or qat with merge: false\) already wrote"),
    (AWQ, r"stages\[1\]: awq cannot follow stages\[0\] .*awq divides its inputs by folded scales.*put awq before "
          r"the qat stage"),
    ({"method": "qat", "data": "train", "steps": 2, "bits": 4, "group_size": 32},
     r"stages\[1\]: qat cannot follow stages\[0\]"),
])
def test_only_a_quantizer_may_follow_nf4_apart(after, message, tiny_tok, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(recipe(tmp_path, tiny_tok("llama"), [nf4(), *(after if isinstance(after, list) else [after])]))
    rc, out = run_cli("validate", str(path))
    lines = [line for line in out.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and re.search(message, lines[0]), out


@pytest.mark.parametrize("before, after", [([], [GPTQ_W4]), ([], [{"method": "rtn", "bits": 4, "group_size": 32}]),
                                           ([], [{"method": "autoround", "data": "calib", "bits": 4, "group_size": 32}]),
                                           ([AWQ], [GPTQ_W4])])
def test_quantizers_may_follow_nf4_apart(before, after, tiny_tok, tmp_path):
    """gptq, rtn and autoround after it; awq before it (its scales folded into the weights the adapter trains
    over), paired with the gptq after it."""
    from llmslim.pipeline import Workspace, prepare
    from llmslim.recipe import parse_recipe

    r = parse_recipe(recipe(tmp_path, tiny_tok("llama"), [*before, nf4(), *after]))
    states = prepare(r, Workspace(r.spec.output))[4][len(before):]
    assert [s.lora_rank for s in states] == [None, 8, 8] and states[-1].quant is not None
    assert states[-1].lora_trained_on == "NF4"


def test_serve_and_the_card_serve_the_nf4_adapter(nf4_then_gptq, nf4_alone, monkeypatch, capsys):
    out = Path(nf4_then_gptq["output"])
    printed, card = served_on_a_cpu(out, "me/tiny-qlora", 9126, monkeypatch, capsys)
    assert f"--enable-lora --lora-modules=qat={out}/qat --max-lora-rank=8" in printed, printed
    assert "The quantized base comes with the LoRA adapter its QLoRA training learned in `qat/` (rank 8)" in card
    assert 'PeftModel.from_pretrained(base, "tiny-qlora/qat")' in card
    dense = Path(nf4_alone["output"])
    printed, card = served_on_a_cpu(dense, "me/tiny-qlora-dense", 9127, monkeypatch, capsys)
    assert f"--enable-lora --lora-modules=qat={dense}/qat --max-lora-rank=8" in printed, printed
    assert "The base comes with" in card and "CompressedTensorsConfig" not in card
    assert 'base = AutoModelForCausalLM.from_pretrained("tiny-qlora-dense", dtype="auto")' in card


def test_killed_mid_gptq_after_nf4_apart_ends_with_the_adapter(nf4_then_gptq, tiny_tok, tmp_path):
    """A kill inside the gptq stage (after its second layer) and a rerun: the export has the adapter, the same
    as an unkilled run's."""
    path = tmp_path / "r.yaml"
    path.write_text(recipe(tmp_path, tiny_tok("llama"), [nf4(), GPTQ_W4]))
    rc, out = run_cli("run", str(path), "--quiet", env={"LLMSLIM_CRASH_AT": "gptq.layer:2"})
    assert rc == -9, out
    assert (tmp_path / "out.work" / "stages" / "00-qat" / "qat" / "adapter_config.json").is_file()
    rc, out = run_cli("run", str(path), "--quiet")
    assert rc == 0, out
    assert _same_adapter(tmp_path / "out" / "qat", Path(nf4_then_gptq["output"]) / "qat")
    report = json.loads((tmp_path / "out" / "llmslim_report.json").read_text())
    assert report["stages"][1]["notes"]["adapter_kept"].startswith("qat/ of the stage before")


@pytest.mark.vllm
def test_vllm_serves_the_nf4_then_gptq_w4_export_with_its_adapter(nf4_then_gptq, nf4_alone):
    """As the base grid export above: vLLM with the adapter against transformers + peft (llmslim.check), over
    the W4 base and over the dense one (base nf4 with nothing after it)."""
    from llmslim.check import check_exports

    for result in check_exports([nf4_then_gptq["output"], nf4_alone["output"]], "vllm"):
        assert result.passed and result.generated, result.detail

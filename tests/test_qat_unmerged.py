"""qat with `merge: false`: the frozen quantized base plus the trained LoRA adapter, written apart. The export's
adapter loads in peft and, over the compressed-tensors base, computes what the training-time model computed; it
equals the same run's merged model (base + (alpha / r) B A, llmslim's own merge); the refusals (a rank vLLM does
not take, an NF4 base) are one line each; a killed run resumes to the same files; vLLM serves it with the adapter."""

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
    (qat(base="nf4", group_size=128), r"merge: false needs base: grid .*; use base: grid, or merge: true with base nf4"),
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
    assert 'PeftModel.from_pretrained(base, "tiny-qat/qat")' in card


@pytest.mark.vllm
def test_vllm_serves_the_unmerged_w4_export_with_its_adapter(unmerged):
    """vLLM (--enable-lora, a LoRARequest) against transformers + peft, judged as every export (llmslim.check)."""
    from llmslim.check import check_exports

    out, _, _ = unmerged
    result = check_exports([out], "vllm")[0]
    assert result.passed and result.generated, result.detail

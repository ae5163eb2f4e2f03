"""distill and the shared training loop: every loss term against a hand computation, the layer mapping
after drop_layers, LoRA then merge, resume after a kill, 2-process DDP and FSDP2 (gloo) against one
process, the teacher checks, clear errors, and a distilled export in vLLM and transformers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from conftest import REPO
from safetensors.torch import load_file
from tiny_models import tiny_recipe as recipe

from llmslim.checkpoint import Checkpoint
from llmslim.errors import RecipeError
from llmslim.pipeline import Workspace, prepare, run
from llmslim.recipe import parse_recipe
from llmslim.training import losses
from llmslim.training.loop import lr_factor, window_order
from llmslim.training.student import default_mapping, layer_origin

# ---------------------------------------------------------------- losses: pure functions


def test_kl_matches_a_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.0, 3.0, 1.0]])
    for temperature in (1.0, 2.0):
        ps = [math.exp(v / temperature) for v in s[0].tolist()]
        pt = [math.exp(v / temperature) for v in t[0].tolist()]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        fwd = sum(b * math.log(b / a) for a, b in zip(ps, pt)) * temperature**2
        rev = sum(a * math.log(a / b) for a, b in zip(ps, pt)) * temperature**2
        for reverse, want in ((0.0, fwd), (1.0, rev), (0.25, 0.75 * fwd + 0.25 * rev)):
            got = losses.kl_logits(s, t, temperature=temperature, reverse=reverse, chunk=2)
            assert float(got) == pytest.approx(want, rel=1e-5)  # float32 math against float64 by hand


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature, reverse", [(1.0, 0.0), (2.0, 0.0), (1.0, 1.0), (1.5, 0.3)])
def test_chunked_kl_equals_the_unchunked_one_value_and_gradient(chunk, temperature, reverse):
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(2, 5, 100, generator=g)).requires_grad_()
    t = 3 * torch.randn(2, 5, 100, generator=g)
    got = losses.kl_logits(s, t, temperature=temperature, reverse=reverse, chunk=chunk)
    (grad,) = torch.autograd.grad(got, s)
    s2 = s.detach().clone().requires_grad_()
    want = losses.kl_logits_reference(s2, t, temperature=temperature, reverse=reverse)
    (grad2,) = torch.autograd.grad(want, s2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad2, rtol=1e-4, atol=1e-7)


def test_chunked_kl_in_bf16_keeps_float32_math_and_student_dtype_gradients():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 50, generator=g).to(torch.bfloat16).requires_grad_()
    t = torch.randn(6, 50, generator=g).to(torch.bfloat16)
    got = losses.kl_logits(s, t, chunk=16)
    (grad,) = torch.autograd.grad(got, s)
    assert got.dtype == torch.float32 and grad.dtype == torch.bfloat16
    want = losses.kl_logits_reference(s.float(), t.float())
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_kl_mask_counts_only_the_chosen_tokens():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    mask = torch.tensor([True, False, True, False])
    assert float(losses.kl_logits(s, t, mask=mask)) == pytest.approx(float(losses.kl_logits_reference(s[mask], t[mask])))


def test_topk_kl_with_every_token_is_the_forward_kl():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    top = t.topk(20, dim=-1)
    assert float(losses.kl_topk(s, top.values, top.indices)) == pytest.approx(float(losses.kl_logits_reference(s, t)),
                                                                             rel=1e-5)
    top5 = t.topk(5, dim=-1)  # a truncated teacher: renormalised over its top 5
    assert float(losses.kl_topk(s, top5.values, top5.indices)) >= 0


def test_hidden_and_lm_losses_by_hand():
    s = torch.tensor([[[1.0, 0.0], [2.0, 2.0]]])
    t = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    nmse = (1.0 / 4.0 + 2.0 / 2.0) / 2  # ||s-t||^2/||t||^2 per token, averaged
    assert float(losses.hidden_loss(s, t, "nmse")) == pytest.approx(nmse)
    assert float(losses.hidden_loss(s, t, "cosine")) == pytest.approx(0.0, abs=1e-6)  # same directions
    assert float(losses.hidden_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), "cosine")) == pytest.approx(1.0)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    tokens = torch.tensor([[0, 1]])  # position 0 predicts token 1 with probability 3/4
    assert float(losses.lm_loss(logits, tokens)) == pytest.approx(-math.log(0.75))


def test_schedules_and_window_order():
    assert [round(lr_factor(s, 10, 2, "constant"), 3) for s in range(4)] == [0.333, 0.667, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0) and lr_factor(9, 10, 0, "cosine") < 0.05
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)
    order = window_order(5, steps=4, batch_size=3, seed=0)  # 12 = two full epochs and a bit
    assert len(order) == 12 and sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order == window_order(5, 4, 3, 0) != window_order(5, 4, 3, 1)


def test_layer_origin_after_drop_layers_stages():
    history = [{"method": "drop_layers", "notes": {"kept": [0, 2, 3, 4, 5]}},  # dropped 1 of 6
               {"method": "prune_ffn", "notes": {}},
               {"method": "drop_layers", "notes": {"kept": [0, 1, 3, 4]}}]  # dropped (original) 3
    assert layer_origin(history, 6) == [0, 2, 4, 5]
    assert default_mapping(history, 4, 6) == {0: 0, 1: 2, 2: 4, 3: 5}
    assert default_mapping([], 3, 6) == {0: 1, 1: 3, 2: 5}  # no record: by relative depth


# ---------------------------------------------------------------- the stage on tiny models


def distill(**kw) -> dict:
    return {"method": "distill", "data": "train", "steps": 12, "batch_size": 8, "lr": 3e-3, "warmup": 2,
            "save_every": 5, **kw}


def test_evaluations_measure_the_weights_not_their_mixed_precision_view(tiny_tok, tmp_path):
    """Under bf16 mixed precision (the default on a GPU) accelerate wraps forward in autocast; the stage's
    perplexity must still be that of the float32 weights it writes (found on an H100, reproduced here)."""
    stages = [distill(steps=3, save_every=3, mixed_precision="bf16", eval_data="heldout")]
    report = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("llama"), stages, eval={"perplexity": ["heldout"]})))
    in_memory = report["stages"][0]["notes"]["eval"][-1]["ppl"]
    assert report["eval"]["after"]["perplexity"]["heldout"]["ppl"] == pytest.approx(in_memory, rel=1e-5)


def test_one_run_trains_in_bf16_then_in_float32(tiny_tok, tmp_path):
    """accelerate keeps one process-wide state; a second training stage with other settings must not hit it."""
    stages = [distill(steps=2, warmup=1, save_every=2, mixed_precision="bf16"),
              distill(steps=2, warmup=1, save_every=2, mixed_precision="no")]
    report = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("llama"), stages)))
    assert [len(s["notes"]["curve"]) for s in report["stages"]] == [2, 2]


PRUNE = [{"method": "drop_layers", "layers": [1]},
         {"method": "prune_ffn", "intermediate_size": 128, "criterion": "activation", "data": "calib"}]


def test_distillation_lowers_the_loss_and_maps_the_kept_layers(tiny_tok, tmp_path):
    stages = PRUNE + [distill(loss={"logits": 1.0, "hidden": 0.5}, eval_data="heldout", eval_every=6)]
    report = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("llama"), stages, eval={"perplexity": ["heldout"]})))
    notes = report["stages"][2]["notes"]
    assert notes["hidden_layers"] == {"0": 0, "1": 2, "2": 3}  # layer 1 was dropped
    curve = notes["curve"]
    assert [p["step"] for p in curve] == list(range(1, 13)) and {"loss", "logits", "hidden", "lr"} <= set(curve[0])
    assert curve[-1]["logits"] < curve[0]["logits"] and curve[-1]["hidden"] < curve[0]["hidden"]
    assert [e["step"] for e in notes["eval"]] == [0, 6, 12] and notes["eval"][-1]["ppl"] < notes["eval"][0]["ppl"]
    assert "student in float32" in report["stages"][2]["peak_note"] and "teacher in memory" in report["stages"][2]["peak_note"]
    after = report["eval"]["after"]["perplexity"]["heldout"]["ppl"]
    assert after == pytest.approx(notes["eval"][-1]["ppl"], rel=1e-4)  # the export is the trained model
    assert (Path(report["output"]) / "plots" / "stage-2-distill.png").stat().st_size > 5000


def test_lora_trains_adapters_and_merges_them(tiny_tok, tmp_path):
    stages = [PRUNE[1], distill(trainable="lora", lora={"r": 4, "alpha": 8, "targets": ["q_proj", "down_proj"]},
                                lr=1e-2)]
    report = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("llama"), stages)))
    out = Checkpoint(report["output"])
    t = out.read(out.names)
    assert not any("lora" in n for n in t) and "peft" not in json.dumps(out.config.to_dict())
    ref = run(parse_recipe(recipe(tmp_path / "b", tiny_tok("llama"), [PRUNE[1]])))  # the same pruning alone
    r = Checkpoint(ref["output"]).read(out.names)
    changed = {n for n in t if not torch.equal(t[n], r[n])}
    assert changed and all(n.endswith(("q_proj.weight", "down_proj.weight")) for n in changed), changed
    assert report["stages"][1]["notes"]["trainable"] == "lora r=4, merged"


def test_a_killed_training_resumes_to_the_same_weights(tiny_tok, tmp_path):
    model = tiny_tok("llama")
    stages = [PRUNE[1], distill(steps=14, save_every=4)]
    ref = run(parse_recipe(recipe(tmp_path / "ref", model, stages)))
    path = tmp_path / "killed" / "r.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(recipe(tmp_path / "killed", model, stages))
    rc, out = run_cli("run", str(path), "--quiet", env={"LLMSLIM_CRASH_AT": "train.saved:2"})  # after step 8
    assert rc == -9, out
    rc, out = run_cli("run", str(path), "--quiet")
    assert rc == 0 and "resuming the training at step 8 of 14" in out, out
    a, b = Checkpoint(ref["output"]), Checkpoint(tmp_path / "killed" / "out")
    ta, tb = a.read(a.names), b.read(b.names)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)  # exactly (tests/test_faults.py: the whole export)
    rb = json.loads((tmp_path / "killed" / "out" / "llmslim_report.json").read_text())
    ca, cb = ref["stages"][1]["notes"]["curve"], rb["stages"][1]["notes"]["curve"]
    assert [p["step"] for p in cb] == list(range(1, 15))
    assert [p["loss"] for p in ca] == [p["loss"] for p in cb]


def _launch(recipe_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """`accelerate launch FLAGS --num_processes 2 -m llmslim run RECIPE` (torchrun; without GPUs over gloo)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([str(accelerate), "launch", *flags, "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llmslim", "run",
                           str(recipe_path), "--quiet"], capture_output=True, text=True, timeout=900, env=env, cwd=REPO)


def test_two_processes_train_like_one(tiny_tok, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m llmslim run` (torchrun; without GPUs: DDP over
    gloo) against one process, same global batch: the same loss curve and weights (float noise aside)."""
    model = tiny_tok("llama")
    stages = [PRUNE[1], distill(steps=6, batch_size=8, grad_accum=2, save_every=3)]
    one = run(parse_recipe(recipe(tmp_path / "one", model, stages)))
    path = tmp_path / "two" / "r.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(recipe(tmp_path / "two", model, stages))
    proc = _launch(path, "--multi_gpu")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two = json.loads((tmp_path / "two" / "out" / "llmslim_report.json").read_text())
    n1, n2 = one["stages"][1]["notes"], two["stages"][1]["notes"]
    assert n1["processes"] == 1 and n2["processes"] == 2
    for p1, p2 in zip(n1["curve"], n2["curve"], strict=True):
        assert p2["loss"] == pytest.approx(p1["loss"], rel=1e-4), (p1, p2)
    a, b = Checkpoint(one["output"]), Checkpoint(tmp_path / "two" / "out")
    ta, tb = a.read(a.names), b.read(b.names)
    for n in ta:
        torch.testing.assert_close(ta[n], tb[n], rtol=1e-4, atol=1e-5)


def test_fsdp_over_two_processes_trains_like_one(tiny_tok, tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2` with two CPU processes over gloo (where accelerate
    alone would fall back to DDP: llmslim.training.sharding turns FSDP2 on): every trainable weight
    sharded over the two, the sharded training state saved, the full weights gathered onto the main process
    and written. Against one process: the same loss and eval curves, and the same export (float noise
    aside) from all three kinds of training stage, each starting from what the one before gathered: all
    weights, then LoRA adapters (merged), then qat's adapters on the W4 grid, on a model with tied
    embeddings. qat's export also makes the main process load a compressed-tensors model after the other
    process left (the check), which hung while the process group was still up."""
    model = tiny_tok("llama", tied=True)
    # init rtn: GPTQ's error feedback would turn the float noise of the weights it starts from into many
    # flipped integers (seen: up to a third of the last layer's words), the same in DDP or on one process
    qat = {"method": "qat", "data": "train", "init": "rtn", "steps": 3, "batch_size": 8, "lr": 1e-2,
           "save_every": 2, "bits": 4, "group_size": 32, "lora": {"r": 4, "alpha": 8},
           "loss": {"logits": 1.0, "attention": 1.0}}  # q/k/v hooks on fake-quantized LoRA layers, sharded
    stages = [PRUNE[1], distill(steps=4, grad_accum=2, save_every=2, eval_data="heldout"),
              distill(steps=3, trainable="lora", lora={"r": 4, "alpha": 8}, lr=1e-2, save_every=2), qat]
    one = run(parse_recipe(recipe(tmp_path / "one", model, stages)))
    path = tmp_path / "two" / "r.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(recipe(tmp_path / "two", model, stages))
    proc = _launch(path, "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                   "--fsdp_state_dict_type", "SHARDED_STATE_DICT")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two = json.loads((tmp_path / "two" / "out" / "llmslim_report.json").read_text())
    assert two["check"]["passed"], two["check"]
    # qat starts on the W4 grid from weights that carry the earlier stages' float noise: an integer on a
    # rounding tie may go either way (measured: 0.5 % of the packed words, the loss 4e-4 apart at step 1)
    for s1, s2 in zip(one["stages"][1:], two["stages"][1:], strict=True):
        n1, n2, rel = s1["notes"], s2["notes"], 1e-4 if s1["method"] == "distill" else 2e-3
        assert n2["processes"] == 2 and n2["sharding"] == "FSDP2 over 2 processes" and "sharded" in s2["peak_note"]
        assert [p["loss"] for p in n2["curve"]] == pytest.approx([p["loss"] for p in n1["curve"]], rel=rel)
        assert [e["ppl"] for e in n2.get("eval", [])] == pytest.approx([e["ppl"] for e in n1.get("eval", [])],
                                                                       rel=rel)
    assert "attention" in two["stages"][3]["notes"]["curve"][0]
    a, b = Checkpoint(one["output"]), Checkpoint(tmp_path / "two" / "out")
    ta, tb = a.read(a.names), b.read(b.names)
    assert ta.keys() == tb.keys() and "model.embed_tokens.weight" in ta
    packed = [n for n in ta if n.endswith("weight_packed")]
    for n in set(ta) - set(packed):  # embeddings and norms (distill), scales (qat's start on them)
        torch.testing.assert_close(ta[n], tb[n], rtol=1e-4, atol=1e-5)
    words = sum(ta[n].numel() for n in packed)  # 8 integers each
    assert sum(int((ta[n] != tb[n]).sum()) for n in packed) <= words // 50
    # what the adapters moved, counted on the gathered model (0 if they had not been gathered)
    moved = [int(s["stages"][3]["notes"]["integers_changed_by_training"].split(" of ")[0].replace(",", ""))
             for s in (one, two)]
    assert moved[0] > 20 and abs(moved[0] - moved[1]) <= moved[0] // 5, moved


def test_offloaded_teacher_computes_what_the_teacher_in_memory_does(tiny):
    from llmslim.training.teacher import Teacher

    ckpt = Checkpoint(tiny("qwen3"))
    tokens = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    in_memory = Teacher(ckpt, torch.float32, torch.device("cpu"), layers=[0, 2], qkv_layers=[0, 2])
    offloaded = Teacher(ckpt, torch.float32, torch.device("cpu"), offload=True, layers=[0, 2], qkv_layers=[0, 2])
    (l1, h1, p1), (l2, h2, p2) = in_memory(tokens), offloaded(tokens)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    assert set(h1) == set(h2) == {0, 2}
    for i in h1:
        torch.testing.assert_close(h1[i], h2[i], rtol=1e-5, atol=1e-5)
    # the q/k/v projections of the attention term, hooked on each layer as the offloaded teacher loads it
    assert set(p1) == set(p2) == {0, 2} and all(set(p1[i]) == {"q_proj", "k_proj", "v_proj"} for i in p1)
    for i in p1:
        for name in p1[i]:
            torch.testing.assert_close(p1[i][name], p2[i][name], rtol=1e-5, atol=1e-5)
    assert p1[2]["q_proj"].shape == (2, 24, 128) and p1[2]["k_proj"].shape == (2, 24, 64)  # GQA: 2 KV heads of 4
    with torch.no_grad():  # the projections themselves, before RoPE (and Qwen3's q/k norms)
        m = in_memory.model.model
        attn, x = m.layers[0].self_attn, m.layers[0].input_layernorm(m.embed_tokens(tokens))
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(p1[0][name], getattr(attn, name)(x), rtol=1e-6, atol=1e-6)
    assert "one layer at a time" in offloaded.describe()
    assert all(p.is_meta for p in offloaded.lazy.layers[1].parameters())  # nothing kept between calls


def test_gradient_checkpointing_and_teacher_offload_train_the_same(tiny_tok, tmp_path):
    base = distill(steps=3, loss={"logits": 1.0, "hidden": 0.5, "attention": 1.0})
    plain = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("llama"), [PRUNE[1], base])))
    other = run(parse_recipe(recipe(tmp_path / "b", tiny_tok("llama"),
                                    [PRUNE[1], {**base, "gradient_checkpointing": True, "teacher_offload": True}])))
    ca, cb = plain["stages"][1]["notes"]["curve"], other["stages"][1]["notes"]["curve"]
    assert [p["loss"] for p in ca] == pytest.approx([p["loss"] for p in cb], rel=1e-4)
    assert "one layer at a time" in other["stages"][1]["peak_note"] and "attention" in ca[0]


# ---------------------------------------------------------------- refusals


def _other_vocab_model(tiny, tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**json.loads((tiny("llama") / "config.json").read_text()), "vocab_size": 600})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "other")
    return tmp_path / "other"


@pytest.mark.parametrize("stage, message", [
    (distill(steps=0), r"stages\[0\]\.steps: input should be greater than 0"),
    (distill(loss={"logits": 0, "hidden": 0, "lm": 0}), r"every term has weight 0"),
    (distill(batch_size=6, grad_accum=4), r"batch_size 6 is not a multiple of grad_accum 4"),
    (distill(loss={"hidden": 1.0}, hidden_layers={}), r"stages\[0\]\.hidden_layers: hidden_layers is empty"),
    (distill(loss={"hidden": 1.0}, hidden_layers={7: 0}), r"student layer 7 does not exist"),
    (distill(eval_every=5), r"eval_every needs eval_data"),
    (distill(eval_data="nowhere"), r"stages\[0\]\.eval_data: no data source named 'nowhere'"),
    (distill(teacher_topk=8, loss={"logits": 1, "hidden": 1}), r"teacher_topk caches logits only"),
])
def test_bad_distill_recipes_get_one_line(tiny_tok, tmp_path, stage, message):
    with pytest.raises(RecipeError, match=message):
        r = parse_recipe(recipe(tmp_path, tiny_tok("llama"), [stage]))
        prepare(r, Workspace(r.spec.output))


def test_a_teacher_with_another_vocabulary_is_refused(tiny_tok, tiny, tmp_path):
    other = _other_vocab_model(tiny, tmp_path)
    r = parse_recipe(recipe(tmp_path / "r", tiny_tok("llama"), [distill(teacher=str(other))]))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.teacher: the teacher's vocabulary has 600 tokens and the "
                                          r"student's 512"):
        prepare(r, Workspace(r.spec.output))
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_tok("llama"), swapped)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(swapped)
    tok.add_tokens(["zebra", "yak"])  # ids beyond the trained vocabulary: different token -> id maps
    tok.save_pretrained(swapped)
    r = parse_recipe(recipe(tmp_path / "s", tiny_tok("llama"), [distill(teacher=str(swapped))]))
    with pytest.raises(RecipeError, match=r"teacher: the teacher's tokenizer .* maps tokens to ids differently"):
        prepare(r, Workspace(r.spec.output))


# ---------------------------------------------------------------- vLLM


@pytest.mark.vllm
def test_distilled_export_serves_in_vllm_like_transformers(tiny_tok, tmp_path):
    stages = PRUNE + [distill(steps=6, loss={"logits": 1.0, "lm": 0.1}, teacher_topk=16)]
    report = run(parse_recipe(recipe(tmp_path / "a", tiny_tok("qwen3"), stages, export={"check": "vllm"})))
    assert report["check"]["passed"] and report["check"]["generated"], report["check"]
    assert "agree on 4 x 32 greedy tokens" in report["check"]["detail"]
    cache = list((tmp_path / "a" / "out.work").rglob("teacher-topk/*.safetensors"))
    assert not cache  # the cache lived in the stage's scratch directory, removed with it
    w = load_file(str(next(Path(report["output"]).glob("*.safetensors"))))
    assert all(v.dtype == torch.float32 for v in w.values())

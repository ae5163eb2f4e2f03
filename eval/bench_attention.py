"""Attention-transfer benchmark: does `loss.attention` (MiniLMv2 self-attention relations) help distillation
after prune_heads, at the same steps and tokens as logits alone?

    .venv/bin/python eval/bench_attention.py                       # stories260K (about 10 minutes on 2 cores)
    .venv/bin/python eval/bench_attention.py --model smollm2 --smollm2-model DIR

The cut: prune_heads by activation, stories260K 8 -> 4 heads (KV 4 -> 2), SmolLM2-135M 9 -> 6 (KV 3 -> 2).
Then distill stages from the same cut model with the same batches, schedule (cosine, 10 % warm-up), lr,
steps and tokens, the original model as teacher:
- logits: KL(teacher || student) at T 1 (the default);
- logits + attention, for each weight w in --attention-weights: the same plus w x the relation term
  (Q-Q, K-K, V-V at every layer, the default relation heads: 2 for both models). At the cut the term is
  an order of magnitude above the logits KL (stories260K: 10 against 0.8), hence the smaller weight.
Text: stories260K as eval/bench_distill.py (calibration and training from the first half of
../shared/data/tinystories/dev.txt, perplexity on the second half in 512-token windows); SmolLM2 as
eval/bench_smollm2.py's prune section (WikiText-2 valid for calibration, 16 x 512, and training,
perplexity on the first 32 x 512 tokens of test.txt). --smollm2-model: the float32 conversion of the
GGUF (bench_smollm2 makes one in its --work folder; without the flag this script converts one into
--work). Float32, everything in this process.

Prints the table (perplexity after the cut, after training, the share of the cut's gap won back, the
last step's logits KL and training seconds) and writes eval/results/bench_attention.MODEL.json. Exit 1
if a run fails; which way the comparison goes is the result, not a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from stories_runs import MODEL as STORIES
from stories_runs import REPO, SHARED
from stories_runs import TEXT as TINYSTORIES

WIKI = SHARED / "data" / "wikitext-2"
SETTINGS = {  # per model: the cut (KV heads kept) and the training budget
    "stories260k": {"kv_heads": 2, "steps": 80, "batch_size": 16, "seq_len": 256, "lr": 3e-3},
    "smollm2": {"kv_heads": 2, "steps": 60, "batch_size": 8, "seq_len": 256, "lr": 1e-4},
}


def data(model: str, seq_len: int) -> dict[str, Any]:
    if model == "stories260k":
        return {"calib": {"path": str(TINYSTORIES), "fraction": [0.0, 0.5], "samples": 128, "seq_len": 512},
                "train": {"path": str(TINYSTORIES), "fraction": [0.0, 0.5], "seq_len": seq_len},
                "heldout": {"path": str(TINYSTORIES), "fraction": [0.5, 1.0], "seq_len": 512}}
    return {"calib": {"path": str(WIKI / "valid.txt"), "samples": 16, "seq_len": 512},
            "train": {"path": str(WIKI / "valid.txt"), "seq_len": seq_len},
            "heldout": {"path": str(WIKI / "test.txt"), "samples": 32, "seq_len": 512}}


def run_one(args: argparse.Namespace, name: str, loss: dict[str, float]) -> dict[str, Any]:
    """prune_heads then distill with `loss`, exported and checked in transformers: the row's numbers."""
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    s = args.settings
    stages = [{"method": "prune_heads", "kv_heads": s["kv_heads"], "criterion": "activation", "data": "calib"},
              {"method": "distill", "data": "train", "steps": s["steps"], "batch_size": s["batch_size"],
               "lr": s["lr"], "warmup": max(1, s["steps"] // 10), "schedule": "cosine", "loss": loss,
               "eval_data": "heldout", "save_every": s["steps"]}]
    recipe = {"model": str(args.model_dir), "output": str(args.work / name), "seed": 0, "dtype": "float32",
              "data": data(args.model, s["seq_len"]), "stages": stages, "export": {"check": "transformers"},
              "eval": {"perplexity": ["heldout"]}}
    started = time.perf_counter()
    report = run(parse_recipe(yaml.safe_dump(recipe, sort_keys=False), f"{name}.yaml"), fresh=True, replace_output=True)
    seconds = time.perf_counter() - started
    notes = report["stages"][1]["notes"]
    out = {"name": name, "loss": loss, "original": report["eval"]["before"]["perplexity"]["heldout"]["ppl"],
           "cut": notes["eval"][0]["ppl"], "trained": notes["eval"][-1]["ppl"],
           "export": report["eval"]["after"]["perplexity"]["heldout"]["ppl"], "check": report["check"]["passed"],
           "tokens": notes["tokens_seen"], "train_s": notes["train_seconds"], "seconds": round(seconds, 1),
           "last": notes["curve"][-1], "first": notes["curve"][0], "attention_note": notes.get("attention"),
           "params": report["size"]["after"]["params"]}
    out["recovered"] = (out["cut"] - out["trained"]) / (out["cut"] - out["original"])
    print(f"  {name}: perplexity {out['trained']:.3f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="stories260k")
    parser.add_argument("--smollm2-model", type=Path, help="SmolLM2-135M converted to float32 (a directory)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmslim-bench-attention"))
    parser.add_argument("--steps", type=int, help="training steps (default: 80 stories260K, 60 SmolLM2)")
    parser.add_argument("--lr", type=float, help="peak lr of both runs (default: 3e-3 stories260K, 1e-4 SmolLM2)")
    parser.add_argument("--attention-weights", default="1,0.1", help="weights of the attention term, one run each "
                        "(comma separated)")
    args = parser.parse_args(argv)
    args.settings = {**SETTINGS[args.model], **{k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v}}
    args.work = args.work.resolve() / args.model
    if args.model == "stories260k":
        args.model_dir = STORIES
    else:
        from bench_ptq import smollm2_model

        args.model_dir = args.smollm2_model or smollm2_model(args.work)
    for path in (args.model_dir, TINYSTORIES if args.model == "stories260k" else WIKI / "valid.txt"):
        if not path.exists():
            print(f"skipped: {path} not found (set LLMSLIM_SHARED, or --smollm2-model)")
            return 0
    import transformers

    transformers.utils.logging.set_verbosity_error()
    runs = [run_one(args, "logits", {"logits": 1.0})]
    for w in (float(x) for x in args.attention_weights.split(",")):
        runs.append(run_one(args, f"logits+attention-{w:g}", {"logits": 1.0, "attention": w}))
    s = args.settings
    head = (f"{args.model}: prune_heads (KV heads -> {s['kv_heads']}, activation), {runs[0]['params']:,} parameters; "
            f"distill {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens ({runs[0]['tokens']:,} "
            f"tokens), lr {s['lr']:g}, cosine; perplexity of the original {runs[0]['original']:.3f}, after the cut "
            f"{runs[0]['cut']:.3f}.")
    lines = [head, "", "| loss | ppl after training | export | gap won back | logits KL (last step) | "
             "attention term (first -> last) | train s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        label = " + ".join(f"{k} {v:g}" for k, v in r["loss"].items())
        att = (f"{r['first']['attention']:.4f} -> {r['last']['attention']:.4f}" if "attention" in r["last"] else "-")
        lines.append(f"| {label} | {r['trained']:.3f} | {r['export']:.3f} | {100 * r['recovered']:.1f} % | "
                     f"{r['last']['logits']:.4f} | {att} | {r['train_s']:.0f} |")
    best = min(runs[1:], key=lambda r: r["trained"])
    better = best["trained"] < runs[0]["trained"]
    lines += ["", f"The best attention run ({best['name']}) is {'better' if better else 'not better'} than logits "
                  f"alone ({best['trained']:.3f} against {runs[0]['trained']:.3f}); {best['attention_note']}."]
    print("\n".join(lines))
    results = REPO / "eval" / "results" / f"bench_attention.{args.model}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["eval/bench_attention.py", *(argv if argv is not None else sys.argv[1:])])
    results.write_text(json.dumps({"command": command, "settings": s, "runs": runs, "attention_better": better,
                                   "table": "\n".join(lines)}, indent=2, default=str) + "\n")
    print(f"\nwrote {results.relative_to(REPO)}", file=sys.stderr)
    return 0 if all(r["check"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

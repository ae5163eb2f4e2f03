"""Serving benchmark: a baseline and its compressed exports in vLLM, side by side, in one run.

    .venv/bin/python eval/bench_serving.py --baseline BASE_DIR --model PRUNED_DIR --model W8A8_DIR \\
        [--batch-sizes 1,8] [--prompt-len 128] [--gen-len 128] [--repeats 3] [--warmup 1]

Each model is served by vLLM's offline engine in its own process (llmslim.evaluate.throughput): random
token prompts, every request generating exactly --gen-len tokens, warm-up runs excluded, median and
min-max of the timed runs. A model this machine cannot serve is listed with the reason instead of
numbers (on CPU: head_dim outside vLLM's CPU attention set, or W4A16, whose kernel exists only in the
AVX-512 build); on a GPU machine the same command measures W4A16 exports too.

Prints one table per batch size with ratios against the baseline (rates: above 1 is faster; TTFT, ITL
and memory: below 1 is better) and writes eval/results/bench_serving.json (command, environment, the
full llmslim-eval report) plus report.md and plots in eval/results/bench_serving/.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "eval" / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def _noisy(spread: dict[str, Any]) -> bool:
    from llmslim.evaluate.throughput import UNSTABLE

    return bool(spread.get("min") and spread["max"] / spread["min"] > UNSTABLE)


def table(report: dict[str, Any], batch_size: int) -> list[str]:
    """A markdown table of one batch size: one row per model, ratios against the baseline."""
    models = report["models"]
    base = models[0]

    def batch(m: dict[str, Any]) -> dict[str, Any] | None:
        t = (m.get("throughput") or {}).get("vllm") or {}
        return next((b for b in t.get("batches", []) if b["batch_size"] == batch_size), None) if t.get("ok") else None

    # (column, value, the timed runs' spread when the value is a median of them)
    cols = [("decode tok/s", lambda b: b["decode_tok_s"]["median"], "decode_tok_s"),
            ("prefill tok/s", lambda b: b["prefill_tok_s"]["median"], "prefill_tok_s"),
            ("requests/s", lambda b: b["requests_s"]["median"], "requests_s"),
            ("TTFT p50 ms", lambda b: b["ttft_s"]["p50"] * 1e3, None),
            ("ITL p50 ms", lambda b: b["itl_s"]["p50"] * 1e3, None),
            ("peak RSS MB", lambda b: b["peak_rss_bytes"] / 1e6, None)]
    head = ["model", "weights MB"] + [c for name, _, _ in cols for c in (name, "ratio")]
    lines = [f"### batch size {batch_size}", "", "| " + " | ".join(head) + " |",
             "|---" + "|---:" * (len(head) - 1) + "|"]
    ref = batch(base)
    for m in models:
        b = batch(m)
        cells = [m["name"] + (" (baseline)" if m is base else ""), f"{m['size']['weight_bytes'] / 1e6:.2f}"]
        for _, get, key in cols:
            if b is None:
                cells += ["-", "-"]
                continue
            v = get(b)
            r = get(ref) if ref else None
            mark = " †" if key and _noisy(b[key]) else ""
            cells += [(f"{v:,.1f}" if v >= 10 else f"{v:.3g}") + mark, f"{v / r:.3f}x" if r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for m in models:
        t = (m.get("throughput") or {}).get("vllm") or {}
        if not t.get("ok"):
            lines.append(f"\n{m['name']}: not measured: {t.get('error', 'not run')}")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="the uncompressed model directory")
    p.add_argument("--model", action="append", required=True, help="a compressed export (repeatable)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", type=Path, default=RESULTS / "bench_serving.json", help="where the JSON goes")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_serving", help="report.md and plots")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    from llmslim.errors import UserError
    from llmslim.evaluate.harness import EvalRequest, run_eval
    from llmslim.evaluate.throughput import ThroughputSettings

    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench_serving.py", *argv])
    settings = ThroughputSettings(batch_sizes=tuple(args.batch_sizes), prompt_len=args.prompt_len,
                                  gen_len=args.gen_len, repeats=args.repeats, warmup=args.warmup)
    started = time.perf_counter()
    try:
        report = run_eval(EvalRequest(models=args.model, baseline=args.baseline, out=args.out, backends=["vllm"],
                                      throughput=settings, command=command))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [f"# Serving benchmark (vLLM, {report['environment']['device']})", "",
             f"{args.prompt_len} prompt + {args.gen_len} generated tokens per request; {args.warmup} warm-up, "
             f"{args.repeats} timed runs per batch size (medians); ratios against {report['baseline']}.", ""]
    for bs in args.batch_sizes:
        lines += table(report, bs)
    kv = [(m["name"], ((m["throughput"].get("vllm") or {}).get("kv_cache") or {}).get("tokens")) for m in report["models"]]
    lines += ["KV-cache capacity (tokens): " + ", ".join(f"{n} {t:,}" if t else f"{n} -" for n, t in kv), ""]
    loads = [t["load_avg"] for m in report["models"] if (t := m["throughput"].get("vllm") or {}).get("load_avg")]
    if loads:
        lines += [f"Load average during the runs: {min(x['min'] for x in loads):.2f}–{max(x['max'] for x in loads):.2f} "
                  f"on {report['models'][0]['throughput']['vllm'].get('cpus')} CPUs. † the timed runs of that median "
                  "differ by more than 1.5x (other work competing for the machine): treat its ratio with care.", ""]
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, "seconds": round(time.perf_counter() - started, 1),
                                     "tables": lines, "report": report}, indent=2) + "\n")
    print(f"wrote {args.json} and {args.out}/report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

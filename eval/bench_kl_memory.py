"""Peak memory of the logits distillation loss at Llama-3's vocabulary: llmslim's chunked KL against the plain one.

    .venv/bin/python eval/bench_kl_memory.py [--vocab 128256] [--tokens 8192] [--small-tokens 2048] [--chunk 8192]

One distillation step's loss part: student logits [tokens, vocab] that require grad and teacher logits
(random normal x 3, built in blocks so that no float32 copy of them ever exists), forward and backward of
KL(teacher || student) at T 1; the gradient ends in student.grad. Each row runs in a fresh process; its
"peak above inputs" is the process's peak resident memory during the step (VmHWM, reset once the inputs
exist) minus its resident memory just before: what the loss adds to the two logit tensors, the one
[tokens, vocab] gradient (in the logits' dtype) included. Formulations:
- ours: llmslim.training.losses.kl_logits (vocabulary chunk --chunk);
- ours, masked: the same with a mask that keeps every other token;
- plain: F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
  reduction="batchmean"), float32 math as autocast runs log_softmax on a GPU.
Rows at --tokens (ours, bf16) and at --small-tokens (both, bf16 and float32): plain at 8192 tokens needs
more memory than these shared 24 GiB machines give one job (its per-token cost, measured at
--small-tokens, is printed multiplied out: every tensor it allocates is [tokens, vocab], so it is linear
in tokens).

Prints the table and writes eval/results/bench_kl_memory.json. Exit 1 if ours adds more than its gradient
and six float32 [tokens, chunk] blocks (plus 64 MiB of allocator slack), or if ours and plain disagree on
the loss (relative difference > 1e-4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "eval" / "results" / "bench_kl_memory.json"
GB = 1e9
SLACK = 64 * 2**20  # allocator and interpreter noise in a resident-memory measurement
DTYPES = {"bf16": "bfloat16", "f32": "float32"}


def _status(key: str) -> int:
    """A /proc/self/status memory line (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(kind: str, dtype_name: str, tokens: int, vocab: int, chunk: int) -> dict:
    """Run one step in this (fresh) process and return its measurements."""
    sys.path.insert(0, str(REPO))  # this checkout's llmslim
    import torch
    import torch.nn.functional as F

    from llmslim.training import losses

    dtype = getattr(torch, DTYPES[dtype_name])

    def logits(seed: int) -> torch.Tensor:
        out = torch.empty(tokens, vocab, dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        for i in range(0, tokens, 256):  # float32 blocks of 256 rows, never a whole float32 copy
            out[i: i + 256] = torch.randn(min(256, tokens - i), vocab, generator=g).mul_(3)
        return out

    student, teacher = logits(0).requires_grad_(), logits(1)
    mask = torch.arange(tokens) % 2 == 0 if kind == "ours-masked" else None
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the step alone
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if kind == "plain":
        loss = F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                        reduction="batchmean")
    else:
        loss = losses.kl_logits(student, teacher, chunk=chunk, mask=mask)
    loss.backward()
    seconds = time.perf_counter() - t0
    assert student.grad is not None and student.grad.dtype == dtype
    return {"kind": kind, "dtype": dtype_name, "tokens": tokens, "vocab": vocab, "chunk": chunk,
            "inputs_bytes": 2 * student.numel() * student.element_size(), "before_bytes": before,
            "peak_above_inputs_bytes": _status("VmHWM") - before, "seconds": round(seconds, 2),
            "loss": float(loss.detach())}


def measure(kind: str, dtype: str, tokens: int, vocab: int, chunk: int) -> dict:
    """child() in a fresh interpreter (an earlier row's freed memory must not count)."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, dtype, str(tokens), str(vocab), str(chunk)],
                         cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{kind} {dtype} {tokens} tokens failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {kind} {dtype} {tokens} tokens: {row['peak_above_inputs_bytes'] / GB:.2f} GB above the inputs, "
          f"{row['seconds']:.1f} s", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary (Llama-3: 128,256)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the large rows (ours)")
    parser.add_argument("--small-tokens", type=int, default=2048, help="tokens of the side-by-side rows")
    parser.add_argument("--chunk", type=int, default=8192, help="vocabulary chunk of ours (the recipe default)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, dtype, tokens, vocab, chunk = args.child
        print(json.dumps(child(kind, dtype, int(tokens), int(vocab), int(chunk))))
        return 0
    v, small = args.vocab, args.small_tokens
    plan = [("ours", "bf16", args.tokens), ("ours-masked", "bf16", args.tokens),
            ("ours", "bf16", small), ("plain", "bf16", small), ("ours", "f32", small), ("plain", "f32", small)]
    rows = [measure(kind, dtype, n, v, args.chunk) for kind, dtype, n in plan]
    names = {"ours": "ours (chunked)", "ours-masked": "ours, mask keeps 1/2", "plain": "plain F.kl_div"}
    lines = [f"vocabulary {v:,}, one step (forward + backward of the loss), T 1; peak resident memory above the "
             f"two logit tensors; chunk {args.chunk:,}.", "",
             "| formulation | logits | tokens | logit tensors | peak above them | in float32 [tokens x V] | time |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        f32 = r["tokens"] * v * 4
        lines.append(f"| {names[r['kind']]} | {r['dtype']} | {r['tokens']:,} | {r['inputs_bytes'] / GB:.2f} GB | "
                     f"{r['peak_above_inputs_bytes'] / GB:.2f} GB | {r['peak_above_inputs_bytes'] / f32:.2f} | "
                     f"{r['seconds']:.1f} s |")
    checks = {}
    for r in rows:
        if r["kind"].startswith("ours"):
            grad = r["inputs_bytes"] // 2
            bound = grad + 6 * r["tokens"] * args.chunk * 4 + SLACK
            checks[f"{r['kind']} {r['dtype']} {r['tokens']} tokens: at most its gradient + 6 float32 "
                   f"[tokens x chunk] blocks ({bound / GB:.2f} GB)"] = r["peak_above_inputs_bytes"] <= bound
    for dtype in DTYPES:
        pair = [r for r in rows if r["tokens"] == small and r["dtype"] == dtype and r["kind"] in ("ours", "plain")]
        if len(pair) == 2:
            rel = abs(pair[0]["loss"] - pair[1]["loss"]) / abs(pair[1]["loss"])
            checks[f"{dtype}: ours and plain agree on the loss (rel. diff {rel:.1e} <= 1e-4)"] = rel <= 1e-4
    plain = next((r for r in rows if r["kind"] == "plain" and r["dtype"] == "bf16"), None)
    if plain:
        at_large = plain["peak_above_inputs_bytes"] / plain["tokens"] * args.tokens
        lines += ["", f"plain, bf16, multiplied out to {args.tokens:,} tokens (linear in tokens, not measured): "
                      f"{at_large / GB:.1f} GB above the logit tensors."]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": " ".join(["eval/bench_kl_memory.py", *(argv or sys.argv[1:])]),
                                   "rows": rows, "checks": checks, "table": "\n".join(lines)}, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}", file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

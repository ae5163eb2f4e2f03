"""The `llmslim` command: run, validate, check, eval, serve, push, convert.

Exit codes: 0 done; 2 a user error or a refusal (one line each, no traceback), also for file-system
errors (full disk, permissions) and a failed push (the export is kept); 3 the export was written but a
measurement the recipe asked for failed; 130 interrupted (Ctrl-C), with a note on how to resume. `serve`:
0 stopped by SIGTERM, 130 by Ctrl-C, 1 the server died (the end of its log in one line). Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .errors import UserError
from .progress import Progress, Task

log = logging.getLogger("llmslim")


# ---------------------------------------------------------------- display


class RichTask(Task):
    def __init__(self, bar: Any, description: str, total: int | None):
        super().__init__(description, total)
        self._bar = bar
        self._id = bar.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        super().advance(n)
        self._bar.advance(self._id, n)

    def note(self, text: str) -> None:
        super().note(text)
        self._bar.update(self._id, description=f"{self.description}  {text}")

    def close(self) -> None:  # the bar itself is the record; no extra log line
        total = self.total if self.total is not None else 1
        self._bar.update(self._id, total=total, completed=total)
        self._bar.stop_task(self._id)


class RichProgress(Progress):
    """Live progress bars on the terminal (stderr), one per task."""

    def __init__(self, console: Any):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bars

        self.bars = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         console=console, transient=False)

    def task(self, description: str, total: int | None = None) -> Task:
        return RichTask(self.bars, description, total)


def _setup(quiet: bool) -> tuple[Any, Progress]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # tqdm reads TQDM_* when it is imported (by transformers, below): compressed-tensors' own bars would
    # interleave with our display
    os.environ.setdefault("TQDM_DISABLE", "1")
    import transformers
    from rich.console import Console
    from rich.logging import RichHandler

    transformers.utils.logging.disable_progress_bar()  # our own progress display replaces tqdm bars
    transformers.utils.logging.set_verbosity_error()
    console = Console(stderr=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file "saved" lines at every checkpoint
    if int(os.environ.get("RANK", "0")) > 0:  # not the main process of a multi-process launch: warnings only
        logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ['RANK']}] %(message)s", stream=sys.stderr)
        return console, Progress()
    if quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
        return console, Progress()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    return console, RichProgress(console)


def _stdout() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def plan_table(rows: list) -> Any:
    from rich.table import Table

    from .report import human_bytes

    table = Table(title="plan")
    for col in ("stage", "layers", "heads", "KV", "head_dim", "FFN", "experts", "params", "bytes"):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for r in rows:
        s = r.shape
        experts = f"{s.experts} (top-{s.top_k})" if s.experts else "-"
        ffn = f"{s.ffn}" + (f" + shared {s.shared_ffn}" if s.shared_ffn else "")
        table.add_row(r.label, str(s.layers), str(s.heads), str(s.kv_heads), str(s.head_dim), ffn, experts,
                      f"{r.params:,}", human_bytes(r.bytes))
    return table


def summary_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    from .report import human_bytes, human_count

    table = Table(title=f"llmslim: {report['model']} -> {report['output']}")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="left" if not col else "right")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}x" if b else "-"

    size = report["size"]
    table.add_row("parameters", human_count(size["before"]["params"]), human_count(size["after"]["params"]),
                  ratio(size["after"]["params"], size["before"]["params"]))
    table.add_row("bytes on disk", human_bytes(size["before"]["bytes"]), human_bytes(size["after"]["bytes"]),
                  ratio(size["after"]["bytes"], size["before"]["bytes"]))
    before = report["eval"]["before"].get("perplexity", {})
    after = report["eval"]["after"].get("perplexity", {})
    for name, b in before.items():
        a = after.get(name)
        table.add_row(f"perplexity ({name})", f"{b['ppl']:.4f}", f"{a['ppl']:.4f}" if a else "-",
                      ratio(a["ppl"], b["ppl"]) if a else "-")
    for s in report["stages"]:
        table.add_row(f"stage {s['index']}: {s['method']}", f"{s['seconds']:.1f} s", "", "")
    if report.get("check"):
        c = report["check"]
        table.add_row(f"check ({c['backend']})", "passed" if c["passed"] else "FAILED", "", "")
    return table


# ---------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace, console: Any, progress: Progress) -> int:
    from .pipeline import Workspace, validate
    from .recipe import load_recipe

    if args.stand_in:
        return _validate_stand_in(args, console)
    recipe = load_recipe(args.recipe, args.set)
    rows = validate(recipe, Workspace(recipe.spec.output), replace_output=args.replace_output)
    _stdout().print(plan_table(rows))
    console.print(f"{args.recipe}: valid, {len(recipe.stages)} stage(s)")
    return 0


def _validate_stand_in(args: argparse.Namespace, console: Any) -> int:
    from .standin import describe, validate_stand_in

    result = validate_stand_in(args.recipe, args.set)
    out = _stdout()
    out.print(f"model config: {result.config_source}")
    out.print(f"  {describe(result.real_config)}")
    out.print(plan_table(result.real_rows))
    out.print(f"stand-in (tiny random weights, same architecture): {describe(result.stand_in_config)}")
    out.print(plan_table(result.stand_in_rows))
    if result.data_not_read:
        out.print("data not read (validation never loads data): " + ", ".join(result.data_not_read))
    console.print(f"{args.recipe}: valid on a stand-in of {result.real_config.model_type} (not the real weights), "
                  f"{len(result.real_rows) - 1} stage(s); the first table is the plan for the real model")
    return 0


def cmd_run(args: argparse.Namespace, console: Any, progress: Progress) -> int:
    from contextlib import nullcontext

    from .pipeline import run
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    out = _stdout()
    bars = getattr(progress, "bars", None)
    with bars if bars is not None else nullcontext():
        report = run(recipe, fresh=args.fresh, replace_output=args.replace_output, progress=progress,
                     on_plan=lambda rows: out.print(plan_table(rows)))
    if report.get("follower"):  # another process of `accelerate launch`: the main one reports
        return 0
    out.print(summary_table(report))
    out.print(f"export: {report['output']}  (report: {report['output']}/llmslim_report.md)")
    if report.get("push"):
        pushed = report["push"]
        out.print(f"pushed to {pushed['repo_url']}: " + (f"pull request {pushed['pr_url']}" if pushed.get("pr_url")
                                                         else f"commit {pushed['commit_oid']}"))
    return 0


def cmd_check(args: argparse.Namespace, console: Any, progress: Progress) -> int:
    from pathlib import Path

    from .check import check_export
    from .export import verify_shapes

    path = Path(args.dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{args.dir}: not a model directory (no config.json)")
    n = verify_shapes(path)
    with progress.track(f"checking {args.dir} ({args.backend})", None):
        result = check_export(path, args.backend)
    print(f"{args.dir}: {n} tensors match config.json; {result.detail}")
    return 0


def cmd_push(args: argparse.Namespace, console: Any, progress: Progress) -> int:
    from .hub import push, summary_lines
    from .recipe import PushConfig

    if args.create_pr and args.revision:
        raise UserError("--create-pr opens a pull request against main; drop --revision, or --create-pr")
    # unvalidated: push() checks the repository id and says which argument is wrong in one line
    req = PushConfig.model_construct(repo_id=args.repo_id, private=args.private, revision=args.revision,
                                     commit_message=args.commit_message, create_pr=args.create_pr,
                                     exist_ok=args.exist_ok)
    result = push(args.dir, req, dry_run=args.dry_run)
    print("\n".join(summary_lines(result, args.dry_run)))
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, found {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, found {text!r}")
    return values


def cmd_eval(args: argparse.Namespace, console: Any, progress: Progress) -> int:
    from contextlib import nullcontext
    from pathlib import Path

    from .evaluate.harness import EvalRequest, run_eval
    from .evaluate.throughput import ThroughputSettings

    backends = list(dict.fromkeys(args.backend or (["vllm"] if args.throughput else [])))
    tput = ThroughputSettings(batch_sizes=tuple(args.batch_sizes), prompt_len=args.prompt_len, gen_len=args.gen_len,
                              repeats=args.repeats, warmup=args.warmup, seed=args.seed, dtype=args.dtype)
    req = EvalRequest(models=args.model, baseline=args.baseline, out=Path(args.out), ppl=args.ppl or [],
                      seq_len=args.seq_len, stride=args.stride, samples=args.samples, dtype=args.dtype,
                      backends=backends, throughput=tput, tasks=[t for x in args.tasks for t in x.split(",") if t],
                      task_limit=args.task_limit, num_fewshot=args.num_fewshot, draft=args.draft,
                      spec_tokens=args.spec_tokens)
    bars = getattr(progress, "bars", None)
    with bars if bars is not None else nullcontext():
        run_eval(req, progress)
    out = Path(args.out)
    print((out / "report.md").read_text())
    pngs = sorted(p.name for p in out.glob("*.png"))
    console.print(f"report: {out / 'report.json'}, {out / 'report.md'}" + (f"; plots: {', '.join(pngs)}" if pngs else ""))
    return 0


def cmd_convert(args: argparse.Namespace, console: Any, progress: Progress) -> int:
    from contextlib import nullcontext
    from pathlib import Path

    from .checkpoint import DTYPES, parse_size
    from .gguf import convert_gguf

    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    bars = getattr(progress, "bars", None)
    with bars if bars is not None else nullcontext():
        record = convert_gguf(Path(args.file), Path(args.out), dtype=dtype, progress=progress,
                              max_shard_bytes=parse_size(args.max_shard_size))
    print(f"{args.out}: {record['source']['description']} converted to {record['dtype']} safetensors "
          f"({record['source']['architecture']}; tokenizer{' and chat template' if record['chat_template'] else ''} "
          "from the metadata)")
    return 0


def cmd_serve(args: argparse.Namespace, console: Any, progress: Progress) -> int:
    from .serve import serve

    def say(text: str) -> None:
        print(text, flush=True)

    return serve(args.model, host=args.host, port=args.port, max_model_len=args.max_model_len,
                 kv_cache_gib=args.kv_cache_gib, served_model_name=args.served_model_name, extra=args.extra,
                 dry_run=args.dry_run, say=say, draft=args.draft, spec_tokens=args.spec_tokens)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmslim", description="Compress LLMs with one YAML recipe; export for vLLM.")
    sub = p.add_subparsers(dest="command", required=True)

    def add_overrides(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                         help="override a recipe field, e.g. --set stages.0.count=2 (repeatable)")

    r = sub.add_parser("run", help="run a recipe: stages, export, check, report")
    r.add_argument("recipe")
    add_overrides(r)
    r.add_argument("--replace-output", action="store_true",
                   help="when `output` holds something llmslim did not write, move it aside (renamed "
                        "<output>.replaced-<time>, never deleted) instead of refusing")
    r.add_argument("--fresh", action="store_true",
                   help="discard earlier progress and the earlier export of this output (only what llmslim wrote)")
    r.add_argument("--quiet", action="store_true", help="log lines only, no live display")
    v = sub.add_parser("validate", help="validate a recipe and print the plan; runs nothing")
    v.add_argument("recipe")
    add_overrides(v)
    v.add_argument("--replace-output", action="store_true", help="as for run")
    v.add_argument("--stand-in", action="store_true",
                   help="for a model not on this machine: plan it from its config.json (local, the Hugging Face "
                        "cache or bundled with llmslim) and validate the recipe on a tiny random model of the "
                        "same architecture; offline")
    v.add_argument("--quiet", action="store_true")
    k = sub.add_parser("convert", help="convert a llama.cpp GGUF file into a safetensors model directory",
                       description="Dequantize every tensor of FILE (one at a time), undo llama.cpp's q/k row "
                       "permutation, and write OUT: config.json (architectures set), safetensors shards, the tokenizer "
                       "and chat template from the metadata. A recipe's `model: FILE.gguf` does the same by itself. "
                       "A killed conversion continues where it stopped when run again.")
    k.add_argument("file", help="the .gguf file")
    k.add_argument("out", help="the model directory to write (must not exist, unless it is this very conversion)")
    k.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 for quantized files (holds every dequantized weight exactly), else the "
                        "file's own float type")
    k.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="largest safetensors shard (default 2GB)")
    k.add_argument("--quiet", action="store_true")
    c = sub.add_parser("check", help="check an exported model in vLLM and transformers")
    c.add_argument("dir")
    c.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    c.add_argument("--quiet", action="store_true")
    e = sub.add_parser("eval", help="measure perplexity, throughput and size; compare with a baseline",
                       description="Evaluate MODEL (and more models) against --baseline: size always; perplexity "
                       "with --ppl; serving throughput with --throughput / --backend; lm-eval tasks with --tasks. "
                       "Writes report.json, report.md and PNG plots to --out.")
    e.add_argument("model", nargs="+", help="model directory (or Hub id); several are compared side by side")
    e.add_argument("--baseline", metavar="MODEL", help="the model the others are compared with (ratios)")
    e.add_argument("--out", default="eval-out", metavar="DIR",
                   help="output directory; the perplexity-vs-size plot covers every model evaluated into it "
                        "(default: eval-out)")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the models compute in; auto: float32 for perplexity on a CPU (the checkpoint's "
                        "dtype on a GPU), each engine's own choice for throughput (the report says which)")
    g = e.add_argument_group("perplexity")
    g.add_argument("--ppl", action="append", metavar="SOURCE",
                   help="text to measure perplexity on (repeatable): FILE[@START-END] (.txt, .jsonl, .parquet) "
                        "or DATASET[:CONFIG[:SPLIT[:FIELD]]][@START-END], e.g. wikitext:wikitext-2-raw-v1:test "
                        "(split default test, field default text; rows joined with blank lines)")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per window, capped at the model's context "
                   "(default 2048)")
    g.add_argument("--stride", type=int, help="sliding-window stride in tokens (default: non-overlapping windows)")
    g.add_argument("--samples", type=int, help="use only the first N windows (default: all)")
    g = e.add_argument_group("throughput (offline serving benchmark, random-token prompts)")
    g.add_argument("--throughput", action="store_true", help="measure throughput (with --backend, default vllm)")
    g.add_argument("--backend", action="append", choices=["vllm", "transformers"],
                   help="throughput backend; repeat for both (implies --throughput)")
    g.add_argument("--batch-sizes", type=_int_list, default=[1, 8], metavar="N,N", help="default 1,8")
    g.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default 128)")
    g.add_argument("--gen-len", type=int, default=128, help="generated tokens per request (default 128)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (default 3)")
    g.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per batch size (default 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    g.add_argument("--draft", metavar="DRAFT", help="also measure vLLM with speculative decoding by this draft model "
                   "(same tokenizer and vocabulary): tokens/s with and without it, acceptance rate, mean accepted "
                   "length")
    g.add_argument("--spec-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes per step "
                   "(default 4)")
    g = e.add_argument_group("downstream tasks (needs lm-eval installed)")
    g.add_argument("--tasks", action="append", default=[], metavar="TASK,TASK",
                   help="lm-evaluation-harness tasks: names (hellaswag, arc_easy) or paths of task YAML files "
                        "or directories of them (offline tasks over local data); repeatable")
    g.add_argument("--task-limit", type=int, help="examples per task (for quick looks; not comparable results)")
    g.add_argument("--num-fewshot", type=int)
    e.add_argument("--quiet", action="store_true")
    h = sub.add_parser("push", help="upload an export and its model card to the Hugging Face Hub",
                       description="Write the model card (README.md) into DIR and upload the export to REPO_ID. The "
                       "token comes from HF_TOKEN or `hf auth login`. An existing repository is committed to only "
                       "with --exist-ok, --revision or --create-pr. Rerunning after an interruption skips the files "
                       "the Hub already has.")
    h.add_argument("dir", help="an export written by `llmslim run`")
    h.add_argument("repo_id", help="namespace/name on the Hub")
    vis = h.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=True,
                     help="create the repository private (the default; an existing one keeps its visibility)")
    vis.add_argument("--public", dest="private", action="store_false", help="create the repository public")
    h.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created from main when missing)")
    h.add_argument("--create-pr", action="store_true", help="open a pull request against main")
    h.add_argument("--exist-ok", action="store_true", help="commit to main of a repository that already exists")
    h.add_argument("--commit-message", metavar="TEXT", help="default: llmslim, the methods and the base model")
    h.add_argument("--dry-run", action="store_true",
                   help="write the card and list what would be uploaded; do not contact the Hub")
    h.add_argument("--quiet", action="store_true")
    s = sub.add_parser("serve", help="serve a model with vLLM's OpenAI-compatible server (GPU or CPU)",
                       usage="llmslim serve MODEL [options] [-- extra vLLM server arguments]",
                       description="Start vLLM's OpenAI-compatible server for MODEL with the flags it needs on this "
                       "machine (dtype, max model length, CPU KV cache), print its URL once it answers, and stop it "
                       "(with its engine processes) on Ctrl-C or SIGTERM. Refuses, before starting anything, "
                       "what vLLM cannot serve here. Arguments after `--` go to vLLM's server unchanged.")
    s.add_argument("model", help="export directory (with config.json) or Hugging Face Hub id")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="default 8000")
    s.add_argument("--max-model-len", type=int, metavar="N", help="longest prompt + completion in tokens (default: "
                   "the model's context, at most 8192)")
    s.add_argument("--kv-cache-gib", type=float, metavar="G", help="KV cache size in GiB (default on CPU: room for 4 "
                   "sequences of --max-model-len; on a GPU: vLLM's own sizing)")
    s.add_argument("--served-model-name", metavar="NAME", help="the `model` clients ask for (default: MODEL)")
    s.add_argument("--draft", metavar="DRAFT", help="speculative decoding: a draft model (directory or Hub id) with "
                   "MODEL's tokenizer and vocabulary proposes tokens that MODEL verifies")
    s.add_argument("--spec-tokens", type=int, metavar="K", help="tokens the draft proposes per step (default 4)")
    s.add_argument("--dry-run", action="store_true", help="print the server command and exit")
    s.add_argument("--quiet", action="store_true")
    return p


def _error(console: Any, text: str) -> None:
    from rich.markup import escape

    for line in text.splitlines():
        console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "check": cmd_check, "eval": cmd_eval, "serve": cmd_serve,
            "push": cmd_push, "convert": cmd_convert}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """argparse, with everything after the first `--` kept apart as `extra` (vLLM's own flags for `serve`):
    argparse cannot take option-like words after a positional in a list of its own."""
    words = list(sys.argv[1:] if argv is None else argv)
    extra = words[words.index("--") + 1:] if "--" in words else []
    parser = build_parser()
    args = parser.parse_args(words[: len(words) - len(extra) - 1] if "--" in words else words)
    if extra and args.command != "serve":
        parser.error(f"arguments after `--` ({' '.join(extra)}) are for `llmslim serve` only")
    args.extra = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console, progress = _setup(args.quiet)
    try:
        return COMMANDS[args.command](args, console, progress)
    except UserError as e:
        _error(console, str(e))
        return getattr(e, "exit_code", 2)
    except OSError as e:  # the file system said no (full disk, permissions, a vanished path): one line
        if os.environ.get("LLMSLIM_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        _error(console, f"{where}{e.strerror or e}; completed work is kept, rerun the same command to continue "
                        "(LLMSLIM_DEBUG=1 shows the traceback)")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: completed work is kept; rerun the same command to continue")
        return 130


if __name__ == "__main__":
    sys.exit(main())

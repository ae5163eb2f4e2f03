"""The eval harness: size, perplexity, throughput and downstream tasks of one or more models, compared
with a baseline, written as report.json / report.md / PNG plots (see evaluate.report for the schema).

`llmslim eval` calls `run_eval`; a recipe's `eval:` section calls `measure_model` on the original and
on the export through pipeline.evaluate, so both paths measure the same way.

Perplexity is computed in transformers (in this process) on the text of each source tokenized as one
stream with the model's tokenizer (its own BOS convention: a BOS at the start of the stream when the
tokenizer adds one, never between windows), in non-overlapping windows of seq_len tokens (the trailing
partial window dropped) or, with a stride, in sliding windows covering the whole stream (see
perplexity.sliding_spans). seq_len is capped at the model's context length. dtype "auto" computes in
float32 on a CPU and in the checkpoint's dtype on a GPU (see perplexity_dtype); each result records it.
W8A8 exports get vLLM's dynamic per-token int8 activation quantization emulated, so that their
perplexity is what vLLM serves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import loading
from ..errors import UserError
from ..progress import Progress
from ..report import versions
from .size import model_size
from .tasks import TaskPlan
from .throughput import BACKENDS, SPEC_BACKEND, ThroughputSettings, benchmark, gpu_available

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class PplJob:
    """One perplexity measurement: a label, the token stream for a tokenizer, windows and stride."""

    label: str
    stream: Callable[[Any], torch.Tensor]  # tokenizer -> 1-D token ids
    seq_len: int
    samples: int | None = None
    stride: int | None = None


@dataclass
class EvalRequest:
    """Everything `llmslim eval` was asked to do."""

    models: list[str]
    out: Path
    baseline: str | None = None
    ppl: list[str] = field(default_factory=list)
    seq_len: int = DEFAULT_SEQ_LEN
    stride: int | None = None
    samples: int | None = None
    dtype: str = "auto"
    backends: list[str] = field(default_factory=list)
    throughput: ThroughputSettings = ThroughputSettings()
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    num_fewshot: int | None = None
    task_batch_size: int = 8
    command: str = ""
    draft: str | None = None  # a draft model: vLLM throughput is also measured with speculative decoding
    spec_tokens: int = 4


def environment() -> dict[str, Any]:
    import os

    gpu = gpu_available()
    device = f"cuda: {torch.cuda.get_device_name(0)}" if gpu else f"cpu ({os.cpu_count()} cores)"
    return {"device": device, "gpu": gpu, "versions": versions()}


def resolve_model(spec: str) -> Path:
    """A local model directory for MODEL (a Hub id is downloaded, safetensors only)."""
    path = loading.resolve_model(spec)
    if not list(path.glob("*.safetensors")):
        raise UserError(f"{spec}: no safetensors weights in the directory")
    return path


def context_length(model_dir: Path) -> int | None:
    cfg = json.loads((model_dir / "config.json").read_text())
    return (cfg.get("text_config") or cfg).get("max_position_embeddings")


def _tokenizer_key(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            h.update((model_dir / name).read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- one model


def perplexity_dtype(dtype: str | torch.dtype, gpu: bool) -> str | torch.dtype:
    """The dtype perplexity is computed in: "auto" is float32 on a CPU (where bf16/fp16 matmuls are slow
    and lose precision, the recipe's compute_dtype rule) and the checkpoint's own dtype on a GPU."""
    if not isinstance(dtype, str):
        return dtype
    if dtype == "auto":
        return "auto" if gpu else torch.float32
    return getattr(torch, dtype)


def load_for_perplexity(model_dir: Path, dtype: str | torch.dtype) -> tuple[Any, str | None]:
    """The model in transformers on the best device, with an eora adapter merged into its weights, and the
    activation quantization applied (W8A8)."""
    from transformers import AutoModelForCausalLM

    from ..check import _quantization, _weight_bits
    from ..formats.lora import adapter_dir, merge_into

    gpu = gpu_available()
    torch_dtype: Any = perplexity_dtype(dtype, gpu)
    lora = adapter_dir(model_dir)
    q = _quantization(model_dir)
    extra: dict[str, Any] = {}
    if lora is not None and q is not None:  # packed Linears have no dense weight to add the corrections to:
        from transformers import CompressedTensorsConfig

        # decoded to dense once at load (the values the packed forward decodes), as check.transformers_model does
        extra["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    with warnings.catch_warnings():  # "the checkpoint's quantization_config wins": run_compressed=False is kept
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **extra).eval()
    if lora is not None:  # an eora export is measured with its corrections (what serving it with the adapter computes)
        merge_into(model, lora)
    if gpu:
        model = model.to("cuda")
    if q is None or _weight_bits(q)[1] != 8:
        return model, None
    from ..formats.compressed import emulate_activation_quant

    emulate_activation_quant(model, bits=8)
    return model, "int8 per-token dynamic, emulated"


def measure_perplexity(model_dir: Path, jobs: list[PplJob], dtype: str | torch.dtype, progress: Progress, name: str,
                       tokenizer: Any) -> dict[str, Any]:
    """{label: perplexity entry} for each job (see the module docstring)."""
    from ..perplexity import perplexity, sliding_perplexity, sliding_spans

    if not jobs:
        return {}
    streams = [job.stream(tokenizer) for job in jobs]  # tokenizer problems surface before the model loads
    model, act = load_for_perplexity(model_dir, dtype)
    context = context_length(model_dir)
    out = {}
    for job, stream in zip(jobs, streams):
        seq_len = min(job.seq_len, context) if context else job.seq_len
        if job.stride is None:
            from ..data import windows

            try:
                w = windows(stream, seq_len, job.samples, seed=None, name=job.label)
            except UserError as e:
                raise UserError(str(e).replace(f"data.{job.label}:", f"perplexity on {job.label}:", 1)) from None
            with progress.track(f"perplexity {name} on {job.label}", w.shape[0]) as task:
                res = perplexity(model, w, on_batch=task.advance)
        else:
            stride = min(job.stride, seq_len)
            if stream.numel() < 2:
                raise UserError(f"perplexity on {job.label}: the text has {stream.numel()} token(s); at least 2 "
                                "are needed (one to predict from, one to score)")
            n_windows = len(sliding_spans(stream.numel(), seq_len, stride)[: job.samples])
            with progress.track(f"perplexity {name} on {job.label} (stride {stride})", n_windows) as task:
                res = sliding_perplexity(model, stream, seq_len=seq_len, stride=stride, max_windows=job.samples,
                                         on_batch=task.advance)
        out[job.label] = {**res.as_dict(), "stride": job.stride and min(job.stride, seq_len), "source": job.label,
                          "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                          "activation_quant": act}
        log.info("perplexity %s on %s: %.4f", name, job.label, res.ppl)
    del model
    if torch.cuda.is_available():  # hand the memory back before a vLLM engine asks for its share of the GPU
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return out


def measure_model(model_dir: Path, *, name: str, role: str, ppl: list[PplJob], dtype: str | torch.dtype,
                  backends: list[str],
                  throughput: ThroughputSettings, tasks: list[str] | TaskPlan, progress: Progress,
                  log_dir: Path | None,
                  tokenizer: Any = None, task_limit: int | None = None, num_fewshot: int | None = None,
                  task_batch_size: int = 8, speculative: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report entry of one model: size, perplexity, throughput per backend, tasks. With `speculative`
    (vLLM's speculative_config of a draft model) vLLM is measured a second time with the draft, as the
    backend `vllm+draft` (SPEC_BACKEND)."""
    entry: dict[str, Any] = {"name": name, "path": str(model_dir), "role": role, "size": model_size(model_dir)}
    entry["perplexity"] = measure_perplexity(model_dir, ppl, dtype, progress, name, tokenizer)
    entry["throughput"] = {}
    for backend in backends:
        log_file = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            log_file = log_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{backend}.log"
        entry["throughput"][backend] = benchmark(model_dir, backend, throughput, progress, label=name,
                                                 log_file=log_file)
        if backend == "vllm" and speculative is not None:
            spec_log = log_file.with_name(log_file.stem + "-draft.log") if log_file else None
            entry["throughput"][SPEC_BACKEND] = benchmark(model_dir, backend, throughput, progress, label=name,
                                                          log_file=spec_log, speculative=speculative)
    entry["tasks"] = {}
    if tasks:
        from .tasks import resolve_tasks, run_tasks

        plan = tasks if isinstance(tasks, TaskPlan) else resolve_tasks(list(tasks))
        with progress.track(f"lm-eval tasks on {name}", None):  # lm-eval shows its own progress bars
            entry["tasks"] = run_tasks(model_dir, plan, limit=task_limit, num_fewshot=num_fewshot,
                                       batch_size=task_batch_size, dtype=str(dtype).removeprefix("torch."),
                                       device="cuda" if gpu_available() else "cpu")
    return entry


# ---------------------------------------------------------------- the command


def _names(paths: list[Path]) -> list[str]:
    """Short display names: the directory name, with its parent when two would collide."""
    names = [p.name or str(p) for p in paths]
    for i, p in enumerate(paths):
        if names.count(names[i]) > 1:
            names[i] = f"{p.parent.name}/{p.name}"
    return names


def settings_dict(req: EvalRequest) -> dict[str, Any]:
    return {
        "perplexity": {"sources": list(req.ppl), "seq_len": req.seq_len, "stride": req.stride,
                       "samples": req.samples, "dtype": req.dtype} if req.ppl else None,
        "throughput": {"backends": list(req.backends), **req.throughput.as_dict(),
                       **({"draft": req.draft, "num_speculative_tokens": req.spec_tokens} if req.draft else {})}
        if req.backends else None,
        "tasks": {"names": list(req.tasks), "limit": req.task_limit, "num_fewshot": req.num_fewshot,
                  "batch_size": req.task_batch_size} if req.tasks else None,
    }


def throughput_settings(cfg: Any) -> tuple[list[str], ThroughputSettings]:
    """(backends, settings) from a recipe's `eval.throughput` (None: no throughput)."""
    if cfg is None:
        return [], ThroughputSettings()
    backends = list(BACKENDS) if cfg.backend == "both" else [cfg.backend]
    return backends, ThroughputSettings(batch_sizes=tuple(cfg.batch_sizes), prompt_len=cfg.prompt_len,
                                        gen_len=cfg.gen_len, repeats=cfg.repeats, warmup=cfg.warmup)


def recipe_settings(cfg: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The report's `settings` for a recipe's `eval:` section."""
    backends, tput = throughput_settings(cfg.throughput)
    return {
        "perplexity": {"sources": list(cfg.perplexity), "seq_len": None, "stride": cfg.stride, "samples": None,
                       "dtype": str(dtype).removeprefix("torch.")} if cfg.perplexity else None,
        "throughput": {"backends": backends, **tput.as_dict()} if backends else None,
        "tasks": {"names": list(cfg.tasks), "limit": cfg.task_limit, "num_fewshot": None, "batch_size": 8}
        if cfg.tasks else None,
    }


def new_report(command: str, settings: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    from .report import SCHEMA, add_ratios

    add_ratios(models)
    base = next((m["name"] for m in models if m["role"] == "baseline"), None)
    return {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "environment": environment(), "settings": settings, "baseline": base,
            "models": models}


def write_outputs(report: dict[str, Any], out: Path) -> list[Path]:
    """report.json, report.md, model records and plots in `out`; returns the paths written."""
    from .plots import plot_ppl_vs_size, plot_throughput
    from .report import write_report

    files = write_report(report, out)
    ppl_plot = plot_ppl_vs_size(out)
    return files + ([ppl_plot] if ppl_plot else []) + plot_throughput(report, out)


def _cached(stream: torch.Tensor) -> Callable[[Any], torch.Tensor]:
    return lambda _tokenizer: stream


def _check_tokens(label: str, stream: torch.Tensor, req: EvalRequest, context: int | None) -> None:
    """A one-line UserError when a source's text is too short for the windows asked for."""
    seq_len = min(req.seq_len, context) if context else req.seq_len
    if req.stride is None:
        need = seq_len * (req.samples or 1)
        if stream.numel() < need:
            raise UserError(f"--ppl {label}: {stream.numel()} tokens, but {req.samples or 1} window(s) of {seq_len} "
                            f"tokens need {need}; lower --seq-len or --samples, or give more text")
    elif stream.numel() < 2:
        raise UserError(f"--ppl {label}: the text has {stream.numel()} token(s); at least 2 are needed")


def _speculative(req: EvalRequest, paths: list[Path]) -> dict[str, Any] | None:
    """vLLM's speculative_config for `--draft`, after checking that it pairs with every model measured."""
    from ..draft import check_pair, speculative_config

    if req.draft is None:
        return None
    if "vllm" not in req.backends:
        raise UserError(f"--draft {req.draft}: speculative decoding is measured in vLLM's throughput benchmark; "
                        "add --throughput (or --backend vllm)")
    draft = resolve_model(req.draft)
    spec = speculative_config(str(draft), req.spec_tokens)
    draft_config = json.loads((draft / "config.json").read_text())
    for path in paths:
        check_pair(str(draft), str(path), draft_config, json.loads((path / "config.json").read_text()))
    return spec


def run_eval(req: EvalRequest, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate the baseline (when given) and each model; write the outputs into `req.out`."""
    from .sources import load_source_text, parse_source

    progress = progress or Progress()
    for b in req.backends:
        if b not in BACKENDS:
            raise UserError(f"--backend {b}: unknown backend; choose from {', '.join(BACKENDS)}")
    if req.stride is not None and req.stride <= 0:
        raise UserError(f"--stride {req.stride}: must be a positive number of tokens")
    for flag, opt in (("--samples", req.samples), ("--task-limit", req.task_limit)):
        if opt is not None and opt < 1:
            raise UserError(f"{flag} {opt}: must be at least 1")
    if req.num_fewshot is not None and req.num_fewshot < 0:
        raise UserError(f"--num-fewshot {req.num_fewshot}: must be 0 or more")
    if req.task_batch_size < 1:
        raise UserError(f"task batch size {req.task_batch_size}: must be at least 1")
    if req.out.exists() and not req.out.is_dir():
        raise UserError(f"--out {req.out}: exists and is not a directory; give a directory for the report")
    from ..ownership import REPORT, export_containing

    inside = export_containing(req.out)
    if inside is not None:  # what it wrote there would make the export not llmslim's to replace or push
        raise UserError(f"--out {req.out}: lies inside the llmslim export {inside}, whose files its {REPORT} "
                        "records (a file added or changed there makes llmslim refuse to replace or push it); "
                        "give a directory outside the export")
    t = req.throughput
    for flag, value, least in (("--prompt-len", t.prompt_len, 1), ("--gen-len", t.gen_len, 1),
                               ("--repeats", t.repeats, 1), ("--warmup", t.warmup, 0), ("--seq-len", req.seq_len, 2)):
        if value < least:
            raise UserError(f"{flag} {value}: must be at least {least}")
    if not (req.ppl or req.backends or req.tasks):
        log.info("no --ppl, --throughput or --tasks given: measuring size only")
    specs = ([req.baseline] if req.baseline else []) + list(req.models)
    paths = [resolve_model(s) for s in specs]
    speculative = _speculative(req, paths)
    # Everything that can fail fast does so before the first model loads: sources, tokenizers, the
    # windows each text yields, task names.
    sources = [parse_source(s) for s in req.ppl]
    texts = {s.label: load_source_text(s) for s in sources}
    plan = None
    if req.tasks:
        from .tasks import resolve_tasks

        plan = resolve_tasks(req.tasks)
    streams: dict[tuple[str, str], torch.Tensor] = {}  # (source, tokenizer hash) -> tokens, shared by models
    tokenizers = []
    for path in paths:
        tokenizer = loading.load_tokenizer(path) if sources else None
        if sources and tokenizer is None:
            raise UserError(f"{path}: the model directory has no tokenizer files (tokenizer.json, tokenizer.model "
                            f"or vocab.json), so --ppl text cannot be tokenized for it")
        key = _tokenizer_key(path)
        for s in sources:
            if (s.label, key) not in streams:
                from ..data import tokenize

                streams[(s.label, key)] = tokenize(texts[s.label], tokenizer)
            _check_tokens(s.label, streams[(s.label, key)], req, context_length(path))
        tokenizers.append((tokenizer, key))

    models = []
    for i, (path, name, (tokenizer, key)) in enumerate(zip(paths, _names(paths), tokenizers)):
        jobs = [PplJob(s.label, _cached(streams[(s.label, key)]), req.seq_len, req.samples, req.stride)
                for s in sources]
        role = "baseline" if req.baseline and i == 0 else "model"
        models.append(measure_model(path, name=name, role=role, ppl=jobs, dtype=req.dtype, backends=req.backends,
                                    throughput=req.throughput, tasks=plan or [], progress=progress,
                                    log_dir=req.out / "logs", tokenizer=tokenizer, task_limit=req.task_limit,
                                    num_fewshot=req.num_fewshot, task_batch_size=req.task_batch_size,
                                    speculative=speculative))
    report = new_report(req.command or shlex.join(["llmslim", *sys.argv[1:]]), settings_dict(req), models)
    write_outputs(report, req.out)
    return report

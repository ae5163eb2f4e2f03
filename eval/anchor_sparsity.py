"""The anchor's side of the sparsity benchmark (issue [29]): llm-compressor 0.14's SparseGPTModifier or
WandaPruningModifier on given calibration tokens.

    .venv-anchor/bin/python eval/anchor_sparsity.py --model DIR --tokens calib.pt --out OUT --json result.json \\
        --method sparsegpt|wanda [--mask-structure 0:0|2:4] [--sparsity 0.5] [--dampening 0.01] [--block-size 128]

Runs under .venv-anchor (see eval/anchor_llmcompressor.py for why), with the same calibration hand-over:
--tokens is an int64 tensor [N, S], given to `oneshot` as a pre-tokenized dataset (no re-tokenizing,
truncation, padding or shuffling), its SHA-256 recorded in the JSON (`calibration.tokens_sha256`).

The modifiers, from llmcompressor.modifiers.pruning (0.14; `llmcompressor.modifiers.obcq` is a deprecated
alias of the SparseGPT one): sparsity --sparsity, mask_structure --mask-structure ("0:0" unstructured,
"2:4" two of every four consecutive inputs; with N:M the mask ignores `sparsity`), targets ["Linear"],
ignore ["re:.*lm_head"]. The regex and not the plain name: 0.14 matches `ignore` against "NAME." (the
module's name plus the empty name of the Linear itself inside it), so a plain "lm_head" would not match and
the tied lm_head (SmolLM2's embedding matrix) would be pruned; the JSON counts the zeros of lm_head and of
the embedding to prove it was not. SparseGPT: dampening_frac --dampening (a fraction of the mean of
diag(H), as ours), block_size --block-size; Wanda takes neither. llm-compressor infers its "sequential"
pipeline for both: decoder layer by decoder layer, each layer calibrated on what the pruned layers before it
produce, as our stages do. OWL (sparsity_profile="owl") is not offered: in 0.14 its layer-wise sparsities
come back as a dict keyed by decoder layer while the hooks read a list indexed by target Linear, so it
fails at initialisation.

Output: a plain dense checkpoint (the zeros in place, no quantization or sparsity config: compressed-tensors
0.19 has no sparse compressors) that .venv loads as it is; the JSON (timings, peak RSS, versions, the
fraction of zeros per pruned Linear and in all) as anchor_llmcompressor.py writes it.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before the heavy imports: "total" includes them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from anchor_llmcompressor import (  # noqa: E402
    RssSampler,
    check_ids,
    load_tokens,
    measurement_blocks,
    tokens_sha256,
    versions,
)

IGNORE = ["re:.*lm_head"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="llm-compressor SparseGPT / Wanda (the anchor) on given tokens")
    p.add_argument("--model", type=Path, required=True, help="local HF causal LM directory")
    p.add_argument("--tokens", type=Path, required=True, help="torch file: int64 tensor [N, S]")
    p.add_argument("--out", type=Path, required=True, help="output dir (a dense checkpoint)")
    p.add_argument("--json", type=Path, required=True, help="where to write the measurements")
    p.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--mask-structure", default="0:0", help='"0:0" (unstructured) or "N:M", e.g. "2:4"')
    p.add_argument("--dampening", type=float, default=0.01, help="SparseGPT's dampening_frac")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT's block_size")
    p.add_argument("--batch-size", type=int, default=1, help="calibration batch size")
    p.add_argument("--dtype", default="auto", help="model load dtype: auto|bfloat16|float32|...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--curve-every", type=float, default=1.0,
                   help="keep one RSS curve point per this many seconds in the JSON (peaks use all)")
    return p.parse_args()


def zero_counts(model) -> dict:
    """Per Linear (lm_head included) and for the input embedding: zeros and elements of the weight."""
    import torch

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            w = module.weight.detach()
            out[name] = {"zeros": int((w == 0).sum()), "weights": w.numel()}
    return out


def main() -> None:
    args = parse_args()
    sampler = RssSampler(0.2).start()
    load_before = os.getloadavg()

    sampler.phase("import")
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - t0

    tokens = load_tokens(args.tokens)
    n_samples, seq_len = tokens.shape

    sampler.phase("load")
    t0 = time.perf_counter()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    check_ids(tokens, model.config.vocab_size, args.tokens)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    zeros_before = zero_counts(model)
    t_load = time.perf_counter() - t0

    common = dict(sparsity=args.sparsity, mask_structure=args.mask_structure, targets=["Linear"], ignore=IGNORE)
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(**common, dampening_frac=args.dampening, block_size=args.block_size)
    else:
        modifier = WandaPruningModifier(**common)
    try:
        recipe_dump = modifier.model_dump(mode="json", exclude_none=True)
    except Exception as exc:  # a field pydantic cannot serialize: keep its repr
        recipe_dump = {"repr": repr(modifier), "dump_error": str(exc)}
    oneshot_kwargs = dict(num_calibration_samples=n_samples, max_seq_length=seq_len, batch_size=args.batch_size,
                          shuffle_calibration_samples=False, pipeline="independent")

    sampler.phase("oneshot")
    t0 = time.perf_counter()
    model = oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=modifier, **oneshot_kwargs)
    t_oneshot = time.perf_counter() - t0

    sampler.phase("save")
    t0 = time.perf_counter()
    counts = zero_counts(model)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, save_compressed=False)  # no quantization: plain dense safetensors
    tokenizer.save_pretrained(args.out)
    config_path = args.out / "config.json"
    out_config = json.loads(config_path.read_text())
    if "quantization_config" in out_config:  # nothing quantized: a leftover would make .venv decode it
        del out_config["quantization_config"]
        config_path.write_text(json.dumps(out_config, indent=2) + "\n")
    t_save = time.perf_counter() - t0

    sampler.stop()
    t_total = time.perf_counter() - T_START
    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    pruned = {k: v for k, v in counts.items() if ".layers." in k and not k.endswith(("lm_head", "embed_tokens"))}
    new_zeros = {k: v["zeros"] - zeros_before.get(k, {"zeros": 0})["zeros"] for k, v in counts.items()}
    untouched = {k: new_zeros[k] for k in counts if k not in pruned}
    result = {
        "tool": "llm-compressor",
        "method": args.method,
        "command": [sys.executable, *sys.argv],
        "versions": versions(),
        "model": {"path": str(args.model), "layers": model.config.num_hidden_layers,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        "calibration": {"tokens_file": str(args.tokens), "tokens_sha256": tokens_sha256(tokens),
                        "num_samples": n_samples, "seq_len": seq_len, "batch_size": args.batch_size},
        "scheme": {"sparsity": args.sparsity, "mask_structure": args.mask_structure, "targets": ["Linear"],
                   "ignore": IGNORE, **({"dampening_frac": args.dampening, "block_size": args.block_size}
                                        if args.method == "sparsegpt" else {})},
        "recipe": recipe_dump,
        "oneshot_kwargs": oneshot_kwargs,
        "sparsity": {
            "decoder_linears": len(pruned),
            "zeros": sum(v["zeros"] for v in pruned.values()),
            "weights": sum(v["weights"] for v in pruned.values()),
            "fraction": sum(v["zeros"] for v in pruned.values()) / max(1, sum(v["weights"] for v in pruned.values())),
            "new_zeros_outside_decoder_linears": untouched,  # lm_head and the embedding: must stay 0
            "per_linear": {k: round(v["zeros"] / v["weights"], 6) for k, v in pruned.items()},
        },
        "timings_s": {"import": round(t_import, 2), "load": round(t_load, 2), "oneshot": round(t_oneshot, 2),
                      "save": round(t_save, 2), "total": round(t_total, 2)},
        **measurement_blocks(sampler, maxrss_mib, args.curve_every, load_before, torch.get_num_threads(), args.out,
                             out_config),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    t = result["timings_s"]
    print(f"anchor ({args.method} {args.mask_structure}): oneshot {t['oneshot']:.1f} s, total {t['total']:.1f} s; "
          f"{100 * result['sparsity']['fraction']:.2f} % zeros in {len(pruned)} decoder Linears; "
          f"new zeros elsewhere {sum(untouched.values())}; peak RSS {maxrss_mib:.0f} MiB -> {args.json}")


if __name__ == "__main__":
    main()

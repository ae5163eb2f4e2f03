"""Write a random-weight Llama checkpoint for speed and memory benchmarks (no Hub, no training).

    .venv/bin/python eval/make_synthetic_llama.py --layers 24 --out /tmp/synth-llama-24 [--seed 0] [--dtype bfloat16]

Shape: hidden 1024, intermediate 2816, 16 heads / 4 KV heads (head_dim 64), vocab 8192, context 2048,
untied embeddings: about 11.3 M parameters per layer plus 16.8 M in the embeddings and lm_head
(24 layers: 287 M, 0.57 GB in bfloat16). The numbers only mean something for time and memory: the
weights are noise, so perplexity is that of a uniform guess and says nothing about quantization quality.

Weights: every Linear and Embedding weight is drawn from N(0, 0.02) (transformers' default
`initializer_range`), every RMSNorm weight is 1. The draws come from one torch.Generator seeded with
--seed, in the fixed order of `named_parameters()`, in float32, then cast to --dtype, so the same seed
gives bit-identical files whatever transformers' own init does. The script prints a SHA-256 fingerprint
of all tensors: two runs with the same seed print the same fingerprint.

Tokenizer: byte-level BPE with no merges (256 byte symbols + <unk> <s> </s> <pad>, 260 ids, all below
the model's 8192), built with the `tokenizers` library and saved as tokenizer.json, so that tools that
insist on loading a tokenizer (llm-compressor, vLLM) can. Ids 260..8191 are never produced by it; random
calibration ids may use the whole vocabulary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3; bytes follow at 4..259


def build_config(layers: int, dtype: torch.dtype):
    """The benchmark shape as a LlamaConfig with `layers` decoder blocks."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        dtype=dtype,
    )


@torch.no_grad()
def fill_weights(model: torch.nn.Module, seed: int, dtype: torch.dtype) -> None:
    """Overwrite every parameter deterministically: norms (1-D) = 1, matrices ~ N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    for _name, param in model.named_parameters():
        if param.ndim == 1:  # RMSNorm weights
            param.data = torch.ones(param.shape, dtype=dtype)
        else:  # [out, in] Linear weights and [vocab, hidden] embeddings
            draw = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
            param.data = draw.to(dtype)


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over parameter names and raw bytes, in state-dict order (for determinism checks)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_tokenizer():
    """A byte-level BPE tokenizer without merges, wrapped for transformers (260 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({sym: len(SPECIAL_TOKENS) + i for i, sym in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, required=True, help="number of decoder blocks")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    config = build_config(args.layers, dtype)
    model = LlamaForCausalLM(config)  # transformers' init runs here; fill_weights replaces it
    fill_weights(model, args.seed, dtype)
    model.to(dtype)
    model.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)  # safetensors + config.json + generation_config.json
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(args.out)

    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "layers": args.layers,
        "seed": args.seed,
        "dtype": args.dtype,
        "parameters": n_params,
        "fingerprint_sha256": fingerprint(model),
        "tokenizer_vocab": len(tokenizer),
        "seconds": round(time.perf_counter() - start, 1),
        "out": str(args.out),
    }
    (args.out / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()

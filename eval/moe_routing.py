"""Can routing beat a static channel cut, layer by layer? The FFN-output error of each way to keep a quarter
(or another share) of a dense FFN's channels per token, on calibration tokens of a real model.

    .venv/bin/python eval/moe_routing.py [--model DIR] [--layers 3 12 21] [--tokens 2048]

For each chosen decoder layer: the relative squared error ||F'(x) - F(x)||^2 / ||F(x)||^2 of the FFN's
output over --tokens tokens of WikiText-2 valid, where F is the dense FFN and F' keeps, per token,
- "static": the --active channels with the largest mean |activation| (prune_ffn's activation criterion);
- each MoE split (moefy's balanced clustering of the remaining channels, a `shared` expert of the most
  active channels), with moefy's fitted router (the ridge probe of each expert's gain) and with an oracle
  router (each token's experts of largest gain, the best a top-k router can do on this split).
Expert outputs count at weight 1 (moefy folds top_k into down_proj and its router starts near uniform).
If even the oracle does not beat the static cut, the FFN's activations do not cluster into experts a token
could choose between: routing then buys nothing before training. Model: --model, or SmolLM2-135M converted
from the GGUF of scripts/setup.sh into --work. Prints one line per layer and writes
eval/results/moe_routing.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ptq import WIKI_VALID, smollm2_model  # noqa: E402

from llmslim.methods import moefy, routing  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPLITS = ((8, 2, 0), (7, 1, 192), (14, 2, 192), (16, 4, 0))  # (experts, top_k, shared) at 384 active of 1536


def relative(approx: torch.Tensor, dense: torch.Tensor) -> float:
    return float((approx - dense).double().pow(2).sum() / dense.double().pow(2).sum())


@torch.no_grad()
def errors(x: torch.Tensor, mlp: torch.nn.Module, active: int, gen: torch.Generator) -> dict[str, float]:
    """The static cut's and each SPLITS entry's (router, oracle) error for one FFN on its inputs x [T, H]."""
    act = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).float()  # [T, I]
    down = mlp.down_proj.weight.float()
    dense = act @ down.T
    by_activation = act.abs().mean(0)
    keep = torch.topk(by_activation, active).indices
    out = {"static": relative(act[:, keep] @ down[:, keep].T, dense)}
    width = act.shape[1]
    for experts, top_k, shared in SPLITS:
        if (width - shared) % experts or (width - shared) // experts * top_k + shared != active:
            continue
        kept, groups = moefy.split_channels(act, experts, shared, "balanced_cluster", gen)
        kept = kept if kept is not None else torch.zeros(0, dtype=torch.long)
        expert_out = torch.stack([act[:, g] @ down[:, g].T for g in groups])  # [E, T, H]
        base = act[:, kept] @ down[:, kept].T
        gains = routing.expert_gains(expert_out, expert_out.sum(0))
        probe = routing.fit_router_probe(x, gains)
        name = f"{experts} x {(width - shared) // experts} top-{top_k}" + (f" + shared {shared}" if shared else "")
        for router, scores in (("router", x @ probe.T), ("oracle", gains)):
            chosen = torch.zeros(len(x), experts).scatter_(1, torch.topk(scores, top_k, dim=1).indices, 1.0)
            out[f"{name} ({router})"] = relative(base + torch.einsum("te,eth->th", chosen, expert_out), dense)
    return out


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a dense checkpoint (default: SmolLM2-135M from its GGUF)")
    p.add_argument("--work", type=Path, default=Path("/tmp/llmslim-moe-routing"))
    p.add_argument("--layers", type=int, nargs="+", default=[3, 12, 21])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--active", type=int, default=384, help="FFN channels active per token")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model_dir = args.model or smollm2_model(args.work.resolve())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    seq = 512
    ids = tok(WIKI_VALID.read_text()[:400_000], return_tensors="pt").input_ids[0]
    n = -(-args.tokens // seq)
    ids = ids[: n * seq].reshape(n, seq)
    inputs: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    hooks = [layers[i].mlp.register_forward_pre_hook(
        lambda _m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])[: args.tokens].detach()))
        for i in args.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(0)
    result = {}
    for i in args.layers:
        result[str(i)] = errors(inputs[i], layers[i].mlp, args.active, gen)
        print(f"layer {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in result[str(i)].items()), flush=True)
    out = REPO / "eval" / "results" / "moe_routing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["eval/moe_routing.py", *(argv or sys.argv[1:])]),
                               "model": str(model_dir), "tokens": args.tokens, "active": args.active,
                               "layers": result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pure cores of the MoE methods (moefy, prune_experts, set_topk): tensors in, tensors or indices out.

No I/O, no hooks, no transformers. Shapes: T tokens, H hidden size, I FFN channels, E experts, k = top_k.

Routing as Mixtral, Qwen2-MoE and Qwen3-MoE compute it (transformers and vLLM): logits = x W_r^T [T, E],
p = softmax(logits), the k largest p are kept, and divided by their sum when the top-k probabilities are
normalised (always for Mixtral; `norm_topk_prob` for the Qwen families). The block's output is
sum over the kept experts of weight_e * expert_e(x).
"""

from __future__ import annotations

import math

import torch


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> torch.Tensor:
    """Each token's weight per expert, [T, E] (zero for experts outside its top-k)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, index = torch.topk(probs, top_k, dim=-1)
    if normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(1, index, top)


# ---------------------------------------------------------------- splitting channels into experts


def assign_balanced(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each of n items to one of k clusters, every cluster taking exactly `size` items (n = k *
    size), greedily by distance: the closest (item, cluster) pairs are taken first while the cluster has
    room. dist: [n, k]; returns the cluster of each item, [n]."""
    n, k = dist.shape
    if n != k * size:
        raise ValueError(f"{n} items cannot fill {k} clusters of {size}")
    order = torch.argsort(dist.reshape(-1), stable=True).tolist()
    out = torch.full((n,), -1, dtype=torch.long)
    room = [size] * k
    left = n
    for flat in order:
        item, cluster = divmod(flat, k)
        if out[item] >= 0 or room[cluster] == 0:
            continue
        out[item] = cluster
        room[cluster] -= 1
        left -= 1
        if left == 0:
            break
    return out


def _sq_dist(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ centroids.T + centroids.pow(2).sum(1)).clamp(min=0)


def cluster_channels(features: torch.Tensor, experts: int, *, balanced: bool, iterations: int = 30,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means of channels by their activation patterns, ending in equal-size groups (one expert width).

    features: [I, T] (each channel's |activation| on T calibration tokens); rows are normalised to unit
    length, so channels that fire on the same tokens are close whatever their scale. `balanced`: every
    iteration assigns under the equal-size constraint (balanced k-means); otherwise Lloyd iterations run
    unconstrained and only the final assignment is made equal-size. Returns the expert of each channel, [I]."""
    n = features.shape[0]
    if n % experts:
        raise ValueError(f"{n} channels do not split into {experts} equal experts")
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    # k-means++ seeding: spread-out initial centroids, deterministic under the generator
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = x[first:first + 1]
    for _ in range(1, experts):
        d = _sq_dist(x, centroids).min(dim=1).values
        # every channel already sits on a centroid (fewer distinct patterns than experts): any one, but
        # drawn from `generator` too, so that a rerun (a resumed moefy) splits the same way
        pick = (int(torch.multinomial(d + 1e-12, 1, generator=generator)) if d.sum() > 0
                else int(torch.randint(n, (1,), generator=generator)))
        centroids = torch.cat([centroids, x[pick:pick + 1]])
    assign = torch.empty(0)
    for _ in range(iterations):
        dist = _sq_dist(x, centroids)
        new = assign_balanced(dist, n // experts) if balanced else dist.argmin(dim=1)
        if assign.numel() and torch.equal(new, assign):
            break
        assign = new
        for e in range(experts):
            members = x[assign == e]
            if len(members):
                centroids[e] = members.mean(dim=0)
            else:  # an empty cluster restarts at the channel farthest from its centroid
                far = int(dist.gather(1, assign[:, None]).squeeze(1).argmax())
                centroids[e] = x[far]
    if not balanced:
        assign = assign_balanced(_sq_dist(x, centroids), n // experts)
    return assign


def random_split(channels: int, experts: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A seeded random equal-size split: the expert of each channel, [I]."""
    return torch.randperm(channels, generator=generator) % experts


def groups_of(assign: torch.Tensor, experts: int) -> list[list[int]]:
    """Channel indices of each expert, in increasing order."""
    return [torch.nonzero(assign == e).squeeze(1).tolist() for e in range(experts)]


# ---------------------------------------------------------------- the router


def expert_gains(expert_out: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """How much each expert alone brings each token closer to the dense output: |D|^2 - |D - O_e|^2 =
    2<D, O_e> - |O_e|^2, [T, E]. With near-uniform weights the routed output is the sum of the chosen
    experts' outputs, and (cross terms aside) choosing the experts with the largest gains minimises the
    error; an expert whose output is large but points away from D scores low, unlike its output norm."""
    d, o = dense.double(), expert_out.double()
    return (2 * torch.einsum("th,eth->te", d, o) - o.pow(2).sum(-1).T).float()


def fit_router_probe(x: torch.Tensor, importance: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """A linear router [E, H] whose logits rank experts like `importance` [T, E] (e.g. `expert_gains`):
    ridge regression of the per-token-centred importance on x [T, H]. Centred, because softmax ignores a
    shift common to a token's logits; no bias, because these routers have none."""
    dtype = x.dtype
    x, y = x.double(), importance.double()
    y = y - y.mean(dim=1, keepdim=True)
    gram = x.T @ x
    lam = ridge * gram.diagonal().mean().clamp(min=1e-12)
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ y)  # [H, E]
    return w.T.contiguous().to(dtype)


def moe_output(expert_out: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """sum_e weights[t, e] * scale * expert_out[e, t]: expert_out [E, T, H], weights [T, E] -> [T, H]."""
    return torch.einsum("te,eth->th", weights.to(expert_out.dtype), expert_out) * scale


def routed_error(x: torch.Tensor, router: torch.Tensor, expert_out: torch.Tensor, dense: torch.Tensor, top_k: int,
                 normalize: bool) -> torch.Tensor:
    """Relative squared error of the routed block (expert outputs scaled by top_k) against the dense FFN."""
    weights = route(x @ router.T, top_k, normalize)
    return (moe_output(expert_out, weights, top_k) - dense).pow(2).sum() / dense.pow(2).sum().clamp(min=1e-30)


def search_router_scale(x: torch.Tensor, probe: torch.Tensor, expert_out: torch.Tensor, dense: torch.Tensor,
                        top_k: int, normalize: bool) -> tuple[float, dict[str, float]]:
    """The factor s for the router s * probe that makes the routed block closest to the dense FFN on the
    calibration tokens. Ranking is the same for every s > 0; s sets how far the weights leave the uniform
    1/k. Returns (s, {s: relative error}) over a grid from nearly uniform to sharply peaked."""
    spread = (x @ probe.T).std(dim=1).mean().item() or 1.0
    errors: dict[str, float] = {}
    best = (math.inf, 0.0)
    for factor in (1e-3, 0.25, 0.5, 1.0, 2.0, 4.0):
        s = factor / spread
        err = routed_error(x, probe * s, expert_out, dense, top_k, normalize).item()
        errors[f"{s:.4g}"] = round(err, 6)
        best = min(best, (err, s))
    return best[1], errors


# ---------------------------------------------------------------- expert statistics and importance


class RoutingStats:
    """Per-expert routing statistics of one layer, accumulated over calibration batches."""

    def __init__(self, experts: int):
        self.tokens = 0
        self.count = torch.zeros(experts, dtype=torch.float64)  # tokens whose top-k holds the expert
        self.prob = torch.zeros(experts, dtype=torch.float64)  # sum of router probabilities
        self.reap = torch.zeros(experts, dtype=torch.float64)  # sum of routing weight * |expert output|
        self.entropy = 0.0  # sum over tokens of the router distribution's entropy (nats)

    def add(self, logits: torch.Tensor, weights: torch.Tensor, out_norms: torch.Tensor | None = None) -> None:
        """logits [T, E]; weights [T, E] from `route`; out_norms [T, E]: |expert_e(x_t)| where routed."""
        probs = torch.softmax(logits.double(), dim=-1)
        self.tokens += logits.shape[0]
        self.count += (weights > 0).double().sum(0).cpu()
        self.prob += probs.sum(0).cpu()
        self.entropy += -(probs * probs.clamp(min=1e-30).log()).sum().item()
        if out_norms is not None:
            self.reap += (weights.double() * out_norms.double()).sum(0).cpu()

    def scores(self, criterion: str) -> torch.Tensor:
        """frequency: share of tokens routed to the expert; gate_weight: mean router probability; reap:
        mean over the expert's routed tokens of routing weight * output norm (REAP's saliency)."""
        t = max(self.tokens, 1)
        if criterion == "frequency":
            return self.count / t
        if criterion == "gate_weight":
            return self.prob / t
        if criterion == "reap":
            return self.reap / self.count.clamp(min=1)
        raise ValueError(criterion)

    def summary(self) -> dict:
        t = max(self.tokens, 1)
        return {"tokens": self.tokens, "tokens_per_expert": [int(c) for c in self.count.tolist()],
                "load": [round(c / t, 6) for c in self.count.tolist()],
                "router_entropy": round(self.entropy / t, 6),  # mean per-token entropy of the router (nats)
                "load_entropy": round(load_entropy(self.count), 6),
                "unrouted": [e for e, c in enumerate(self.count.tolist()) if c == 0]}


def load_entropy(count: torch.Tensor) -> float:
    """Entropy of the expert load distribution over log(E): 1 = perfectly balanced, 0 = one expert."""
    total = count.sum().item()
    if total <= 0 or len(count) < 2:
        return 0.0
    p = count.double() / total
    return -(p * p.clamp(min=1e-30).log()).sum().item() / math.log(len(count))

"""Compression methods. Each module holds one method's config, its logic and one `register(...)` call;
importing this package registers them all. Names that later releases implement are reserved here so
that recipes using them get a clear message instead of "unknown method"."""

from ..registry import reserve
from . import distill, drop_layers, gptq, prune_ffn, prune_heads, qat  # noqa: F401

reserve("moefy", "[6/8] MoE gating")
reserve("prune_experts", "[6/8] MoE gating")
reserve("set_topk", "[6/8] MoE gating")

"""Compression methods. Each module holds one method's config, its logic and one `register(...)` call;
importing this package registers them all. Names that later releases implement are reserved here so
that recipes using them get a clear message instead of "unknown method"."""

from ..registry import reserve
from . import distill, drop_layers, experts, gptq, moefy, prune_ffn, prune_heads, qat  # noqa: F401

reserve("awq", "[10] PTQ beyond GPTQ")
reserve("autoround", "[10] PTQ beyond GPTQ")

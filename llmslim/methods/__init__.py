"""Compression methods. Each module holds one method's config, its logic and one `register(...)` call;
importing this package registers them all. Names that later releases implement are reserved here
(`registry.reserve`) so that recipes using them get a clear message instead of "unknown method"; none is
reserved today."""

from . import autoround, awq, distill, drop_layers, experts, gptq, moefy, prune_ffn, prune_heads, qat  # noqa: F401


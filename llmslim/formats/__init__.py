"""On-disk formats for exported models. `compressed` writes quantized Linear weights in
compressed-tensors format (vLLM's native quantized checkpoint format, also read by transformers)."""

"""Compression methods: each one's recipe parameters in configs/ (the layer below the recipe), its logic in a
module or package here (the layer above it), and one line in llmslim/registry.py that joins the two. Nothing
is imported here: importing any one method must not load the others."""

"""Evaluation: is a compressed model worth serving? Perplexity (how much worse it predicts text),
throughput and memory in vLLM and transformers (how much faster and smaller it serves), size, and
optional downstream tasks, against a baseline.

- sources.py: the SOURCE syntax of `llmslim eval --ppl`
- size.py: parameters, bytes on disk, bytes per parameter, weight-memory ratio
- throughput.py + worker.py: the offline serving benchmark (one child process per model and backend)
- tasks.py: lm-evaluation-harness glue (optional dependency)
- harness.py: runs it all for `llmslim eval` and a recipe's `eval:` section
- report.py: report.json schema (documented there), report.md; plots.py: PNG plots
"""

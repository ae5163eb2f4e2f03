"""PNG plots of an evaluation directory: perplexity vs size, and throughput by batch size.

matplotlib is used through its object API (Figure + the Agg canvas), so nothing global changes: no
backend switch, no pyplot state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import load_records


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def plot_ppl_vs_size(out_dir: Path) -> Path | None:
    """ppl_vs_size.png: one point per model recorded in `out_dir/models`, one series per perplexity
    source (label, seq_len and stride must match to share a series); x is weight memory (bytes)."""
    series: dict[str, list[tuple[float, float, str, bool]]] = {}
    for rec in load_records(out_dir):
        m = rec["model"]
        x = (m.get("size") or {}).get("weight_bytes")
        for label, p in (m.get("perplexity") or {}).items():
            if x and p.get("ppl"):
                key = f"{label} (seq {p['seq_len']}{', stride ' + str(p['stride']) if p.get('stride') else ''})"
                series.setdefault(key, []).append((x / 1e6, p["ppl"], m["name"], m.get("role") == "baseline"))
    if not series:
        return None
    fig, (ax,) = _figure(7, 4.6)
    for key, pts in sorted(series.items()):
        # Points, not a line: the models are different compressions, not samples of one curve.
        (dots,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="none", label=key)
        base = [p for p in pts if p[3]]
        if base:  # the baseline(s) as larger hollow rings around their dot
            ax.plot([p[0] for p in base], [p[1] for p in base], marker="o", markersize=13, linestyle="none",
                    markerfacecolor="none", color=dots.get_color())
        for x, y, name, is_base in pts:
            ax.annotate(name + (" (baseline)" if is_base else ""), (x, y), textcoords="offset points",
                        xytext=(6, 5), fontsize=7)
    ax.set_xlabel("weight memory (MB)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity vs size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "ppl_vs_size.png"
    fig.savefig(path)
    return path


PANELS = (("prefill_tok_s", "prefill tokens/s", 1.0), ("decode_tok_s", "decode tokens/s", 1.0),
          ("itl_s", "inter-token latency p50 (ms)", 1e3))


def plot_throughput(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """throughput_<backend>.png for each backend: prefill and decode tokens/s (median, min–max bars) and
    ITL p50 against batch size, one line per model of this evaluation."""
    paths = []
    backends = list(dict.fromkeys(b for m in report["models"] for b in (m.get("throughput") or {})))
    for backend in backends:
        fig, axes = _figure(12, 3.8, ncols=len(PANELS))
        drawn, ticks = False, set()
        for m in report["models"]:
            t = (m.get("throughput") or {}).get(backend)
            if not t or not t.get("ok"):
                continue
            bs = [b["batch_size"] for b in t["batches"]]
            ticks |= set(bs)
            for ax, (key, _, scale) in zip(axes, PANELS):
                if key == "itl_s":
                    ys = [(b[key]["p50"] or 0) * scale for b in t["batches"]]
                    ax.plot(bs, ys, marker="o", label=m["name"])
                    continue
                med = [(b[key]["median"] or 0) * scale for b in t["batches"]]
                lo = [m_ - (b[key]["min"] or 0) * scale for m_, b in zip(med, t["batches"])]
                hi = [(b[key]["max"] or 0) * scale - m_ for m_, b in zip(med, t["batches"])]
                ax.errorbar(bs, med, yerr=[lo, hi], marker="o", capsize=3, label=m["name"])
            drawn = True
        if not drawn:
            continue
        for ax, (_, title, _) in zip(axes, PANELS):
            ax.set_xlabel("batch size")
            ax.set_title(title, fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ticks), [str(b) for b in sorted(ticks)])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Throughput ({backend})")
        fig.tight_layout()
        path = out_dir / f"throughput_{backend}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def plot_training(record: dict[str, Any], path: Path) -> Path | None:
    """A training stage's curves (from its notes): the loss and its terms by step, and the perplexity on
    eval_data when it was measured."""
    notes = record.get("notes") or {}
    curve, evals = notes.get("curve") or [], notes.get("eval") or []
    if not curve:
        return None
    fig, axes = _figure(9.0 if evals else 5.5, 3.6, 2 if evals else 1)
    steps = [p["step"] for p in curve]
    ax = axes[0]
    for key in ("loss", "logits", "hidden", "lm", "balance"):
        if key in curve[0] and (key == "loss" or len(curve[0]) > 4):
            ax.plot(steps, [p[key] for p in curve], label=key, linewidth=1.6 if key == "loss" else 1.0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"stages[{record['index']}] {record['method']}: training loss", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if evals:
        axes[1].plot([e["step"] for e in evals], [e["ppl"] for e in evals], marker="o")
        axes[1].set_xlabel("optimizer step")
        axes[1].set_ylabel("perplexity (eval_data)")
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_expert_load(record: dict[str, Any], path: Path) -> Path | None:
    """An MoE stage's expert load by layer (from its notes' routing statistics): a heatmap of the share of
    calibration tokens whose top-k holds each expert; experts no token reached are marked with x."""
    layers = ((record.get("notes") or {}).get("routing") or {}).get("layers") or {}
    if not layers:
        return None
    rows = sorted(layers, key=int)
    width = max(len(layers[r]["load"]) for r in rows)
    grid = [layers[r]["load"] + [float("nan")] * (width - len(layers[r]["load"])) for r in rows]
    fig, (ax,) = _figure(min(2.5 + 0.35 * width, 14), min(1.6 + 0.3 * len(rows), 12))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    for y, r in enumerate(rows):
        for e in layers[r].get("unrouted") or []:
            ax.text(e, y, "x", ha="center", va="center", color="red", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(f"stages[{record['index']}] {record['method']}: expert load (share of tokens; x = none)", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

"""What the training benchmarks (bench_distill, bench_qat) share: stories260K and TinyStories under
../shared, and one timed recipe run on them. Calibration and training text come from the first half of
dev.txt, perplexity from the second half in 512-token windows, as in the README's tables."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMSLIM_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "stories260K-hf"
TEXT = SHARED / "data" / "tinystories" / "dev.txt"
LIMIT_S = 600  # the acceptance line of both: every run within 10 minutes on 2 CPU cores


def missing() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if MODEL.is_dir() and TEXT.is_file():
        return None
    return f"skipped: {MODEL} or {TEXT} not found (this benchmark needs ../shared; set LLMSLIM_SHARED)"


def run_timed(root: Path, name: str, stages: list[dict], *, train_seq_len: int = 256) -> tuple[dict, dict[str, Any]]:
    """Run `stages` on stories260K into root/name, export checked in transformers, perplexity before and
    after: (the report, {name, ppl, ppl_original, seconds of the whole run})."""
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    recipe = {
        "model": str(MODEL), "output": str(root / name), "seed": 0,
        "data": {"calib": {"path": str(TEXT), "fraction": [0.0, 0.5], "samples": 128, "seq_len": 512},
                 "train": {"path": str(TEXT), "fraction": [0.0, 0.5], "seq_len": train_seq_len},
                 "heldout": {"path": str(TEXT), "fraction": [0.5, 1.0], "seq_len": 512}},
        "stages": stages, "export": {"check": "transformers"}, "eval": {"perplexity": ["heldout"]},
    }
    started = time.perf_counter()
    report = run(parse_recipe(yaml.safe_dump(recipe), f"{name}.yaml"))
    seconds = time.perf_counter() - started
    ev = report["eval"]
    out = {"name": name, "ppl": ev["after"]["perplexity"]["heldout"]["ppl"],
           "ppl_original": ev["before"]["perplexity"]["heldout"]["ppl"], "seconds": round(seconds, 1)}
    print(f"  {name}: perplexity {out['ppl']:.3f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return report, out


def start(name: str) -> Path | None:
    """The benchmark's work folder (a new temporary one), after quieting transformers; None (after saying
    why) when ../shared is absent."""
    import tempfile

    import transformers

    if missing():
        print(missing())
        return None
    transformers.utils.logging.set_verbosity_error()
    return Path(tempfile.mkdtemp(prefix=f"llmslim-bench-{name}-"))

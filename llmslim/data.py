"""Text sources -> token windows.

A source is a local file (.txt, .jsonl, .parquet) or a `datasets` dataset. Its text is tokenized as one
stream (rows joined with blank lines, the GPTQ papers' convention for WikiText) and cut into
non-overlapping windows of `seq_len` tokens; the trailing partial window is dropped. Literal special-token
strings in the data (e.g. WikiText's `<unk>`) are encoded as text, never as control tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import UserError
from .recipe import DataSource

if TYPE_CHECKING:
    from .generated import Generations

log = logging.getLogger(__name__)


def read_text(src: DataSource, name: str) -> str:
    """The text of source `name`, restricted to its `fraction`."""
    lo, hi = src.fraction
    if src.path is not None:
        path = Path(src.path)
        if not path.is_file():
            raise UserError(f"data.{name}.path: file not found: {src.path}")
        suffix = path.suffix.lower()
        if suffix in (".txt", ".text", ".md", ""):
            text = path.read_text(encoding="utf-8", errors="replace")
            return _cut_text(text, lo, hi)
        if suffix == ".jsonl":
            rows = _jsonl_rows(path, src.field, name)
        elif suffix == ".parquet":
            rows = _parquet_rows(path, src.field, name)
        else:
            raise UserError(f"data.{name}.path: unsupported file type '{suffix}' ({src.path}); "
                            "expected .txt, .jsonl or .parquet")
    else:
        rows = _dataset_rows(src, name)
    n = len(rows)
    return "\n\n".join(rows[int(lo * n): int(hi * n)])


def _cut_text(text: str, lo: float, hi: float) -> str:
    """Characters [lo, hi) of the text, with both cuts moved to the next line start."""
    def snap(frac: float) -> int:
        if frac <= 0.0:
            return 0
        if frac >= 1.0:
            return len(text)
        i = text.find("\n", int(frac * len(text)))
        return len(text) if i < 0 else i + 1
    return text[snap(lo): snap(hi)]


def _jsonl_rows(path: Path, field: str, name: str) -> list[str]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise UserError(f"{path}:{lineno}: no field '{field}' (data.{name}.field); found: {keys}")
            rows.append(str(obj[field]))
    return rows


def _parquet_rows(path: Path, field: str, name: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if field not in table.column_names:
        raise UserError(f"{path}: no column '{field}' (data.{name}.field); columns: {', '.join(table.column_names)}")
    return [str(x) for x in table.column(field).to_pylist()]


def _dataset_rows(src: DataSource, name: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(src.dataset, src.name, split=src.split)
    except Exception as e:  # datasets raises many types for a missing/unreachable dataset
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data.{name}: cannot load dataset {src.dataset!r}"
                        f"{' / ' + src.name if src.name else ''} split {src.split!r}: {first}") from None
    if src.field not in ds.column_names:
        raise UserError(f"data.{name}.field: dataset {src.dataset!r} has no field '{src.field}'; "
                        f"fields: {', '.join(ds.column_names)}")
    return [str(x) for x in ds[src.field]]


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """One token stream for the whole text, with the tokenizer's own BOS/EOS convention."""
    ids = tokenizer(text, add_special_tokens=True, split_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int, samples: int | None, *, seed: int | None, name: str) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows [N, seq_len]. With `samples`, keep that many:
    chosen at random (seeded) when `seed` is given, else the first ones."""
    total = stream.numel() // seq_len
    if total == 0 or (samples is not None and samples > total):
        want = samples or 1
        raise UserError(f"data.{name}: needs {want} window(s) of {seq_len} tokens but the text has only "
                        f"{stream.numel()} tokens ({total} windows); lower samples or seq_len, or add text")
    all_windows = stream[: total * seq_len].view(total, seq_len)
    if samples is None or samples == total:
        return all_windows
    if seed is None:
        return all_windows[:samples]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(total, generator=g)[:samples].sort().values
    return all_windows[pick]


class DataHub:
    """Token windows for the recipe's named sources, tokenized once per source and cached. A source with
    `generate` needs `generations` (llmslim.generated), which turns windows of its text into a model's
    continuations; its stream is then those windows end to end, which cut back into the same windows."""

    def __init__(self, sources: dict[str, DataSource], tokenizer, *, seed: int, max_len: int | None = None,
                 generations: Generations | None = None):
        self.sources = sources
        self.tokenizer = tokenizer
        self.seed = seed
        self.max_len = max_len
        self.generations = generations
        self._streams: dict[str, torch.Tensor] = {}

    def stream(self, name: str) -> torch.Tensor:
        if name not in self._streams:
            if self.tokenizer is None:
                raise UserError(f"data.{name}: the model has no tokenizer files, so text cannot be tokenized")
            self._streams[name] = tokenize(read_text(self.sources[name], name), self.tokenizer)
            if self.sources[name].generate is not None:
                self._streams[name] = self._generated(name, self._streams[name]).flatten()
            log.info("data.%s: %d tokens", name, self._streams[name].numel())
        return self._streams[name]

    def _generated(self, name: str, text: torch.Tensor) -> torch.Tensor:
        """The model's windows [samples, seq_len] for prompts from windows of the source's text."""
        src = self.sources[name]
        if self.generations is None:
            raise UserError(f"data.{name}.generate: generated data is made by `llmslim run` (it needs the run's work "
                            "directory); here, use a source without generate")
        prompts_from = windows(text, src.seq_len, src.samples, seed=self.seed, name=name)
        return self.generations.windows(name, src, prompts_from)

    def seq_len(self, name: str) -> int:
        n = self.sources[name].seq_len
        if self.sources[name].generate is not None:  # its windows are fixed (validated against the context)
            return n
        return min(n, self.max_len) if self.max_len else n

    def calibration(self, name: str) -> torch.Tensor:
        """Calibration windows [samples, seq_len], sampled at random (seeded) from the source."""
        src = self.sources[name]
        return windows(self.stream(name), self.seq_len(name), src.samples, seed=self.seed, name=name)

    def evaluation(self, name: str) -> torch.Tensor:
        """Evaluation windows [N, seq_len]: all of them, or the first `samples`."""
        src = self.sources[name]
        return windows(self.stream(name), self.seq_len(name), src.samples, seed=None, name=name)

"""Perplexity sources named on the command line.

    SOURCE    := FILE[:FIELD][@START-END] | DATASET[:CONFIG[:SPLIT[:FIELD]]][@START-END]

- FILE: a local .txt (read as it is), .jsonl (one JSON object a line, text in FIELD, default "text") or
  .parquet (column FIELD, default "text") file; rows are joined with blank lines. Anything that exists on
  disk as a file, ends in one of those suffixes, or starts like a path (`/`, `./`, `../`, `~`) is a file;
  a missing file is an error, never a dataset lookup.
- DATASET: a `datasets` id (or a local dataset directory) with its configuration, split (default
  "test") and text field (default "text"); rows are joined with blank lines ("\\n\\n"), the GPTQ papers'
  convention. Example: `wikitext:wikitext-2-raw-v1:test`. An empty part keeps its default
  (`mydata::validation`).
- @START-END: the part of the source to use, as fractions of its rows (of its characters, cut at line
  starts, for .txt), e.g. `dev.txt@0.5-1.0` for the second half.

A recipe names its sources under `data:` instead; both end up as the same `DataSource`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..data import read_text
from ..errors import UserError
from ..recipe import DataSource

FILE_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".parquet")
_FRACTION = re.compile(r"^(?P<spec>.+?)@(?P<lo>[0-9.]+)-(?P<hi>[0-9.]+)$")


@dataclass(frozen=True)
class Source:
    """A parsed SOURCE: its label in reports (the spec as given) and the DataSource it describes."""

    label: str
    data: DataSource


def parse_source(spec: str) -> Source:
    """Parse one SOURCE (see the module docstring); raises UserError naming the spec when it is bad."""
    text, fraction = spec.strip(), (0.0, 1.0)
    if m := _FRACTION.match(text):
        try:
            fraction = (float(m["lo"]), float(m["hi"]))
        except ValueError:
            raise UserError(f"--ppl {spec}: bad fraction '@{m['lo']}-{m['hi']}'; expected e.g. @0.5-1.0") from None
        if not 0.0 <= fraction[0] < fraction[1] <= 1.0:
            raise UserError(f"--ppl {spec}: fraction must satisfy 0 <= start < end <= 1")
        text = m["spec"]
    if not text:
        raise UserError(f"--ppl {spec!r}: empty source; give a file path or DATASET[:CONFIG[:SPLIT[:FIELD]]]")
    path = Path(text).expanduser()
    field = "text"
    head, sep, tail = text.rpartition(":")
    if sep and not path.is_file() and head.lower().endswith((".jsonl", ".parquet")) and tail:
        path, field = Path(head).expanduser(), tail  # FILE:FIELD
    if path.is_file() or str(path).lower().endswith(FILE_SUFFIXES) or text.startswith(("/", "./", "../", "~")):
        if not path.is_file():
            raise UserError(f"--ppl {spec}: file not found: {path}")
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise UserError(f"--ppl {spec}: unsupported file type '{path.suffix}'; expected .txt, .jsonl or .parquet")
        return Source(spec, DataSource(path=str(path), field=field, fraction=fraction))
    if path.is_dir() and (path / "config.json").is_file():
        raise UserError(f"--ppl {spec}: that is a model directory, not a text source")
    parts = text.split(":")
    if len(parts) > 4:
        raise UserError(f"--ppl {spec}: too many ':' parts; expected DATASET[:CONFIG[:SPLIT[:FIELD]]]")
    dataset, name, split, field = (parts + [""] * 4)[:4]
    if not dataset:
        raise UserError(f"--ppl {spec}: no dataset name before ':'")
    return Source(spec, DataSource(dataset=dataset, name=name or None, split=split or "test", field=field or "text",
                                   fraction=fraction))


def load_source_text(source: Source) -> str:
    """The text of a source; a missing file or an unknown/unreachable dataset raises a one-line UserError
    that names the source as the user wrote it."""
    try:
        return read_text(source.data, source.label)
    except UserError as e:
        # data.py names recipe fields (data.<name>...); on the command line the source itself is the name.
        message = re.sub(r"^data\." + re.escape(source.label) + r"(\.\w+)?:", f"--ppl {source.label}:", str(e))
        message = message.replace(f"(data.{source.label}.field)", f"(--ppl {source.label})")
        raise UserError(message.splitlines()[0]) from None

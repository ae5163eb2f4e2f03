"""Which files of an export are llmslim's: the record the report keeps, and what is on disk now.

`llmslim_report.json` lists, under `export.files`, every file llmslim wrote into the export, at any depth:
`{"path": "eval/report.md", "size": 1234, "sha256": "..."}` (paths relative to the export, `/`-separated).
The report itself is the record and is not listed. `llmslim push` adds the model card it writes (README.md)
to the record, so a card llmslim wrote is recognised by its hash, and a card somebody edited is not.

An export is llmslim's alone, and may be deleted, replaced or pushed, only when what is on disk is what
the record lists: a file or folder it does not list (at any depth) was added by somebody; a listed file
whose size or content differs was changed by somebody. Either makes the export not ours to delete
(`--replace-output` moves it aside instead) and not ours to publish.

Reports of earlier llmslim versions list top-level names only (`export.files: ["config.json", "eval",
...]`): their top-level files are taken as llmslim's, but nothing inside a folder can be told from a
file added since, so every file below the top level counts as added (conservative: such an export is
moved aside, never deleted, and rewritten by the next run).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT = "llmslim_report.json"
CHUNK = 16 << 20  # bytes per read when hashing: large weight files are streamed, not loaded
CARD = "README.md"  # the model card `llmslim push` writes into the export (card.py)
# The first line of the body, for readers of the file. llmslim tells its own card (which it may rewrite, or
# replace with the export) from anybody's README.md by the report's record of it (size, sha256: write_card);
# the marker is how exports whose report lists names only (an earlier llmslim's) were told apart.
MARKER = "<!-- model card written by `llmslim push` from llmslim_report.json; it rewrites this file -->"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def file_entry(export: Path, rel: str) -> dict[str, Any]:
    """The record of one file of `export` as it is now."""
    path = export / rel
    return {"path": rel, "size": path.stat().st_size, "sha256": sha256_of(path)}


def _walk(export: Path) -> tuple[list[str], list[str]]:
    """Every file (and link, and other non-directory entry) under `export`, and every folder, as relative
    `/` paths; links to folders are entries, not followed."""
    files, folders = [], []
    for top, dirs, names in os.walk(export, followlinks=False):
        rel = Path(top).relative_to(export)
        for d in list(dirs):
            if (Path(top) / d).is_symlink():
                dirs.remove(d)
                names.append(d)
            else:
                folders.append((rel / d).as_posix())
        files += [(rel / n).as_posix() for n in names]
    return sorted(files), sorted(folders)


def record_files(export: Path) -> list[dict[str, Any]]:
    """The record of every file in `export` except the report (which holds the record)."""
    files, _ = _walk(export)
    return [file_entry(export, rel) for rel in files if rel != REPORT]


def add_to_record(export: Path, rel: str) -> None:
    """Record (again) one file llmslim wrote into a finished export: the model card `llmslim push` writes.
    The report is rewritten through a temporary file and a rename."""
    path = export / REPORT
    report = json.loads(path.read_text())
    files = [e for e in report["export"]["files"] if not (is_entry(e) and e["path"] == rel)]
    report["export"]["files"] = sorted(files + [file_entry(export, rel)], key=lambda e: str(e.get("path")))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def export_containing(path: Path) -> Path | None:
    """The llmslim export that `path` is or lies inside (a folder holding a report), if any."""
    resolved = path.resolve()
    return next((p for p in (resolved, *resolved.parents) if (p / REPORT).is_file()), None)


def is_own_card(path: Path) -> bool:
    """Whether `path` carries the marker of a card llmslim wrote (for an earlier llmslim's exports only:
    newer ones record the card's hash)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARKER in f.read(64 * 1024)
    except OSError:
        return False


@dataclass
class Audit:
    """How an export on disk compares with its record."""

    added: list[str] = field(default_factory=list)  # not in the record (folders end with "/")
    changed: list[tuple[str, str]] = field(default_factory=list)  # (path, what differs)
    missing: list[str] = field(default_factory=list)  # recorded, gone
    legacy: bool = False  # an earlier llmslim's report: top-level names only

    @property
    def ours(self) -> bool:
        """Nothing added or changed: llmslim may delete or replace the export (a missing file loses nothing)."""
        return not self.added and not self.changed


def read_record(export: Path) -> list[Any] | None:
    """The report's `export.files` (None: no readable report, or no such list)."""
    try:
        files = json.loads((export / REPORT).read_text())["export"]["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, list) else None


def is_entry(item: Any) -> bool:
    """Whether `item` is one file's record (not an earlier llmslim's bare name)."""
    return (isinstance(item, dict) and isinstance(item.get("path"), str) and isinstance(item.get("size"), int)
            and isinstance(item.get("sha256"), str))


def audit(export: Path, *, hashes: bool = True) -> Audit:
    """Compare `export` with its record. hashes=False compares names and sizes only (a quick look before a
    run; whatever deletes or publishes the export compares the content too)."""
    files, folders = _walk(export)
    record = read_record(export)
    if record is None:  # not (or no longer) a readable llmslim report: nothing is vouched for
        return Audit(added=[f for f in files if f != REPORT] + [f"{d}/" for d in folders if "/" not in d])
    if not all(is_entry(e) for e in record):
        return _audit_legacy(export, record, files)
    out = Audit()
    recorded = {e["path"]: e for e in record}
    parents = {p.as_posix() for rel in recorded for p in Path(rel).parents}
    out.added = [f for f in files if f != REPORT and f not in recorded]
    out.added += [f"{d}/" for d in folders if d not in parents and not any(a.startswith(d + "/") for a in out.added)]
    for rel, entry in recorded.items():
        path = export / rel
        if path.is_symlink() or path.is_dir():
            out.changed.append((rel, f"now a {'link' if path.is_symlink() else 'folder'}"))
            continue
        if not path.exists():
            out.missing.append(rel)
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            out.changed.append((rel, f"size {entry['size']} -> {size} bytes"))
        elif hashes and (now := sha256_of(path)) != entry["sha256"]:
            out.changed.append((rel, f"same size, sha256 {entry['sha256'][:12]}... -> {now[:12]}..."))
    out.added.sort()
    return out


def _audit_legacy(export: Path, names: list[Any], files: list[str]) -> Audit:
    listed = {n for n in names if isinstance(n, str)} | {"llmslim_report.md"}
    if is_own_card(export / CARD):  # how an earlier llmslim told its card apart
        listed.add(CARD)
    added = [f for f in files if f != REPORT and ("/" in f or f not in listed)]
    return Audit(added=added, legacy=True)


def describe(audit: Audit, limit: int = 3) -> str:
    """`files llmslim did not write (a, b and 2 more)` and/or `files changed since llmslim wrote them (...)`."""
    def some(items: list[str]) -> str:
        return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    parts = [f"files llmslim did not write ({some(audit.added)})" if audit.added else "",
             f"files changed since llmslim wrote them ({some([f'{p} ({why})' for p, why in audit.changed])})"
             if audit.changed else ""]
    text = " and ".join(p for p in parts if p)
    if audit.legacy and any("/" in a for a in audit.added):
        text += (f" (its {REPORT}, from an earlier llmslim, records top-level names only, so files inside its "
                 "folders cannot be told from files added since)")
    return text

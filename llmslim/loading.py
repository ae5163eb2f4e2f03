"""Finding a model on disk or the Hub, and its tokenizer: what the pipeline and the eval harness share.

A Hub id is downloaded with huggingface_hub (safetensors, configs and tokenizer files only); a local
directory is used as it is. Errors are one line naming what was asked for and what went wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def looks_like_hub_id(spec: str) -> bool:
    """`owner/name` or `name`, not a path (a path that does not exist is reported as such)."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec)) and not spec.startswith((".", "/", "~"))


def download(repo_id: str, revision: str | None, safetensors_only: bool = True, *, field: str = "model") -> Path:
    """A local snapshot of a Hub model (weights as safetensors unless `safetensors_only` is off)."""
    from huggingface_hub import snapshot_download

    # README.md: the model card, whose license the card of a compressed export inherits (llmslim.card)
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]
    if not safetensors_only:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"{field}: '{repo_id}' is not a local directory and could not be fetched from the Hugging "
                        f"Face Hub: {type(e).__name__}: {reason}; check the path, or the id, your token and your "
                        "network") from None


def resolve_model(spec: str, revision: str | None = None, *, field: str | None = None) -> Path:
    """A local model directory for a directory path or Hub id (downloaded, safetensors only). Errors start
    with `field: ` when given (a recipe field), else with the path itself (a command-line argument)."""
    where = f"{field}: " if field else ""
    path = Path(spec).expanduser()
    if not path.exists():
        if not looks_like_hub_id(spec):
            raise UserError(f"{where}{spec}: no such model directory")
        path = download(spec, revision, True, field=field or spec)
    if not (path / "config.json").is_file():
        raise UserError(f"{where}{spec}: not a model directory (no config.json)")
    return path


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: Path) -> Any:
    """The model's tokenizer, or None when the directory has no tokenizer files (tiny test models). A
    tokenizer whose files are there but do not load is an error, never silently skipped."""
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"{path}: the tokenizer files do not load: {type(e).__name__}: {reason}") from None

"""Shared fixtures: tiny random models of every architecture, the reference model, ../shared paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMSLIM_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K-hf"
DEV_TXT = SHARED / "data" / "tinystories" / "dev.txt"
WIKI_TEST = SHARED / "data" / "wikitext-2" / "test.txt"
REFERENCE = REPO / "llmslim" / "assets" / "reference"


def need(*paths: Path) -> None:
    """Skip the calling test, with the reason, when shared material is absent."""
    for p in paths:
        if not p.exists():
            pytest.skip(f"{p} not found: this test needs the shared model/data (set LLMSLIM_SHARED to its folder)")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, tied=False, gqa=True) -> path of a saved tiny random model (built once per session)."""
    from tiny_models import save_tiny

    cache: dict = {}

    def make(arch: str, **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
            cache[key] = save_tiny(arch, tmp_path_factory.mktemp(name), **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_tok(tiny, tmp_path_factory):
    """tiny_tok(arch, **kw) -> a copy of tiny(arch, **kw) with tokenizer files (for stages that read text)."""
    import shutil

    from tiny_models import add_tokenizer

    tokenizer = add_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    cache: dict = {}

    def make(arch: str, **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            dst = tmp_path_factory.mktemp(arch) / "model"
            shutil.copytree(tiny(arch, **kw), dst)
            for f in tokenizer.iterdir():
                shutil.copy2(f, dst / f.name)
            cache[key] = dst
        return cache[key]

    return make


SMOLLM2_GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF that scripts/setup.sh brings (`llmslim convert`, once per
    session): a real 135M-parameter Llama in float32 safetensors."""
    from cli_runner import run_cli

    assert SMOLLM2_GGUF.is_file(), f"{SMOLLM2_GGUF} is missing: scripts/setup.sh puts it there"
    out = tmp_path_factory.mktemp("smollm2") / "model"
    rc, log = run_cli("convert", str(SMOLLM2_GGUF), str(out), "--quiet")
    assert rc == 0, log
    return out


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

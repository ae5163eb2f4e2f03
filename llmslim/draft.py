"""Draft models for speculative decoding: the pairing check, and vLLM's speculative config.

A draft proposes `k` tokens per step with a small model; the target verifies them in one forward pass and
keeps the longest prefix it agrees with (plus one token of its own). vLLM's `draft_model` method feeds the
draft the target's token ids, so the two must share one vocabulary: vLLM itself compares only the
configs' vocab_size (config.speculative.verify_equal_vocab_size_if_draft_model); a draft whose tokenizer
maps text to other ids would pass that and then propose tokens the target never accepts. `vocab_problem`
checks both, before a recipe runs, a server starts or a benchmark loads anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError

DEFAULT_SPEC_TOKENS = 4  # tokens the draft proposes per step (vLLM's num_speculative_tokens)
# Encoded with both tokenizers: words, digits, punctuation, spacing and non-ASCII text, so that two
# tokenizers which only share their common words still differ here.
PROBE_TEXT = ("Once upon a time, a little girl named Lily found 3 red balls (and 12 blue ones) in the park.\n"
              "\"Why?\" she asked. It costs $4.50 — naïve café, 東京, 2026-12-01; x = y**2 + 1.")


def _vocab_size(config: dict[str, Any]) -> int | None:
    v = (config.get("text_config") or config).get("vocab_size")
    return int(v) if isinstance(v, int) else None


def vocab_problem(draft_config: dict[str, Any], target_config: dict[str, Any], draft_dir: Path | None = None,
                  target_dir: Path | None = None) -> str | None:
    """What differs between the draft's and the target's vocabularies (None: they can be paired).

    Checks the configs' vocab_size (what vLLM compares), that each tokenizer fits its model's embeddings,
    and the token ids of PROBE_TEXT under both tokenizers, where both directories have one (a draft with
    no tokenizer files is served with the target's)."""
    dv, tv = _vocab_size(draft_config), _vocab_size(target_config)
    if dv != tv:
        return (f"the draft's vocab_size is {dv} and the target's {tv} (config.json); vLLM pairs a draft only with a "
                "model of the same vocabulary: make the draft from the target (or a model sharing its tokenizer)")
    if draft_dir is None or target_dir is None:
        return None
    from .loading import load_tokenizer

    draft_tok, target_tok = load_tokenizer(draft_dir), load_tokenizer(target_dir)
    for who, tok in (("draft", draft_tok), ("target", target_tok)):
        if tok is not None and len(tok) > (tv or 0):
            return (f"the {who}'s tokenizer has {len(tok)} tokens but its embeddings only {tv} rows (vocab_size); "
                    "a draft and its target need embeddings at least as large as the shared tokenizer")
    if draft_tok is None or target_tok is None:
        return None
    a, b = draft_tok.encode(PROBE_TEXT), target_tok.encode(PROBE_TEXT)
    if a != b:
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        da, db = (ids[i] if i < len(ids) else "(end)" for ids in (a, b))
        return (f"the tokenizers encode a probe text differently (draft {len(a)} tokens, target {len(b)}; first "
                f"difference at token {i}: draft id {da}, target id {db}); a draft needs the target's tokenizer "
                "(same token ids for the same text)")
    return None


def check_pair(draft: str, target: str, draft_config: dict[str, Any], target_config: dict[str, Any], *,
               flag: str = "--draft") -> None:
    """UserError (one line, starting with `flag`) when `draft` cannot serve as a draft for `target` (their
    config.json given). Local directories get the tokenizer check too; Hub ids the config check."""
    d, t = Path(draft), Path(target)
    problem = vocab_problem(draft_config, target_config, d if d.is_dir() else None, t if t.is_dir() else None)
    if problem:
        raise UserError(f"{flag} {draft}: not a draft for {target}: {problem}")


def speculative_config(draft: str, spec_tokens: int) -> dict[str, Any]:
    """vLLM's `speculative_config` for a separate draft model."""
    if spec_tokens < 1:
        raise UserError(f"--spec-tokens {spec_tokens}: must be at least 1 (tokens the draft proposes per step)")
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": int(spec_tokens)}


def speculative_args(draft: str, spec_tokens: int) -> list[str]:
    """The server's flag for speculative decoding with `draft`."""
    return [f"--speculative-config={json.dumps(speculative_config(draft, spec_tokens), separators=(',', ':'))}"]


def serve_command(target: str, draft: str, spec_tokens: int = DEFAULT_SPEC_TOKENS) -> str:
    """The command that serves `target` with `draft` proposing tokens (for reports and model cards)."""
    return f"llmslim serve {target} --draft {draft} --spec-tokens {spec_tokens}"


def acceptance(drafts: int, draft_tokens: int, accepted: int) -> dict[str, Any]:
    """Spec-decode counters as vLLM logs them: acceptance rate = accepted / proposed tokens; mean accepted
    length = 1 + accepted / drafts (tokens per target step, the target's own token included)."""
    return {"drafts": drafts, "draft_tokens": draft_tokens, "accepted_tokens": accepted,
            "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None}

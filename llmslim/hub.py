"""`llmslim push`: upload a checked export and its model card to the Hugging Face Hub.

What is pushed: exactly the files the export's report records (what `llmslim run` wrote and checked, with
their sizes and sha256 hashes; ownership.py), the report, and the card (README.md, written into the export
and added to the record first). An export holding anything else, at any depth, or a recorded file whose
size or content changed since, is refused before the Hub is contacted: it is no longer what llmslim
wrote and checked, and a file somebody put there is never published.

An existing repository is never committed to unless asked: `exist_ok` (commit to main), `revision`
(commit to that branch, created from main when missing) or `create_pr` (open a pull request).

Resuming: everything goes through one `HfApi.upload_folder` call; rerunning the same push after an
interruption skips the work that finished, by huggingface_hub's own mechanisms (2.4):
- before uploading, its preupload request asks the Hub for the oid of each file already in the target
  revision; files whose local oid matches (git sha1 for regular files, sha256 for LFS/Xet ones) are
  dropped from the commit (the no-op detection in `create_commit` and in the pipelined upload);
- with hf_xet installed (the default), the pipelined upload commits in batches and Xet storage
  deduplicates content by chunk, so chunks an interrupted run already sent are not sent again;
- without hf_xet, large files go through the LFS batch API, which answers "already present" (no upload
  action) for objects the Hub stored before the interruption, so only the missing ones are sent.
huggingface_hub 2.4 has no `upload_large_folder` any more: with hf_xet, `upload_folder` itself is the
streamed multi-commit upload meant for large folders, so one call serves every export size.

The token comes from HF_TOKEN or the cached login; llmslim only asks whether there is one, never reads
it out, and writes it nowhere. Hub errors become one line that says what to do (`hub_error`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .card import CARD, write_card
from .errors import UserError
from .ownership import REPORT, audit, is_entry
from .report import human_bytes
from .workspace import Workspace

if TYPE_CHECKING:
    from .recipe import PushConfig

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?")


class PushError(UserError):
    """The Hub refused or failed the push; the export is unchanged (exit code 2)."""


def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` cannot name a Hub model repository (None: it can)."""
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        return (f"expected a Hub repository id namespace/name (letters, digits, '-', '_', '.'), e.g. "
                f"me/stories-slim; found {repo_id!r}")
    if len(repo_id.split("/")[1]) > 96 or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        return f"{repo_id!r}: a Hub repository name has at most 96 characters, no '--' or '..', no .git ending"
    return None


def may_exist(req: PushConfig) -> bool:
    """Whether the repository may already exist (the push then commits to it as asked)."""
    return req.exist_ok or req.revision is not None or req.create_pr


def retry_command(req: PushConfig, export: Path, exists: bool) -> str:
    """The `llmslim push` command that retries this push (`exists`: the repository exists by now)."""
    flags = ([] if req.private else ["--public"]) + (["--revision", req.revision] if req.revision else [])
    flags += ["--create-pr"] if req.create_pr else []
    if req.exist_ok or (exists and not may_exist(req)):  # the repository this push created is there now
        flags.append("--exist-ok")
    flags += ["--commit-message", req.commit_message] if req.commit_message else []
    return shlex.join(["llmslim", "push", str(export), req.repo_id, *flags])


@dataclass
class PushResult:
    """What a push sent (or, dry run, would send)."""

    repo_id: str
    files: list[tuple[str, int]]  # path in the repository, bytes
    card: Path
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    created_repo: bool = False

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)


def checked_report(export: Path) -> dict[str, Any]:
    """The export's report, after making sure the export is one llmslim wrote and did not fail its check."""
    if not export.is_dir():
        raise UserError(f"{export}: no such export directory")
    try:
        report = json.loads((export / REPORT).read_text())
        if not isinstance(report["export"]["files"], list):
            raise TypeError("export.files is not a list")
        legacy = not all(is_entry(e) for e in report["export"]["files"])
    except FileNotFoundError:
        raise UserError(f"{export}: not an llmslim export (no {REPORT}); push exports that `llmslim run` wrote "
                        "and checked") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{export / REPORT}: unreadable report ({type(e).__name__}: {e}); rerun `llmslim run` "
                        "to write the export again") from None
    if legacy:
        raise UserError(f"{export / REPORT}: export.files lists file names only (written by an earlier llmslim), "
                        "not their sizes and sha256 hashes, so push cannot tell llmslim's files from files added or "
                        "changed since; write the export again with `llmslim run RECIPE --replace-output` (the old "
                        "one is moved aside)")
    check = report.get("check")
    if check and not check.get("passed"):
        raise UserError(f"{export}: its check failed ({REPORT}: check.passed is false: {check.get('detail')}); "
                        "llmslim does not push a model that failed its check: fix the recipe and rerun `llmslim run`")
    if not (export / "config.json").is_file():
        raise UserError(f"{export}: config.json is missing; rerun `llmslim run` to write the export again")
    return report


def _more(paths: list[str]) -> str:
    if len(paths) < 2:
        return ""
    return f" (and {len(paths) - 1} more: {', '.join(paths[1:4])}{' ...' if len(paths) > 4 else ''})"


def verify_export(export: Path) -> None:
    """Refuse, in one line, an export that is no longer exactly what llmslim wrote: a file or folder its
    record does not list (at any depth), a recorded file whose size or sha256 differs, or one that is gone.
    The card is llmslim's to rewrite only when it is the one llmslim recorded."""
    found = audit(export)
    what = "push uploads an export only as llmslim wrote it"
    readme = export / CARD
    if CARD in found.added:
        raise UserError(f"{readme}: a README.md llmslim did not write; llmslim will not replace it (push writes the "
                        "model card there): move it out of the export and push again")
    changed = dict(found.changed)
    if CARD in changed:
        raise UserError(f"{readme}: changed since llmslim wrote it ({changed[CARD]}); llmslim will not replace it "
                        "(push writes the model card there): move it out of the export and push again")

    if found.added:
        first = found.added[0]
        raise UserError(f"{export / first}: not written by llmslim (not in {REPORT}'s export.files){_more(found.added)}; "
                        f"{what}: move it out of the export and push again")
    if found.changed:
        (rel, why), others = found.changed[0], [p for p, _ in found.changed]
        raise UserError(f"{export / rel}: changed since llmslim wrote it ({why}){_more(others)}; {what}: "
                        "restore it, or write the export again with `llmslim run RECIPE --replace-output` (the "
                        "changed one is moved aside)")
    missing = [m for m in found.missing if m != CARD]  # the card is written again anyway
    if missing:
        raise UserError(f"{export / missing[0]}: missing (recorded in {REPORT}'s export.files){_more(missing)}; {what}: "
                        "rerun `llmslim run` on its recipe to write the export again")


def export_files(export: Path, report: dict[str, Any]) -> list[tuple[str, int]]:
    """The files to push (path in the repository, bytes): those the report records, and the report."""
    files = [(e["path"], e["size"]) for e in report["export"]["files"]]
    return sorted(files + [(REPORT, (export / REPORT).stat().st_size)])


def default_commit_message(report: dict[str, Any]) -> str:
    methods = " + ".join(s["method"] for s in report.get("stages", [])) or "re-export"
    return f"llmslim: {methods} of {Path(report['model']).name if Path(report['model']).exists() else report['model']}"


def push(export: str | Path, req: PushConfig, *, dry_run: bool = False,
         on_repo_created: Callable[[], None] | None = None) -> PushResult:
    """Write the card into `export` and upload the export to `req.repo_id` (dry run: only the card, and the
    list of what would be uploaded; the Hub is not contacted). `on_repo_created` runs once the repository
    was created by this push, before anything is uploaded."""
    export = Path(export)
    problem = repo_id_problem(req.repo_id)
    if problem:
        raise UserError(f"REPO_ID: {problem}")
    checked_report(export)
    verify_export(export)
    card = write_card(export, req.repo_id)  # and adds it to the record
    report = checked_report(export)
    files = export_files(export, report)
    result = PushResult(req.repo_id, files, card)
    if dry_run:
        return result
    from huggingface_hub import HfApi, get_token

    if get_token() is None:  # asked only whether there is one: the token itself stays in huggingface_hub
        raise PushError("no Hugging Face token: set HF_TOKEN to a token with write access, or log in with "
                        f"`hf auth login`, then run: {retry_command(req, export, exists=False)}")
    # HF_ENDPOINT read now, not when huggingface_hub was imported (a process forked after that import,
    # e.g. a server or a test harness, would otherwise keep the value of its parent)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, library_name="llmslim", library_version=_version())
    exists = False
    try:
        url = api.create_repo(req.repo_id, private=req.private, exist_ok=may_exist(req))
        exists, result.repo_url, result.created_repo = True, str(url), not may_exist(req)
        if result.created_repo and on_repo_created:
            on_repo_created()
        if req.revision:
            api.create_branch(req.repo_id, branch=req.revision, exist_ok=True)
        # allow_patterns are fnmatch patterns: escaped, each matches its one file and nothing else
        info: Any = api.upload_folder(repo_id=req.repo_id, folder_path=export,
                                      allow_patterns=[glob.escape(p) for p, _ in files],
                                      commit_message=req.commit_message or default_commit_message(report),
                                      revision=req.revision, create_pr=req.create_pr)
    except KeyboardInterrupt:
        if exists:  # the CLI's "rerun the same command" would meet the repository this push created
            log.warning("push interrupted; to resume: %s", retry_command(req, export, exists))
        raise
    except Exception as e:  # every failure becomes one line; the export is kept
        raise hub_error(e, req, export, exists, api.endpoint) from None
    result.commit_url, result.commit_oid, result.pr_url = info.commit_url, info.oid, info.pr_url
    return result


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmslim")
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------- errors


def _http_error(e: BaseException) -> Any:
    """The HfHubHTTPError behind `e` (huggingface_hub wraps failed uploads in RuntimeError), if any."""
    from huggingface_hub.errors import HfHubHTTPError

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, HfHubHTTPError) and seen.response is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _network_error(e: BaseException) -> BaseException | None:
    import httpx

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (httpx.TransportError, ConnectionError, TimeoutError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def hub_error(e: BaseException, req: PushConfig, export: Path, exists: bool, endpoint: str) -> PushError:
    """One line for a failed push: what the Hub said, what to do, and the command that retries."""
    retry = f"the export at {export} is kept; retry with: {retry_command(req, export, exists)}"
    repo = req.repo_id + (f" (branch {req.revision})" if req.revision else "")
    http = _http_error(e)
    if http is None:
        net = _network_error(e)
        if net is not None:
            why = " ".join(str(net).split())[:200] or type(net).__name__
            return PushError(f"cannot reach the Hub at {endpoint} ({why}): check the network connection (and "
                             f"HF_ENDPOINT if set); {retry}")
        if isinstance(e, ValueError) and "README.md" in str(e):
            return PushError(f"the Hub refused the model card's metadata ({' '.join(str(e).split())[:300]}); {retry}")
        raise e  # not the Hub's answer: a bug, keep its traceback
    status = http.response.status_code
    said = " ".join(str(getattr(http, "server_message", "") or "").split())[:200]
    said = f": {said}" if said else ""
    ns = req.repo_id.split("/")[0]
    if status == 401:
        return PushError(f"the Hub did not accept the token (HTTP 401{said}): it is invalid or expired; set HF_TOKEN to "
                         f"a valid token with write access, or log in again with `hf auth login`; {retry}")
    if status == 403:
        return PushError(f"the token may not write to {req.repo_id} (HTTP 403{said}): use a token with write access to "
                         f"'{ns}' (a fine-grained token needs write permission on that namespace or repository); "
                         f"{retry}")
    if status == 404:
        return PushError(f"{repo}: not found on the Hub (HTTP 404{said}): check the repository id and branch, and "
                         f"that the token can see the repository; {retry}")
    if status == 409 and not exists:
        return PushError(f"{req.repo_id} already exists on the Hub (HTTP 409); llmslim does not commit to an existing "
                         "repository unless asked: add --exist-ok to commit to its main branch, --revision BRANCH to "
                         "commit to a branch, or --create-pr to open a pull request (in a recipe: push.exist_ok, "
                         f"push.revision, push.create_pr); the export at {export} is kept")
    if status == 409:
        return PushError(f"{repo}: the Hub reported a conflict (HTTP 409{said}), e.g. a concurrent commit; {retry}")
    if status == 413:
        return PushError(f"the Hub refused a request as too large (HTTP 413{said}): a file or the commit exceeds its "
                         "limits; write smaller shards (export.max_shard_size, e.g. 2GB) with `llmslim run`, or ask "
                         f"your Hub administrator for the limit; {retry}")
    if status == 429 or status >= 500:
        return PushError(f"the Hub is busy or failing (HTTP {status}{said}); wait a few minutes, then {retry}")
    return PushError(f"the Hub refused the push (HTTP {status}{said}); {retry}")


def summary_lines(result: PushResult, dry_run: bool) -> list[str]:
    """What the command prints: every file with its size, then where it went."""
    lines = [f"  {path}  {human_bytes(size)}" for path, size in result.files]
    total = f"{len(result.files)} files, {human_bytes(result.bytes)}"
    if dry_run:
        return [f"dry run: would push {total} to {result.repo_id}; card written to {result.card}", *lines]
    where = f"pull request {result.pr_url}" if result.pr_url else f"commit {result.commit_oid} ({result.commit_url})"
    return [f"pushed {total} to {result.repo_url}: {where}", *lines]


def push_after_run(req: PushConfig, work: Workspace, state: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The recipe's `push:` (a PushConfig), once the export is in place and checked. state.json records
    where it went (repository, branch, commit; never the token), so rerunning the recipe pushes again only
    when the last push of this export did not complete, and reuses the repository an earlier attempt
    created (which is not somebody else's model)."""
    target = {"repo_id": req.repo_id, "revision": req.revision, "create_pr": req.create_pr,
              "export": report.get("recipe_full_hash")}
    record = state.get("push") or {}
    if record.get("target") == target and record.get("commit_oid"):
        log.info("push: %s already holds this export (commit %s)", req.repo_id, record["commit_oid"])
        return {**report, "push": record}
    created = record.get("created_repo")
    if created == req.repo_id:
        req = req.model_copy(update={"exist_ok": True})

    def remember_created() -> None:
        state["push"] = {"target": target, "created_repo": req.repo_id}
        work.save_state(state)

    try:
        result = push(work.output, req, on_repo_created=remember_created)
    except UserError as e:
        raise PushError(f"push: {e} (the export itself is complete; rerunning `llmslim run` also retries the "
                        "push)") from None
    state["push"] = {"target": target, "created_repo": req.repo_id if result.created_repo else created,
                     "repo_url": result.repo_url, "commit_oid": result.commit_oid, "commit_url": result.commit_url,
                     "pr_url": result.pr_url, "files": len(result.files), "bytes": result.bytes}
    work.save_state(state)
    log.info("push: %s", summary_lines(result, dry_run=False)[0])
    return {**report, "push": state["push"]}

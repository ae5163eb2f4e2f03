"""The end of a run: write the export, check it, measure it, write the report, rename it into place.

Each of these is a unit of work recorded in state.json under a key of what determines it, so a rerun
after a kill redoes only what was not finished: the export's files (`export.key`: the last stage's hash,
the export settings and dtype), its check (stored beside them), and its evaluation (`eval_after.key`:
the export key plus the eval settings and sources). A requested measurement that fails does not lose
the export: it is renamed into place, the failure is in the report, and the run exits non-zero.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from .card import CARD
from .check import CheckError, check_export
from .checkpoint import Checkpoint, LazyModel, copy_side_files, parse_size
from .data import DataHub
from .errors import UserError
from .export import verify_shapes, weight_bytes, write_weights
from .faults import crash_point
from .formats.lora import adapter_dir, merge_into
from .gguf import source_record
from .ownership import REPORT, audit, is_entry, record_files
from .plan import PlanState
from .progress import Progress
from .recipe import EvalConfig, Recipe
from .report import SCHEMA_VERSION, render_markdown, versions
from .workspace import Workspace, finalize, write_json_atomic

log = logging.getLogger(__name__)


class MeasurementError(UserError):
    """The export is in place, but a measurement the recipe asked for failed (exit code 3)."""

    exit_code = 3


def evaluate(model_dir: Path, spec: EvalConfig, data: DataHub, dtype: torch.dtype, progress: Progress,
             label: str, log_dir: Path | None = None) -> dict[str, Any]:
    """The eval harness's entry for the model in `model_dir` (llmslim.evaluate): size, perplexity on each
    named source (as transformers loads the model), throughput and lm-eval tasks when the recipe asks."""
    from .evaluate.harness import PplJob, measure_model, throughput_settings

    def stream(name: str) -> Callable[[Any], torch.Tensor]:
        return lambda _tokenizer: data.stream(name)  # the recipe's sources are tokenized by the DataHub

    jobs = [PplJob(name, stream(name), data.seq_len(name), data.sources[name].samples, spec.stride)
            for name in spec.perplexity]
    backends, settings = throughput_settings(spec.throughput)
    return measure_model(model_dir, name="original" if label == "before" else "export",
                         role="baseline" if label == "before" else "model", ppl=jobs, dtype=dtype,
                         backends=backends, throughput=settings, tasks=spec.tasks, task_limit=spec.task_limit,
                         progress=progress, log_dir=log_dir, tokenizer=data.tokenizer)


def failed_measurements(entry: dict[str, Any], label: str) -> list[str]:
    """One line per requested measurement of an eval entry that did not produce a result."""
    return [f"{label}: {backend} throughput: {res.get('error')}"
            for backend, res in (entry.get("throughput") or {}).items() if not res.get("ok", True)]


def up_to_date_report(work: Workspace, state: dict[str, Any], full_hash: str) -> dict[str, Any] | None:
    """The report of an export at `output` made by this very recipe with every measurement done, if any."""
    try:
        report = json.loads((work.output / REPORT).read_text())
    except (OSError, ValueError):
        return None
    made_here = report.get("recipe_full_hash", state.get("exported")) == full_hash
    if not made_here or report.get("failed_measurements"):
        return None
    # written again: an earlier llmslim's export (file names only, no sizes or hashes), and one that lost a
    # file (the card `llmslim push` writes aside: push writes it again)
    recorded = all(is_entry(e) for e in (report.get("export") or {}).get("files") or [None])
    return report if recorded and set(audit(work.output, hashes=False).missing) <= {CARD} else None


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_error(e: OSError, work: Workspace) -> UserError:
    kept = (f"the previous export at {work.output} is unchanged" if work.output.exists()
            else f"nothing was written to {work.output}")
    why = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "disk quota exceeded",
           errno.EFBIG: "file too large (a file-size limit)"}.get(e.errno or 0, e.strerror or str(e))
    return UserError(f"{e.filename or work.export_tmp}: could not write the export: {why}; {kept} (the partial "
                     f"export in {work.export_tmp} is discarded when you rerun)")


def export_and_report(recipe: Recipe, work: Workspace, src_dir: Path, source: Checkpoint, final: Checkpoint,
                      rows: list, state: dict[str, Any], data: DataHub, dtype: torch.dtype, progress: Progress,
                      *, replace_output: bool, full_hash: str) -> dict[str, Any]:
    spec = recipe.spec
    tmp = work.export_tmp
    quantized = getattr(final.config, "quantization_config", None) is not None
    fmt = "compressed-tensors" if quantized else "hf"
    if spec.export.format not in ("auto", fmt):
        raise UserError(f"export.format: '{spec.export.format}' cannot hold this model "
                        f"({'quantized' if quantized else 'not quantized'}); use auto or {fmt}")
    stage_hash = state["stages"][-1]["hash"] if state["stages"] else "none"
    export_key = _key(stage_hash, str(dtype), spec.export.format, spec.export.max_shard_size)
    done = state.get("export") if (state.get("export") or {}).get("key") == export_key else None
    if done and (tmp / "config.json").is_file():
        log.info("export: reusing the files an earlier run wrote to %s", tmp)
    else:
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            with progress.track("writing export", None):
                write_weights(final, tmp, dtype, parse_size(spec.export.max_shard_size))
                crash_point("export.weights")
                copy_side_files(src_dir, tmp)
                checked = verify_shapes(tmp)
        except OSError as e:
            raise _write_error(e, work) from None
        log.info("export: %d tensors match config.json", checked)
        done = state["export"] = {"key": export_key}
        work.save_state(state)
        crash_point("export.written")

    if spec.export.check != "none" and (done.get("check") or {}).get("backend") != spec.export.check:
        # The model as our own loader sees it (quantized weights decoded by us), to compare with transformers'
        # reload: an export that loads but computes something else (e.g. weights re-initialised) fails here.
        # In float32, as the check loads transformers' side: dense weights as written (in `dtype`), upcast;
        # quantized weights (their files are linked unchanged) decoded in float32 as transformers decodes them.
        reference = (LazyModel(final, torch.float32) if quantized else LazyModel(final, dtype)).materialize_all().float()
        lora = adapter_dir(final.path)
        if lora is not None:  # eora: the corrections added by our own code, to compare with peft's application
            merge_into(reference, lora)
        with progress.track(f"checking export ({spec.export.check})", None):
            try:
                done["check"] = check_export(tmp, spec.export.check, reference=reference).as_dict()
            except CheckError as e:
                raise CheckError(f"{e} — the export was left in {tmp} for inspection") from None
        del reference
        work.save_state(state)
        crash_point("check.done")
    elif spec.export.check != "none":
        log.info("check: passed in an earlier run")
    check = done.get("check") if spec.export.check != "none" else None
    if check:
        log.info("check: %s", check["detail"])

    eval_key = _key(export_key, recipe.as_dict()["eval"], {k: recipe.as_dict()["data"][k] for k in spec.eval.perplexity})
    cached = state.get("eval_after") or {}
    if cached.get("key") != eval_key or failed_measurements(cached, "export"):  # failures are measured again
        state["eval_after"] = {"key": eval_key, **evaluate(tmp, spec.eval, data, dtype, progress, "after",
                                                           work.root / "eval-logs")}
        work.save_state(state)
        crash_point("eval.after")
    else:
        log.info("eval: reusing the measurements of the export from an earlier run")
    eval_after = {k: v for k, v in state["eval_after"].items() if k != "key"}
    eval_after["path"] = str(work.output)
    eval_before = {k: v for k, v in state["eval_before"].items() if k != "key"}
    failed = failed_measurements(eval_before, "original") + failed_measurements(eval_after, "export")

    (tmp / "llmslim_recipe.yaml").write_text(yaml.safe_dump(recipe.as_dict(), sort_keys=False))
    if spec.eval.perplexity or spec.eval.throughput or spec.eval.tasks:
        from .evaluate.harness import new_report, recipe_settings, write_outputs

        if (tmp / "eval").exists():
            shutil.rmtree(tmp / "eval")
        write_outputs(new_report(f"llmslim run {recipe.source}", recipe_settings(spec.eval, dtype),
                                 [eval_before, eval_after]), tmp / "eval")
    from .evaluate.plots import plot_expert_load, plot_training

    if (tmp / "plots").exists():
        shutil.rmtree(tmp / "plots")
    for rec in state["stages"]:  # the training stages' loss and eval curves, the MoE stages' expert load
        plot_training(rec, tmp / "plots" / f"stage-{rec['index']}-{rec['method']}.png")
        plot_expert_load(rec, tmp / "plots" / f"stage-{rec['index']}-{rec['method']}-expert-load.png")
    before_size, after_size = rows[0], PlanState(Checkpoint(tmp).config, source.adapter, dtype).size()
    report = {
        "schema_version": SCHEMA_VERSION, "model": spec.model, "output": str(work.output),
        "source": source_record(src_dir),  # a GGUF's format and quantization, else None
        "recipe_hash": stage_hash, "recipe_full_hash": full_hash,
        "dtype": str(dtype).removeprefix("torch."),
        "export": {"format": fmt, "files": [],  # recorded below, once every other file is written
                   **({"draft_for": spec.export.draft_for} if spec.export.draft_for else {})},
        "plan": [{"label": r.label, **r.shape.__dict__, "params": r.params, "bytes": r.bytes} for r in rows],
        "stages": state["stages"],
        "size": {"before": {"params": before_size.params, "bytes": weight_bytes(src_dir)},
                 "after": {"params": after_size[0], "bytes": weight_bytes(tmp)}},
        "eval": {"before": eval_before, "after": eval_after},
        "check": check, "failed_measurements": failed, "versions": versions(),
    }
    (tmp / "llmslim_report.md").write_text(render_markdown(report))  # (it does not show the record)
    # Every file llmslim wrote, at any depth, with its size and sha256: what `--fresh`, a replacing run and
    # `llmslim push` compare the export with, so that a file added or changed since is never deleted or
    # published (ownership.py). One more read of each file, after all writing is done.
    report["export"]["files"] = record_files(tmp)
    write_json_atomic(tmp / REPORT, report)
    finalize(tmp, work, replace_output)
    crash_point("finalize.done")
    state["exported"] = full_hash
    work.save_state(state)
    log.info("exported to %s", work.output)
    if failed:
        raise MeasurementError(f"the export is complete at {work.output}, but {len(failed)} requested measurement(s) "
                               f"failed (in its report): " + "; ".join(failed))
    return report

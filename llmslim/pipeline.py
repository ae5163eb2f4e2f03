"""The runner: source model -> stages (each leaving a checkpoint) -> verified, checked export -> report.

A run is a chain of units of work, each recorded when it completes, so that a rerun of the same command
after a kill anywhere continues from the last completed one (work files: see workspace.py):
- the windows of data sources that a model generates (`generate:`; generated/NAME.safetensors, keyed);
- the original model's evaluation (state.json `eval_before`);
- each stage: its checkpoint is complete once renamed from `.tmp` and carries its own record
  (llmslim_stage.json), so a kill between the rename and the state update loses nothing; inside a stage,
  per-layer progress in its scratch directory (gptq, rtn);
- the export's files, its check, its evaluation (publish.py), and the rename into place;
- the recipe's push to the Hub (hub.py; state.json `push` says where it went, never with the token).
Only the latest completed stage's checkpoint is kept; a rerun whose latest checkpoint has gone missing
redoes the stages after the latest one that is still there. A recipe whose stages changed is refused
unless --fresh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import cpu
from .adapters import Adapter
from .checkpoint import DTYPES, Checkpoint, copy_side_files
from .data import DataHub
from .errors import UserError
from .export import copy_lora_adapter, verify_shapes, weight_bytes
from .faults import crash_point
from .generated import GENERATED_DIR
from .gguf import ROUNDING_NOTE, is_gguf, source_record
from .launch import Launch
from .loading import download, load_tokenizer, looks_like_hub_id
from .memory import PeakMemory
from .plan import PlanState, make_plan
from .progress import Progress
from .recipe import Recipe
from .registry import METHODS
from .stage import StageContext
from .workspace import (
    STAGE_RECORD,
    Workspace,
    check_output_paths,
    completed_units,
    output_problem,
    write_json_atomic,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- model source


def gguf_input(recipe: Recipe) -> Path | None:
    """The local GGUF file the recipe names (downloaded from the Hub for `model: org/repo` with
    `gguf_file:`), or None when the model is not a GGUF."""
    spec = recipe.spec
    if spec.gguf_file is None:
        if not is_gguf(spec.model):
            return None
        path = Path(spec.model).expanduser()
        if not path.is_file():
            raise UserError(f"model: {spec.model}: no such GGUF file")
        return path
    where = recipe.where(("gguf_file",))
    local = Path(spec.model).expanduser()
    if local.is_dir():
        if not (local / spec.gguf_file).is_file():
            found = sorted(p.name for p in local.glob("*.gguf"))
            raise UserError(f"{where}: gguf_file: {spec.gguf_file} is not in {local} (GGUF files there: "
                            f"{', '.join(found) or 'none'})")
        return local / spec.gguf_file
    if not looks_like_hub_id(spec.model):
        raise UserError(f"model: {spec.model}: no such directory (with gguf_file, model is a local directory or a "
                        "Hub repository id)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec.model, spec.gguf_file, revision=spec.revision))
    except Exception as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"{where}: gguf_file: could not fetch {spec.gguf_file} from the Hugging Face Hub repository "
                        f"{spec.model}: {type(e).__name__}: {reason}") from None


def convert_source(recipe: Recipe, work: Workspace, gguf: Path, progress: Progress | None = None) -> Path:
    """The GGUF converted to safetensors in the work directory (the first unit of work: a rerun with the same
    file and dtype reuses it, --fresh keeps it, a killed conversion continues)."""
    from .gguf import conversion_key, convert_gguf, converted_from

    if not work.owns_root():
        raise UserError(f"output: {work.root} exists and was not created by llmslim (it is where the work files "
                        "of this output go); move it away or choose another output")
    out = work.root / "source"
    dtype = None if recipe.spec.dtype == "auto" else DTYPES[recipe.spec.dtype]
    record = converted_from(out)
    if record is not None and record.get("key") == conversion_key(gguf, dtype):
        log.info("model: reusing the conversion of %s in %s (done in an earlier run)", gguf, out)
        return out
    work.create()
    if out.exists():  # a conversion of another file or dtype, in llmslim's own work directory
        shutil.rmtree(out)
    convert_gguf(gguf, out, dtype=dtype, progress=progress, max_shard_bytes=_shard_bytes(recipe))
    return out


def resolve_source(recipe: Recipe, work: Workspace, progress: Progress | None = None) -> Path:
    """A local directory with config.json and safetensors for the recipe's model (downloading a Hub id,
    converting a GGUF file or opted-in pickled weights)."""
    spec = recipe.spec
    gguf = gguf_input(recipe)
    if gguf is not None:
        return convert_source(recipe, work, gguf, progress)
    path = Path(spec.model)
    if not path.exists():
        if not looks_like_hub_id(spec.model):
            raise UserError(f"model: {spec.model}: no such directory")
        path = download(spec.model, spec.revision, spec.use_safetensors)
    if not (path / "config.json").is_file():
        raise UserError(f"model: {path}: not a model directory (no config.json)")
    has_st = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if has_st:
        return path
    if not list(path.glob("*.bin")) and not list(path.glob("*.pt")):
        raise UserError(f"model: {path}: no weights found (model.safetensors or a safetensors index)")
    if spec.use_safetensors:
        raise UserError(f"model: {path} has only pickled weights (.bin), which can run code when loaded; set "
                        "use_safetensors: false to allow them")
    converted = work.root / "source"
    if not (converted / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        log.info("converting pickled weights of %s to safetensors in %s", path, converted)
        work.create()
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=False, trust_remote_code=spec.trust_remote_code)
        model.save_pretrained(converted)
        copy_side_files(path, converted)
    return converted


# ---------------------------------------------------------------- dtypes and devices


def working_dtype(recipe: Recipe, source_dtype: torch.dtype) -> torch.dtype:
    """The recipe's dtype, or with `auto` the source model's."""
    return source_dtype if recipe.spec.dtype == "auto" else DTYPES[recipe.spec.dtype]


def compute_dtype(recipe: Recipe, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of calibration work, when the recipe says auto: `dtype` on a GPU, and on a CPU `dtype`
    only where it is bfloat16 and the CPU has native bf16 matmuls (llmslim.cpu.native_bf16); float32
    otherwise (emulated bf16 and fp16 matmuls are slow there)."""
    if recipe.spec.compute_dtype != "auto":
        return DTYPES[recipe.spec.compute_dtype]
    if device.type != "cpu":
        return dtype
    return dtype if dtype == torch.bfloat16 and cpu.native_bf16(cpu.detect()) else torch.float32


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {spec} requested but no CUDA device is available; use auto or cpu")
    return torch.device(spec)


# ---------------------------------------------------------------- before anything runs


def protected_paths(recipe: Recipe, src_dir: Path) -> list[tuple[str, Path]]:
    """The user's inputs that the output may never overlap: the model (the GGUF file itself for a GGUF, whose
    conversion lives in the work directory) and every local data source."""
    gguf = gguf_input(recipe)
    out = [("model", gguf if gguf is not None else src_dir)]
    for name, src in recipe.spec.data.items():
        if src.path is not None:
            out.append((f"data.{name}.path", Path(src.path)))
        elif src.dataset is not None and Path(src.dataset).exists():
            out.append((f"data.{name}.dataset", Path(src.dataset)))
    return out


def prepare(recipe: Recipe, work: Workspace, *, replace_output: bool = False, progress: Progress | None = None
            ) -> tuple[Path, Checkpoint, PlanState, list, list[PlanState]]:
    """Resolve and verify the model, check data and output paths, and build the plan (no weights loaded but
    a GGUF's, converted once)."""
    src_dir = resolve_source(recipe, work, progress)
    source = Checkpoint(src_dir, trust_remote_code=recipe.spec.trust_remote_code)
    try:
        verify_shapes(src_dir, allow_extra=True)
    except UserError as e:
        raise UserError(f"model: {e}") from None
    state = PlanState(source.config, source.adapter, working_dtype(recipe, source.dtype), source_dir=src_dir)
    rows, states = make_plan(recipe, state)
    _check_paths(recipe, work, src_dir, replace_output)
    return src_dir, source, state, rows, states


def validate(recipe: Recipe, work: Workspace, *, replace_output: bool = False) -> list:
    """The plan rows, with every check `run` makes before work starts, and nothing written: a GGUF that is
    not converted yet is planned from its metadata (converting is work; `run` does it)."""
    from .gguf import conversion_key, converted_from, gguf_config

    gguf = gguf_input(recipe)
    dtype = None if recipe.spec.dtype == "auto" else DTYPES[recipe.spec.dtype]
    record = converted_from(work.root / "source") if gguf is not None else None
    if gguf is None or (record is not None and record.get("key") == conversion_key(gguf, dtype)):
        return prepare(recipe, work, replace_output=replace_output)[3]
    config, info = gguf_config(gguf, dtype)
    state = PlanState(config, Adapter.for_config(config, str(gguf)), DTYPES[config.dtype])
    rows, _ = make_plan(recipe, state)
    _check_paths(recipe, work, gguf, replace_output)
    return [dataclasses.replace(rows[0], label=f"original ({info.short()})"), *rows[1:]]


def _check_paths(recipe: Recipe, work: Workspace, src: Path, replace_output: bool) -> None:
    from .errors import RecipeError
    from .generated import generation_problems

    for name, src_data in recipe.spec.data.items():
        if src_data.path is not None and not Path(src_data.path).is_file():
            raise UserError(f"{recipe.where(('data', name, 'path'))}: data.{name}.path: file not found: {src_data.path}")
    if problems := generation_problems(recipe.spec.data, src if src.is_dir() else None, recipe.where):
        raise RecipeError(problems)
    check_output_paths(work, protected_paths(recipe, src))
    problem = output_problem(work.output, hashes=False)  # a quick look; deleting looks at the content too
    if problem and not replace_output:
        raise UserError(problem)
    if not work.owns_root():
        raise UserError(f"output: {work.root} exists and was not created by llmslim (it is where the work files "
                        "of this output go); move it away or choose another output")


def _changed_field(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return "its inputs"


def _check_resume(recipe: Recipe, state: dict[str, Any], work: Workspace, hashes: list[str]) -> None:
    old_stages = state.get("recipe", {}).get("stages", [])
    new_stages = recipe.as_dict()["stages"]
    for rec in state.get("stages", []):
        i = rec["index"]
        if i >= len(recipe.stages) or rec["hash"] != hashes[i]:
            what = (_changed_field(old_stages[i], new_stages[i]) if i < len(new_stages) and i < len(old_stages)
                    and old_stages[i] != new_stages[i] else
                    "the stage was removed" if i >= len(new_stages) else
                    "its model, dtype, compute dtype (as resolved on this machine), seed or data")
            raise UserError(f"{work.root}: holds a run of a different recipe (stages[{i}] {rec['method']} changed: "
                            f"{what}); rerun with --fresh to start over, or choose another output")


def _stage_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / STAGE_RECORD).read_text()) if (path / "config.json").is_file() else None
    except (OSError, ValueError):
        return None


def unquantized_inputs(recipe: Recipe, states: list[PlanState]) -> dict[int, int]:
    """For each stage that works on a quantized model (Method.follows_quantization): the index of the stage whose
    checkpoint holds the weights before quantization (the quantizing stage's input; -1: the source model). The
    runner keeps that checkpoint until those stages are done."""
    out: dict[int, int] = {}
    quantizer = None
    for stage in recipe.stages:
        if quantizer is None and states[stage.index + 1].quant is not None:
            quantizer = stage.index
        elif quantizer is not None and METHODS[stage.method].follows_quantization:
            out[stage.index] = quantizer - 1
    return out


def _kept_dirs(recipe: Recipe, work: Workspace, kept: dict[int, int], after: int) -> set[Path]:
    """The checkpoints that stages after `after` still need besides their input (see unquantized_inputs)."""
    return {work.stage_dir(j, recipe.stages[j].method) for i, j in kept.items() if i > after and j >= 0}


def resume_point(recipe: Recipe, state: dict[str, Any], work: Workspace, hashes: list[str],
                 kept: dict[int, int] | None = None) -> int:
    """The index of the last stage whose checkpoint can be continued from (-1: the source model). Adopts a
    checkpoint that was renamed into place just before a kill, drops records whose checkpoint is gone
    (their stages run again), and removes stale stage directories."""
    records = {rec["index"]: rec for rec in state.get("stages", [])}
    for stage in recipe.stages:  # completed on disk, not yet in state.json: a kill between the two
        if stage.index not in records:
            rec = _stage_record(work.stage_dir(stage.index, stage.method))
            if rec is None or rec.get("hash") != hashes[stage.index]:
                break
            log.info("%s: found complete on disk; adopting it", stage.label)
            records[stage.index] = rec
    last = -1
    for i in sorted(records, reverse=True):
        if _stage_record(work.stage_dir(i, recipe.stages[i].method)) is not None:
            last = i
            break
        log.warning("%s: its checkpoint is missing; it runs again", recipe.stages[i].label)
    state["stages"] = [records[i] for i in sorted(records) if i <= last]
    keep = {work.stage_dir(last, recipe.stages[last].method).name} if last >= 0 else set()
    keep |= {p.name for p in _kept_dirs(recipe, work, kept or {}, last)}
    if last + 1 < len(recipe.stages):
        nxt = work.stage_dir(last + 1, recipe.stages[last + 1].method)
        keep.add(nxt.name + ".scratch")  # per-layer progress of the next stage (checked by _scratch_for)
    if work.stages.is_dir():
        for p in work.stages.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return last


def _scratch_for(path: Path, stage_hash: str) -> Path:
    """A stage's scratch directory (its per-layer progress), emptied when it was left by a different recipe."""
    stamp = path / "stage_hash"
    if path.exists() and (not stamp.is_file() or stamp.read_text() != stage_hash):
        log.info("%s: left by a different recipe; starting this stage afresh", path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    stamp.write_text(stage_hash)
    return path


def _summary(notes: dict[str, Any]) -> dict[str, Any]:
    """The short notes worth a column in the report table."""
    return {k: v for k, v in notes.items() if not isinstance(v, (list, dict)) or len(v) <= 8}


# ---------------------------------------------------------------- the run


def run(recipe: Recipe, *, fresh: bool = False, replace_output: bool = False, progress: Progress | None = None,
        on_plan: Callable[[list], None] | None = None) -> dict[str, Any]:
    """Run a validated recipe end to end; returns the report (also written into the export).
    `on_plan` receives the plan rows once the plan is validated, before any work starts. Under
    `accelerate launch` every process calls this; only the main one writes (llmslim.launch)."""
    progress = progress or Progress()
    launch = Launch()
    work = Workspace(recipe.spec.output)
    src_dir, source, plan0, rows, states = prepare(recipe, work, replace_output=replace_output, progress=progress)
    if not launch.is_main:
        return _follow(recipe, launch, work, src_dir, source, states, progress)
    if on_plan:
        on_plan(rows)
    try:
        return _run_main(recipe, launch, work, src_dir, source, plan0, rows, states, progress, fresh, replace_output)
    except BaseException as e:
        launch.fail(work, e)
        raise


def _data_hub(recipe: Recipe, work: Workspace, src_dir: Path, source: Checkpoint, device: torch.device,
              progress: Progress, create: bool = True) -> DataHub:
    """The recipe's data; `generate` sources are made (create=False: read back) in the work directory."""
    from .generated import Generations

    generations = Generations(work.root / GENERATED_DIR, src_dir, device, progress, create=create)
    return DataHub(recipe.spec.data, load_tokenizer(src_dir), seed=recipe.spec.seed,
                   max_len=getattr(source.config, "max_position_embeddings", None), generations=generations)


def _generate_ahead(recipe: Recipe, data: DataHub, last: int) -> None:
    """Generate the `generate` sources that the stages still to run or the evaluation read, now: before any
    model is in memory (vLLM runs beside this process), and before the other processes of `accelerate
    launch` reach a stage (they read what this one wrote)."""
    names = {n for s in recipe.stages if s.index > last for n in s.config.data_sources()}
    names |= set(recipe.spec.eval.perplexity)
    for name in sorted(names):
        if recipe.spec.data[name].generate is not None:
            data.stream(name)


def _devices(recipe: Recipe, launch: Launch, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    device = launch.state.device if launch.active else pick_device(recipe.spec.device)
    return device, compute_dtype(recipe, dtype, device)


def _run_main(recipe: Recipe, launch: Launch, work: Workspace, src_dir: Path, source: Checkpoint, plan0: PlanState,
              rows: list, states: list[PlanState], progress: Progress, fresh: bool,
              replace_output: bool) -> dict[str, Any]:
    from .publish import evaluate, export_and_report, failed_measurements, up_to_date_report

    if fresh:  # start over: earlier progress and an earlier export of ours go; nothing else (a GGUF's conversion
        # is the input in another format, generated data is keyed by all that made it: they stay)
        work.remove_own(replace_output, keep=(src_dir, work.root / GENERATED_DIR))
    work.create()
    work.recover()
    dtype = plan0.dtype
    device, cdt = _devices(recipe, launch, dtype)
    hashes = [recipe.stage_hash(i, str(cdt).removeprefix("torch.")) for i in range(len(recipe.stages))]
    state = work.load_state()
    _check_resume(recipe, state, work, hashes)
    full_hash = recipe.full_hash()
    report = up_to_date_report(work, state, full_hash)
    if report is not None:
        launch.announce(work, [])
        log.info("%s is up to date with this recipe; use --fresh to run it again", work.output)
        return _push(recipe, work, state, report)
    state["recipe"] = recipe.as_dict()
    if units := completed_units(work):
        log.info("resuming %s: done in earlier runs: %s", work.output, ", ".join(units))
    kept = unquantized_inputs(recipe, states)
    last = resume_point(recipe, state, work, hashes, kept)
    work.save_state(state)
    launch.announce(work, [s.index for s in recipe.stages if s.index > last and METHODS[s.method].trains])

    data = _data_hub(recipe, work, src_dir, source, device, progress)
    _generate_ahead(recipe, data, last)
    eval_key = json.dumps([recipe.spec.model, recipe.spec.dtype, recipe.as_dict()["eval"],
                           {k: recipe.as_dict()["data"][k] for k in recipe.spec.eval.perplexity}], sort_keys=True)
    cached = state.get("eval_before") or {}
    if cached.get("key") != eval_key or failed_measurements(cached, "original"):  # failures are measured again
        state["eval_before"] = {"key": eval_key, **evaluate(src_dir, recipe.spec.eval, data, dtype, progress, "before",
                                                            work.root / "eval-logs")}
        work.save_state(state)
        crash_point("eval.before")
    else:
        log.info("original model: reusing its measurements from an earlier run")

    current = source if last < 0 else Checkpoint(work.stage_dir(last, recipe.stages[last].method))
    gguf_source = source_record(src_dir)
    for stage in recipe.stages:
        final = work.stage_dir(stage.index, stage.method)
        if stage.index <= last:
            log.info("%s: done in an earlier run, reusing %s", stage.label, final)
            continue
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        scratch = _scratch_for(final.with_name(final.name + ".scratch"), hashes[stage.index])
        unquantized = None
        if stage.index in kept:
            j = kept[stage.index]
            unquantized = source if j < 0 else Checkpoint(work.stage_dir(j, recipe.stages[j].method))
        ctx = StageContext(recipe, stage, current, tmp, scratch, dtype, device,
                           data, progress, states[stage.index], states[stage.index + 1],
                           _shard_bytes(recipe), cdt, original=source, history=list(state["stages"]),
                           unquantized=unquantized)
        if METHODS[stage.method].trains:
            launch.barrier()  # the other processes of an `accelerate launch` train this stage with us
        log.info("%s: starting", stage.label)
        crash_point("stage.start")
        method_run = METHODS[stage.method].runner()
        started = time.perf_counter()
        with PeakMemory() as mem:
            result = method_run(ctx, stage.config)
        seconds = time.perf_counter() - started
        _carry_adapter(ctx, result.notes)
        out = Checkpoint(tmp)
        planned, produced = states[stage.index + 1].shape, out.adapter.shape(out.config)
        if planned != produced:
            raise RuntimeError(f"{stage.label} produced {produced} but the plan said {planned}")
        before, after = states[stage.index].size(), states[stage.index + 1].size()
        record = {
            "index": stage.index, "method": stage.method, "hash": hashes[stage.index],
            "seconds": round(seconds, 3), "params_before": before[0], "params_after": after[0],
            "bytes_before": before[1], "bytes_after": weight_bytes(tmp), "peak_rss_bytes": mem.peak,
            "peak_note": result.peak_note, "notes": result.notes, "summary": _summary(result.notes)}
        if gguf_source is not None:  # what every number of this stage is relative to
            record["notes"] = {**result.notes, "source": f"{gguf_source['description']}: {ROUNDING_NOTE}"}
        write_json_atomic(tmp / STAGE_RECORD, record)  # the checkpoint carries its own record
        crash_point("stage.written")
        os.replace(tmp, final)
        crash_point("stage.renamed")
        state["stages"].append(record)
        work.save_state(state)
        crash_point("stage.recorded")
        if ctx.scratch_dir.exists():
            shutil.rmtree(ctx.scratch_dir)
        still_needed = _kept_dirs(recipe, work, kept, stage.index)
        if current.path != source.path and current.path.parent == final.parent and current.path not in still_needed:
            shutil.rmtree(current.path)  # the previous stage's checkpoint is no longer needed for resume
        for path in _kept_dirs(recipe, work, kept, stage.index - 1) - still_needed - {current.path}:
            if path.is_dir():  # the weights before quantization, kept for this stage: done with them
                shutil.rmtree(path)
        current = Checkpoint(final)
        log.info("%s: done in %.1f s", stage.label, seconds)

    launch.release()  # the other processes are done (they trained the training stages with us)
    report = export_and_report(recipe, work, src_dir, source, current, rows, state, data, dtype, progress,
                               replace_output=replace_output, full_hash=full_hash)
    return _push(recipe, work, state, report)


def _carry_adapter(ctx: StageContext, notes: dict[str, Any]) -> None:
    """A LoRA adapter an earlier stage wrote beside dense weights (qat, base nf4, merge: false) stays beside the
    weights of the stage after it, unchanged: the plan lets only a quantizer follow such a stage."""
    from .formats.lora import adapter_dir

    folder = adapter_dir(ctx.source.path)
    if ctx.before.lora_rank is None or folder is None or adapter_dir(ctx.out_dir) is not None:
        return
    copy_lora_adapter(ctx.source.path, ctx.out_dir)
    trained = f"; trained over {ctx.before.lora_trained_on}, not over this stage's grid" if ctx.before.lora_trained_on else ""
    notes["adapter_kept"] = f"{folder.name}/ of the stage before, unchanged{trained}"  # not `adapter`: the card
    # reads that key as "this stage wrote the adapter"


def _push(recipe: Recipe, work: Workspace, state: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The recipe's push, reached only with the export in place, checked, and every measurement done."""
    if recipe.spec.push is None:
        return report
    from .hub import push_after_run

    return push_after_run(recipe.spec.push, work, state, report)


def _follow(recipe: Recipe, launch: Launch, work: Workspace, src_dir: Path, source: Checkpoint,
            states: list[PlanState], progress: Progress) -> dict[str, Any]:
    """A process other than the main one: train the training stages the main process runs, write nothing."""
    plan = launch.wait_for(work)
    dtype = states[0].dtype
    device, cdt = _devices(recipe, launch, dtype)
    data = _data_hub(recipe, work, src_dir, source, device, progress, create=False)
    for i in plan["training"]:
        stage = recipe.stages[i]
        before = work.stage_dir(i - 1, recipe.stages[i - 1].method) if i > 0 else None
        if before is not None:
            launch.wait_for(work, before)
        final = work.stage_dir(i, stage.method)
        ctx = StageContext(recipe, stage, Checkpoint(before) if before else source,
                           final.with_name(final.name + ".tmp"), final.with_name(final.name + ".scratch"), dtype,
                           device, data, progress, states[i], states[i + 1], _shard_bytes(recipe), cdt,
                           original=source, history=list(work.load_state().get("stages", [])), is_main_process=False)
        launch.barrier()
        METHODS[stage.method].runner()(ctx, stage.config)
    launch.release()
    return {"follower": True, "trained": plan["training"]}


def _shard_bytes(recipe: Recipe) -> int:
    from .checkpoint import parse_size

    return parse_size(recipe.spec.export.max_shard_size)

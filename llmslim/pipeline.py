"""The runner: source model -> stages (each leaving a checkpoint) -> verified, checked export -> report.

Work files live in `<output>.work/` beside the export: `state.json` (what is done, with the recipe hash
of each stage), `stages/NN-method/` (the checkpoint after each completed stage; older ones are removed as
newer ones land) and `export.tmp/` (the export being assembled). Rerunning the same command continues
after the last completed stage; a recipe whose stages changed is refused unless `--fresh`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from .check import CheckError, check_export
from .checkpoint import DTYPES, Checkpoint, LazyModel, copy_side_files, parse_size
from .data import DataHub
from .errors import UserError
from .export import finalize, verify_shapes, write_weights
from .memory import PeakMemory
from .plan import PlanState, make_plan
from .progress import Progress
from .recipe import EvalConfig, Recipe
from .registry import load_methods
from .report import SCHEMA_VERSION, render_markdown, versions
from .stage import StageContext

log = logging.getLogger(__name__)


class Workspace:
    """Paths of one run's work files, and its state.json."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.root = self.output.with_name(self.output.name + ".work")
        self.state_file = self.root / "state.json"
        self.export_tmp = self.root / "export.tmp"
        self.trash = self.root / "old-export"

    def stage_dir(self, index: int, method: str) -> Path:
        return self.root / "stages" / f"{index:02d}-{method}"

    def load_state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def save_state(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_file)  # a crash never leaves a half-written state


# ---------------------------------------------------------------- model source


def resolve_source(recipe: Recipe, work: Workspace) -> Path:
    """A local directory with config.json and safetensors for the recipe's model (downloading a Hub id,
    converting opted-in pickled weights)."""
    spec = recipe.spec
    path = Path(spec.model)
    if not path.exists():
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec.model) or spec.model.startswith((".", "/")):
            raise UserError(f"model: {spec.model}: no such directory")
        path = _download(spec.model, spec.revision, spec.use_safetensors)
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
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=False, trust_remote_code=spec.trust_remote_code)
        model.save_pretrained(converted)
        copy_side_files(path, converted)
    return converted


def _download(repo_id: str, revision: str | None, safetensors_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    if not safetensors_only:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise UserError(f"model: '{repo_id}' is not a local directory and could not be fetched from the Hugging "
                        f"Face Hub ({type(e).__name__}); check the path, or the id and your network") from None


def load_tokenizer(path: Path):
    """The model's tokenizer, or None when the directory has none (tiny test models)."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- evaluation


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


# ---------------------------------------------------------------- the run


def working_dtype(recipe: Recipe, source: Checkpoint) -> torch.dtype:
    return source.dtype if recipe.spec.dtype == "auto" else DTYPES[recipe.spec.dtype]


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX: bf16 matmuls run at about twice the float32 rate instead of being emulated."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def compute_dtype(recipe: Recipe, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of calibration work, when the recipe says auto: `dtype` on a GPU, and on a CPU `dtype`
    only where it is bfloat16 and the CPU has native bf16 matmuls; float32 otherwise (emulated bf16 and
    fp16 matmuls are slow there)."""
    if recipe.spec.compute_dtype != "auto":
        return DTYPES[recipe.spec.compute_dtype]
    if device.type != "cpu":
        return dtype
    return dtype if dtype == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {spec} requested but no CUDA device is available; use auto or cpu")
    return torch.device(spec)


def prepare(recipe: Recipe, work: Workspace) -> tuple[Path, Checkpoint, PlanState, list, list[PlanState]]:
    """Resolve the model and build the plan (no weights loaded)."""
    src_dir = resolve_source(recipe, work)
    source = Checkpoint(src_dir, trust_remote_code=recipe.spec.trust_remote_code)
    state = PlanState(source.config, source.adapter, working_dtype(recipe, source))
    rows, states = make_plan(recipe, state)
    for name, src in recipe.spec.data.items():
        if src.path is not None and not Path(src.path).is_file():
            raise UserError(f"{recipe.where(('data', name, 'path'))}: data.{name}.path: file not found: {src.path}")
    return src_dir, source, state, rows, states


def _changed_field(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return "its inputs"


def _check_resume(recipe: Recipe, state: dict[str, Any], work: Workspace) -> None:
    old_stages = state.get("recipe", {}).get("stages", [])
    new_stages = recipe.as_dict()["stages"]
    for rec in state.get("stages", []):
        i = rec["index"]
        if i >= len(recipe.stages) or rec["hash"] != recipe.stage_hash(i):
            what = (_changed_field(old_stages[i], new_stages[i]) if i < len(new_stages) and i < len(old_stages)
                    else "the stage was removed")
            raise UserError(f"{work.root}: holds a run of a different recipe (stages[{i}] {rec['method']} changed: "
                            f"{what}); rerun with --fresh to start over, or choose another output")


def run(recipe: Recipe, *, fresh: bool = False, progress: Progress | None = None,
        on_plan: Callable[[list], None] | None = None) -> dict[str, Any]:
    """Run a validated recipe end to end; returns the report (also written into the export).
    `on_plan` receives the plan rows once the plan is validated, before any work starts."""
    progress = progress or Progress()
    work = Workspace(recipe.spec.output)
    src_dir, source, plan0, rows, states = prepare(recipe, work)
    if on_plan:
        on_plan(rows)
    if fresh:  # start over: earlier progress and an earlier export of this output both go
        for old in (work.root, work.output):
            if old.exists():
                shutil.rmtree(old)
    dtype, device = plan0.dtype, pick_device(recipe.spec.device)
    full_hash = recipe.full_hash()
    state = work.load_state()
    _check_resume(recipe, state, work)
    if state.get("exported") == full_hash and (work.output / "llmslim_report.json").is_file():
        log.info("%s is up to date with this recipe; use --fresh to run it again", work.output)
        return json.loads((work.output / "llmslim_report.json").read_text())
    state.update(recipe=recipe.as_dict(), stages=state.get("stages", []))
    work.save_state(state)

    data = DataHub(recipe.spec.data, load_tokenizer(src_dir), seed=recipe.spec.seed,
                   max_len=getattr(source.config, "max_position_embeddings", None))
    eval_key = json.dumps([recipe.spec.model, recipe.spec.dtype, recipe.as_dict()["eval"],
                           {k: recipe.as_dict()["data"][k] for k in recipe.spec.eval.perplexity}], sort_keys=True)
    if state.get("eval_before", {}).get("key") != eval_key:
        state["eval_before"] = {"key": eval_key, **evaluate(src_dir, recipe.spec.eval, data, dtype, progress, "before",
                                                            work.root / "eval-logs")}
        work.save_state(state)

    current = source
    done = {rec["index"]: rec for rec in state["stages"]}
    methods = load_methods()
    for stage in recipe.stages:
        final = work.stage_dir(stage.index, stage.method)
        if stage.index in done and (final / "config.json").is_file():
            log.info("%s: done in an earlier run, reusing %s", stage.label, final)
            current = Checkpoint(final)
            continue
        if stage.index in done:
            raise UserError(f"{final}: the checkpoint of completed {stage.label} is missing; rerun with --fresh")
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        scratch = _scratch_for(final.with_name(final.name + ".scratch"), recipe.stage_hash(stage.index))
        ctx = StageContext(recipe, stage, current, tmp, scratch, dtype, device,
                           data, progress, states[stage.index], states[stage.index + 1],
                           parse_size(recipe.spec.export.max_shard_size), compute_dtype(recipe, dtype, device))
        log.info("%s: starting", stage.label)
        started = time.perf_counter()
        method_run = methods[stage.method].run
        assert method_run is not None, f"{stage.method} is not implemented"
        with PeakMemory() as mem:
            result = method_run(ctx, stage.config)
        seconds = time.perf_counter() - started
        out = Checkpoint(tmp)
        planned, produced = states[stage.index + 1].shape, out.adapter.shape(out.config)
        if planned != produced:
            raise RuntimeError(f"{stage.label} produced {produced} but the plan said {planned}")
        os.replace(tmp, final)
        if ctx.scratch_dir.exists():
            shutil.rmtree(ctx.scratch_dir)
        before, after = states[stage.index].size(), states[stage.index + 1].size()
        state["stages"].append({
            "index": stage.index, "method": stage.method, "hash": recipe.stage_hash(stage.index),
            "seconds": round(seconds, 3), "params_before": before[0], "params_after": after[0],
            "bytes_before": before[1], "bytes_after": _dir_weight_bytes(final), "peak_rss_bytes": mem.peak,
            "peak_note": result.peak_note, "notes": result.notes, "summary": _summary(result.notes)})
        work.save_state(state)
        if current.path != source.path and current.path.parent == final.parent:
            shutil.rmtree(current.path)  # the previous stage's checkpoint is no longer needed for resume
        current = Checkpoint(final)
        log.info("%s: done in %.1f s", stage.label, seconds)

    report = export_and_report(recipe, work, src_dir, source, current, rows, state, data, dtype, progress)
    state["exported"] = full_hash
    work.save_state(state)
    if current.path != source.path:
        shutil.rmtree(current.path)  # the export holds the final model now
    return report


def _scratch_for(path: Path, stage_hash: str) -> Path:
    """A stage's scratch directory (its per-layer progress), emptied when it was left by a different recipe."""
    stamp = path / "stage_hash"
    if path.exists() and (not stamp.is_file() or stamp.read_text() != stage_hash):
        log.info("%s: left by a different recipe; starting this stage afresh", path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    stamp.write_text(stage_hash)
    return path


def _dir_weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _summary(notes: dict[str, Any]) -> dict[str, Any]:
    """The short notes worth a column in the report table."""
    return {k: v for k, v in notes.items() if not isinstance(v, (list, dict)) or len(v) <= 8}


def export_and_report(recipe: Recipe, work: Workspace, src_dir: Path, source: Checkpoint, final: Checkpoint,
                      rows: list, state: dict[str, Any], data: DataHub, dtype: torch.dtype,
                      progress: Progress) -> dict[str, Any]:
    tmp = work.export_tmp
    if tmp.exists():
        shutil.rmtree(tmp)
    spec = recipe.spec
    quantized = getattr(final.config, "quantization_config", None) is not None
    fmt = "compressed-tensors" if quantized else "hf"
    if spec.export.format not in ("auto", fmt):
        raise UserError(f"export.format: '{spec.export.format}' cannot hold this model "
                        f"({'quantized' if quantized else 'not quantized'}); use auto or {fmt}")
    with progress.track("writing export", None):
        write_weights(final, tmp, dtype, parse_size(spec.export.max_shard_size))
        copy_side_files(src_dir, tmp)
        (tmp / "llmslim_recipe.yaml").write_text(yaml.safe_dump(recipe.as_dict(), sort_keys=False))
        checked = verify_shapes(tmp)
    log.info("export: %d tensors match config.json", checked)

    check = None
    if spec.export.check != "none":
        # The model as our own loader sees it (quantized weights decoded by us), to compare with transformers'
        # reload: an export that loads but computes something else (e.g. weights re-initialised) fails here.
        # In float32, as the check loads transformers' side: dense weights as written (in `dtype`), upcast;
        # quantized weights (their files are linked unchanged) decoded in float32 as transformers decodes them.
        reference = (LazyModel(final, torch.float32) if quantized else LazyModel(final, dtype)).materialize_all().float()
        with progress.track(f"checking export ({spec.export.check})", None):
            try:
                check = check_export(tmp, spec.export.check, reference=reference).as_dict()
            except CheckError as e:
                raise CheckError(f"{e} — the export was left in {tmp} for inspection") from None
        del reference
        log.info("check: %s", check["detail"])

    eval_after = evaluate(tmp, spec.eval, data, dtype, progress, "after", work.root / "eval-logs")
    eval_after["path"] = str(work.output)
    eval_before = {k: v for k, v in state["eval_before"].items() if k != "key"}
    if spec.eval.perplexity or spec.eval.throughput or spec.eval.tasks:
        from .evaluate.harness import new_report, recipe_settings, write_outputs

        write_outputs(new_report(f"llmslim run {recipe.source}", recipe_settings(spec.eval, dtype),
                                 [eval_before, eval_after]), tmp / "eval")
    before_size, after_size = rows[0], PlanState(Checkpoint(tmp).config, source.adapter, dtype).size()
    report = {
        "schema_version": SCHEMA_VERSION, "model": spec.model, "output": str(work.output),
        "recipe_hash": recipe.stage_hash(len(recipe.stages) - 1) if recipe.stages else "none",
        "dtype": str(dtype).removeprefix("torch."),
        "export": {"format": fmt, "files": sorted(p.name for p in tmp.iterdir())},
        "plan": [{"label": r.label, **r.shape.__dict__, "params": r.params, "bytes": r.bytes} for r in rows],
        "stages": state["stages"],
        "size": {"before": {"params": before_size.params, "bytes": _dir_weight_bytes(src_dir)},
                 "after": {"params": after_size[0], "bytes": _dir_weight_bytes(tmp)}},
        "eval": {"before": eval_before, "after": eval_after},
        "check": check, "versions": versions(),
    }
    (tmp / "llmslim_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "llmslim_report.md").write_text(render_markdown(report))
    finalize(tmp, work.output, work.trash)
    log.info("exported to %s", work.output)
    return report

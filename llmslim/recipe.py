"""The recipe: one YAML file that says which model to load, which stages to apply and what to export.

Loading is strict: unknown methods, unknown or ill-typed fields and dangling data references are all
reported before anything runs, one line each, with the YAML path, its line number, what was found and
what is allowed. Paths in a recipe are relative to the directory `llmslim` is run from.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .methods.configs.base import MethodConfig
from .registry import METHODS, implemented_methods

Path_ = tuple[Any, ...]


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, field docstrings document the recipe."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class GeneratedText(Strict):
    """A data source's `generate`: windows a model writes itself, for a speculative-decoding draft to imitate
    what its target generates (token ids, never re-tokenized text)."""

    model: str = "teacher"
    """The model that continues the prompts: `teacher` or `original` (the recipe's model before its stages),
    or a local model directory or Hub id (e.g. the target of `export.draft_for`); it must share the recipe
    model's token ids."""
    prompt_tokens: int = Field(gt=0)
    """Tokens of each prompt: the first `prompt_tokens` of a window of the source's text."""
    new_tokens: int = Field(gt=0)
    """Tokens the model appends to each prompt, greedily and exactly this many (EOS does not stop it, as with
    vLLM's `ignore_eos`); `seq_len` is `prompt_tokens + new_tokens`."""
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """What generates: vllm (in a child process, float32 where this machine's kernels allow), transformers
    (in process, float32), or auto (vllm where it can serve the model here, else transformers)."""
    batch_size: int = Field(default=16, gt=0)
    """Prompts per forward pass with the transformers backend (vLLM batches by itself)."""


class DataSource(Strict):
    """A named text source: a local file or a `datasets` dataset, cut into token windows; with `generate`,
    the windows are the greedy continuations of a model, generated once per run and kept in the work
    directory."""

    path: str | None = None
    """Local text file: .txt (read as it is), .jsonl (one JSON object per line, text in `field`) or
    .parquet (text in column `field`); rows are joined with blank lines."""
    dataset: str | None = None
    """A `datasets` dataset id or local dataset directory, instead of `path` (e.g. `wikitext`)."""
    name: str | None = None
    """The dataset configuration name (e.g. `wikitext-2-raw-v1`)."""
    split: str = "train"
    """The dataset split to read."""
    field: str = "text"
    """The field (jsonl, datasets) or column (parquet) that holds the text."""
    fraction: tuple[float, float] = (0.0, 1.0)
    """The part of the source to use, as [start, end) fractions of its rows (of its characters, cut at
    line starts, for .txt), so that one file gives disjoint calibration and evaluation parts (e.g.
    [0.0, 0.5] and [0.5, 1.0])."""
    samples: int | None = Field(default=None, gt=0)
    """How many windows of `seq_len` tokens to use; null: all the windows the text holds."""
    seq_len: int = Field(default=512, gt=1)
    """Tokens per window (capped at the model's context length for perplexity); with `generate`, defaults to
    `prompt_tokens + new_tokens` and must equal it."""
    generate: GeneratedText | None = None
    """Make the windows a model's own greedy continuations of prompts taken from this text (see
    `data.<name>.generate`); `samples` is then the number of windows generated. null: the text itself."""

    @model_validator(mode="before")
    @classmethod
    def _generated_length(cls, data: Any) -> Any:
        """seq_len follows from a `generate` block when the recipe does not give it."""
        gen = data.get("generate") if isinstance(data, dict) else None
        if isinstance(gen, dict) and "seq_len" not in data:
            p, n = gen.get("prompt_tokens"), gen.get("new_tokens")
            if isinstance(p, int) and isinstance(n, int):
                return {**data, "seq_len": p + n}
        return data

    @model_validator(mode="after")
    def _one_origin(self) -> DataSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' (a local file) or 'dataset' (a datasets id)")
        lo, hi = self.fraction
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"fraction must satisfy 0 <= start < end <= 1, found [{lo}, {hi}]")
        g = self.generate
        if g is not None and self.seq_len != g.prompt_tokens + g.new_tokens:
            raise ValueError(f"seq_len {self.seq_len} must equal generate.prompt_tokens + generate.new_tokens = "
                             f"{g.prompt_tokens} + {g.new_tokens} = {g.prompt_tokens + g.new_tokens} (or leave seq_len out)")
        return self


class ExportConfig(Strict):
    """How the final model is written and checked."""

    format: Literal["auto", "hf", "compressed-tensors"] = "auto"
    """auto: compressed-tensors when a stage quantized the weights, plain Hugging Face safetensors
    otherwise."""
    check: Literal["none", "transformers", "vllm"] = "transformers"
    """transformers: reload the export and compare greedy tokens with the in-memory result; vllm: also
    serve it in vLLM and require the same greedy tokens as transformers."""
    max_shard_size: str = "2GB"
    """Largest safetensors shard (e.g. 500MB, 5GB)."""
    draft_for: str | None = None
    """Declare the export a draft model for speculative decoding of this target (a local directory or Hub
    id): validation refuses a recipe whose model does not share the target's vocabulary and tokenizer, and
    the report and model card say how to serve the pair (`llmslim serve TARGET --draft OUTPUT`)."""


class ThroughputConfig(Strict):
    """The offline serving benchmark (as `llmslim eval --throughput`): random-token prompts, every request
    generating exactly `gen_len` tokens, each backend in its own process."""

    backend: Literal["vllm", "transformers", "both"] = "vllm"
    """The engine that serves the model: vllm, transformers, or both."""
    batch_sizes: list[int] = [1, 8]
    """Concurrent requests per run; one measurement per batch size."""
    prompt_len: int = Field(default=128, gt=0)
    """Prompt tokens per request."""
    gen_len: int = Field(default=128, gt=0)
    """Generated tokens per request."""
    repeats: int = Field(default=3, gt=0)
    """Timed runs per batch size (the report gives the median and the spread)."""
    warmup: int = Field(default=1, ge=0)
    """Untimed runs per batch size before the timed ones."""

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or min(v) <= 0:
            raise ValueError("expected a non-empty list of positive batch sizes")
        return v


class EvalConfig(Strict):
    """What is measured on the original and on the exported model."""

    perplexity: list[str] = []
    """Names of data sources (from `data:`) to measure perplexity on, before and after."""
    stride: int | None = Field(default=None, gt=0)
    """Perplexity in sliding windows of each source's seq_len that start every `stride` tokens (each
    token scored once, with more context); null: non-overlapping windows."""
    throughput: ThroughputConfig | None = None
    """Serving throughput, latency and memory before and after (see `eval.throughput`); null: not measured."""
    tasks: list[str] = []
    """lm-evaluation-harness tasks (needs `pip install lm-eval`), e.g. [hellaswag, arc_easy]."""
    task_limit: int | None = Field(default=None, gt=0)
    """Examples per task (a quick look; results are then not comparable with published ones)."""


class PushConfig(Strict):
    """Upload of the export and its model card to the Hugging Face Hub, at the end of a run whose export
    was written and checked (as `llmslim push OUTPUT REPO_ID`). The token comes from HF_TOKEN or the cached
    login (`hf auth login`); it is never written anywhere."""

    repo_id: str
    """The Hub repository, `namespace/name` (e.g. `me/stories-slim`)."""
    private: bool = True
    """Create the repository private (a repository that already exists keeps its visibility)."""
    revision: str | None = None
    """Commit to this branch (created from main when missing) instead of main; allows an existing repository."""
    commit_message: str | None = None
    """The commit message; null: one naming llmslim, the methods and the base model."""
    create_pr: bool = False
    """Open a pull request against main instead of committing to it; allows an existing repository."""
    exist_ok: bool = False
    """Commit to main of a repository that already exists (refused otherwise, so that an earlier model is not
    overwritten by accident)."""

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        from .hub import repo_id_problem

        problem = repo_id_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _pr_on_main(self) -> PushConfig:
        if self.create_pr and self.revision is not None:
            raise ValueError("create_pr opens a pull request against main; remove revision, or create_pr")
        return self


class RecipeModel(Strict):
    """The top level of a recipe file."""

    model: str
    """A local model directory, a Hugging Face Hub id, or a llama.cpp GGUF file (`.gguf`, converted once into
    a safetensors checkpoint in the work directory; see `gguf_file` for one on the Hub)."""
    gguf_file: str | None = None
    """The GGUF file to use inside `model` (a Hub repository or a local directory), e.g.
    `SmolLM2-135M-Instruct.Q4_1.gguf`; its weights are dequantized to `dtype` (auto: float32 for quantized
    files, which holds them exactly)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local directories."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype the stages write and the export is written in; auto: the checkpoint's own."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype of calibration work (layers in memory, activations); auto: `dtype` on a GPU, and on a CPU
    `dtype` when it is bfloat16 and the CPU has native bf16 matmuls (AVX512_BF16 or AMX), else float32.
    Hessians and importance sums are accumulated in float32 either way; quantization grids and written
    weights are always in `dtype`."""
    trust_remote_code: bool = False
    """Allow model code from the Hub; off unless the recipe says so."""
    use_safetensors: bool = True
    """Refuse pickled (.bin) checkpoints; set false to opt in to loading them."""
    device: str = "auto"
    """Where layer-by-layer work runs: auto (the GPU when there is one), cpu, cuda, cuda:N."""
    output: str
    """The export directory. Work files (stage checkpoints, state) live beside it in `<output>.work`."""
    seed: int = 0
    """Seed for calibration sampling and every random choice a stage makes."""
    data: dict[str, DataSource] = {}
    """Named text sources used by stages (`data: calib`) and by eval."""
    stages: list[Any] = []
    """Compression stages, applied in order: each is `method:` plus that method's parameters."""
    export: ExportConfig = ExportConfig()
    """How the final model is written and checked (see `export`)."""
    eval: EvalConfig = EvalConfig()
    """What is measured before and after (see `eval`)."""
    push: PushConfig | None = None
    """Upload the export and its model card to the Hugging Face Hub after a successful run (see `push`)."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("expected auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class Stage:
    """One validated stage: its position, method name and typed configuration."""

    index: int
    method: str
    config: MethodConfig

    @property
    def label(self) -> str:
        return f"stages[{self.index}] {self.method}"


@dataclass
class Recipe:
    """A validated recipe. `source` is the file it came from (for messages); `raw` the merged YAML data."""

    spec: RecipeModel
    stages: list[Stage]
    source: str
    raw: dict[str, Any] = field(repr=False)
    lines: dict[Path_, int] = field(default_factory=dict, repr=False)

    def where(self, path: Path_) -> str:
        """'file:line' of a YAML path (or its nearest parent), for messages after validation."""
        return _where(self.source, self.lines, path)

    def as_dict(self) -> dict[str, Any]:
        """The recipe with defaults filled in, as plain data (what is hashed and copied to the export)."""
        d = self.spec.model_dump(mode="json")
        if d["gguf_file"] is None:  # absent rather than null: recipes without it keep their hashes
            del d["gguf_file"]
        if d["export"]["draft_for"] is None:  # likewise
            del d["export"]["draft_for"]
        for source in d["data"].values():  # likewise
            if source["generate"] is None:
                del source["generate"]
        d["stages"] = [{"method": s.method, **s.config.model_dump(mode="json")} for s in self.stages]
        return d

    def stage_hash(self, upto: int, compute_dtype: str | None = None) -> str:
        """Hash of everything that determines the checkpoint after stage `upto` (inclusive): model, dtype,
        seed, the stages so far and the data they read, and the compute dtype as resolved on this machine
        (`compute_dtype`; `auto` means bf16 on some CPUs and float32 on others, so a resume on another
        kind of machine must not mix layers calibrated both ways). eval/export/push do not count."""
        d = self.as_dict()
        used = {n for s in self.stages[: upto + 1] for n in s.config.data_sources()}
        key = {
            "model": d["model"], "revision": d["revision"], "dtype": d["dtype"],
            **({"gguf_file": d["gguf_file"]} if "gguf_file" in d else {}),
            "compute_dtype": compute_dtype or d["compute_dtype"], "seed": d["seed"],
            "stages": d["stages"][: upto + 1], "data": {k: d["data"][k] for k in sorted(used)},
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def full_hash(self) -> str:
        """Hash of the whole effective recipe (stages, export, eval and all)."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading YAML with line numbers


def _load_yaml(text: str, filename: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML into plain Python data plus a map from each key path to its line number."""
    loader = yaml.SafeLoader(text)
    lines: dict[Path_, int] = {}
    try:
        root = loader.get_single_node()
        if root is None:
            raise RecipeError([f"{filename}: the recipe is empty; it needs at least 'model' and 'output'"])

        def build(node: yaml.Node, path: Path_) -> Any:
            lines.setdefault(path, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                out: dict[Any, Any] = {}
                for key_node, value_node in node.value:
                    key = loader.construct_object(key_node, deep=True)
                    if key in out:
                        raise RecipeError([f"{filename}:{key_node.start_mark.line + 1}: "
                                           f"{_fmt_path(path + (key,))}: duplicate key {key!r}"])
                    lines[path + (key,)] = key_node.start_mark.line + 1
                    out[key] = build(value_node, path + (key,))
                return out
            if isinstance(node, yaml.SequenceNode):
                return [build(item, path + (i,)) for i, item in enumerate(node.value)]
            return loader.construct_object(node, deep=True)

        return build(root, ()), lines
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError([f"{where}: not valid YAML: {problem}"]) from None
    finally:
        loader.dispose()


def _fmt_path(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def apply_overrides(data: dict[str, Any], overrides: list[str], lines: dict[Path_, int]) -> None:
    """Apply `--set key.path=value` overrides in place. Values are parsed as YAML scalars/flow values
    (`--set stages.0.count=2`, `--set eval.perplexity=[calib,wiki]`)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError([f"--set {item}: expected key.path=value"])
        key, _, value_text = item.partition("=")
        parts: list[Any] = [int(p) if p.isdigit() else p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError([f"--set {item}: empty key path"])
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError:
            value = value_text
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = _fmt_path(tuple(parts[: i + 1]))
            if isinstance(node, list):
                if not isinstance(part, int) or not 0 <= part < len(node):
                    raise RecipeError([f"--set {key}: {where}: no such list item (the list has {len(node)})"])
            elif not isinstance(node, dict):
                raise RecipeError([f"--set {key}: {where}: cannot set a field inside a {type(node).__name__}"])
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
        lines[tuple(parts)] = 0  # line 0 = "from the command line"


# ---------------------------------------------------------------- validation and error lines


def _did_you_mean(word: Any, options: list[str]) -> str:
    match = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _where(filename: str, lines: dict[Path_, int], path: Path_) -> str:
    p = path
    while p and p not in lines:
        p = p[:-1]
    line = lines.get(p)
    if line == 0:
        return "--set"
    return f"{filename}:{line}" if line else filename


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_class(ann: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`X`, `X | None`), if any."""
    for a in (ann, *get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _model_at(root: type[BaseModel], path: Path_) -> type[BaseModel] | None:
    """The pydantic model class that owns the mapping at `path` (to list its allowed fields)."""
    ann: Any = root
    for part in path:
        if get_origin(ann) in (list, tuple, dict):
            ann = get_args(ann)[-1]  # element type (list/tuple) or value type (dict)
            continue
        model = _model_class(ann)
        if model is None or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
    return _model_class(ann)


def _describe(err: dict[str, Any], owner: type[BaseModel] | None) -> str:
    kind, loc, found = err["type"], err["loc"], err.get("input")
    if kind == "extra_forbidden":
        allowed = _field_names(owner) if owner else []
        return (f"unknown field '{loc[-1]}'{_did_you_mean(loc[-1], allowed)}; allowed: "
                + ", ".join(allowed))
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        options = [o.strip(" '") for o in expected.replace(" or ", ",").split(",")]
        return f"found {found!r}{_did_you_mean(found, options)}; allowed: {expected}"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg
    return f"{msg[0].lower()}{msg[1:]}, found {found!r}"


def _pydantic_problems(e: ValidationError, model: type[BaseModel], prefix: Path_, filename: str,
                       lines: dict[Path_, int]) -> list[str]:
    problems = []
    errors: list[dict[str, Any]] = []
    for raw in e.errors():
        # Drop pydantic's union/tagged-type noise from locations (e.g. 'tuple[float, float]').
        errors.append({**raw, "loc": tuple(p for p in raw["loc"] if not (isinstance(p, str) and "[" in p))})
    # A misspelt required field is one mistake, not two: report the unknown key with its suggestion only.
    misspelt = set()
    for err in errors:
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), _field_names(owner) if owner else [], n=1, cutoff=0.6)
            misspelt |= {err["loc"][:-1] + (c,) for c in close}
    for err in errors:
        loc = err["loc"]
        if err["type"] == "missing" and loc in misspelt:
            continue
        path = prefix + loc
        owner = _model_at(model, loc[:-1]) if err["type"] == "extra_forbidden" else None
        problems.append(f"{_where(filename, lines, path)}: {_fmt_path(path)}: {_describe(err, owner)}")
    return problems


def _validate_stage(i: int, entry: Any, data_names: list[str], filename: str,
                    lines: dict[Path_, int]) -> tuple[Stage | None, list[str]]:
    path: Path_ = ("stages", i)
    where = _where(filename, lines, path)
    if not isinstance(entry, dict):
        return None, [f"{where}: {_fmt_path(path)}: expected a mapping with 'method:', found {entry!r}"]
    if "method" not in entry:
        return None, [f"{where}: {_fmt_path(path)}: missing 'method'; allowed: "
                      + ", ".join(implemented_methods())]
    name = entry["method"]
    where = _where(filename, lines, path + ("method",))
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        return None, [f"{where}: {_fmt_path(path + ('method',))}: unknown method {name!r}"
                      f"{_did_you_mean(name, list(METHODS))}; allowed: " + ", ".join(implemented_methods())]
    if method.run is None:
        return None, [f"{where}: {_fmt_path(path + ('method',))}: method '{name}' is reserved for "
                      f"{method.planned_for} and not implemented yet; implemented: "
                      + ", ".join(implemented_methods())]
    params = {k: v for k, v in entry.items() if k != "method"}
    try:
        config = method.config.model_validate(params)
    except ValidationError as e:
        return None, _pydantic_problems(e, method.config, path, filename, lines)
    for key, source in zip(("data", "eval_data"), config.data_sources()):
        if source not in data_names:
            return None, [f"{_where(filename, lines, path + (key,))}: {_fmt_path(path + (key,))}: "
                          f"no data source named {source!r}{_did_you_mean(source, data_names)}; "
                          f"defined under data: {', '.join(data_names) or '(none)'}"]
    return Stage(i, name, config), []


def parse_recipe(text: str, filename: str = "recipe.yaml", overrides: list[str] | None = None) -> Recipe:
    """Parse and validate recipe text. Raises RecipeError with every problem found, one line each."""
    data, lines = _load_yaml(text, filename)
    if not isinstance(data, dict):
        raise RecipeError([f"{filename}:1: the recipe must be a mapping of fields (model:, output:, ...)"])
    apply_overrides(data, overrides or [], lines)
    problems: list[str] = []
    spec = None
    try:
        spec = RecipeModel.model_validate(data)
    except ValidationError as e:
        problems += _pydantic_problems(e, RecipeModel, (), filename, lines)
    stages: list[Stage] = []
    raw_stages = data.get("stages") or []
    data_names = list((data.get("data") or {}).keys()) if isinstance(data.get("data"), dict) else []
    if isinstance(raw_stages, list):
        for i, entry in enumerate(raw_stages):
            stage, errs = _validate_stage(i, entry, data_names, filename, lines)
            problems += errs
            if stage:
                stages.append(stage)
    if spec is not None:
        for i, name in enumerate(spec.eval.perplexity):
            if name not in spec.data:
                path = ("eval", "perplexity", i)
                problems.append(f"{_where(filename, lines, path)}: {_fmt_path(path)}: no data source named "
                                f"{name!r}{_did_you_mean(name, data_names)}; defined under data: "
                                f"{', '.join(data_names) or '(none)'}")
    if problems:
        raise RecipeError(problems)
    assert spec is not None
    following = [s.config for s in stages[1:]] + [None]
    stages = [Stage(s.index, s.method, s.config.before(nxt)) for s, nxt in zip(stages, following)]
    return Recipe(spec=spec, stages=stages, source=filename, raw=data, lines=lines)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe file (see `parse_recipe`)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    return parse_recipe(p.read_text(encoding="utf-8"), str(path), overrides)

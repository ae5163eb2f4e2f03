"""Downstream tasks through lm-evaluation-harness (`pip install lm-eval`), imported only when asked for.

llmslim does not re-implement tasks: it hands the model directory to lm-eval's Hugging Face backend and
copies the metrics of each task into the report under their lm-eval names ("acc,none", "acc_stderr,none":
metric, then filter). A task is named as lm-eval knows it (`hellaswag`, `arc_easy`; their data sets come
from the Hub) or given as a path: a task YAML file, or a directory of them (every task defined there
runs). Paths go to lm-eval's TaskManager as `include_path`, so offline tasks over local files work, e.g.

    task: my_choice
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_choice.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc}]

Note that lm-eval loads the model itself, in transformers: W8A8 exports are scored with their weights
dequantized and their activations in full precision (unlike the perplexity, which emulates vLLM's int8
activations).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)

LM_EVAL_REQUIREMENT = "lm-eval>=0.4.9,<0.5"


def require_lm_eval() -> None:
    """Raise a one-line UserError when lm-eval is not installed (checked before any long work)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"downstream tasks need lm-evaluation-harness, which is not installed: "
                        f"pip install '{LM_EVAL_REQUIREMENT}'")


@dataclass(frozen=True)
class TaskPlan:
    """What lm-eval is asked to run: task names, the directories that define the ones given as paths, and
    whether any task is one of lm-eval's own (then its built-in task index is loaded too)."""

    names: list[str]
    include_paths: list[str]
    builtin: bool

    def manager(self) -> Any:
        """lm-eval's TaskManager for these tasks (indexing the built-in tasks takes seconds: only when
        one of them is asked for)."""
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=list(self.include_paths) or None, include_defaults=self.builtin)


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or spec.startswith((".", "~"))


def resolve_tasks(specs: list[str]) -> TaskPlan:
    """Turn `--tasks` entries into task names lm-eval knows, checking each one up front; raises a
    one-line UserError naming the entry when a path is missing or a name is unknown."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    names: list[str] = []
    from_paths: list[str] = []
    includes: list[str] = []
    for spec in specs:
        if not _looks_like_path(spec):
            names.append(spec)
            continue
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"--tasks {spec}: no such task file or directory")
        if path.is_file() and path.suffix not in (".yaml", ".yml"):
            raise UserError(f"--tasks {spec}: expected a task YAML file (.yaml) or a directory of them")
        folder = path if path.is_dir() else path.parent
        try:
            local = TaskManager(include_path=str(folder), include_defaults=False)
        except Exception as e:  # lm-eval's YAML loader raises many types for a broken file
            raise UserError(f"--tasks {spec}: lm-eval cannot read the task definitions: {_first_line(e)}") from None
        if path.is_dir():
            found = local.all_subtasks
        else:
            found = [name for name, entry in local.task_index.items()
                     if entry.yaml_path is not None and Path(entry.yaml_path).resolve() == path.resolve()]
        if not found:
            raise UserError(f"--tasks {spec}: no lm-eval task defined there (a task YAML needs a `task:` name)")
        includes.append(str(folder.resolve()))
        names += found
        from_paths += found
    builtin = [n for n in names if n not in from_paths]
    plan = TaskPlan(list(dict.fromkeys(names)), list(dict.fromkeys(includes)), builtin=bool(builtin))
    if builtin:
        known = set(plan.manager().all_tasks)
        unknown = [n for n in builtin if n not in known]
        if unknown:
            raise UserError(f"--tasks {', '.join(unknown)}: unknown lm-eval task; see `lm_eval ls tasks` for names, "
                            "or give the path of a task YAML file")
    return plan


def _first_line(e: BaseException) -> str:
    text = str(e.args[0]) if e.args else ""
    text = text.strip() or type(e).__name__
    return text.splitlines()[0]


def run_tasks(model_dir: str | Path, plan: TaskPlan, *, limit: int | None = None, num_fewshot: int | None = None,
              batch_size: int = 8, dtype: str = "auto", device: str | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for the planned lm-eval tasks on the model in `model_dir`."""
    require_lm_eval()
    import lm_eval

    try:
        results: Any = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": dtype}, tasks=list(plan.names),
            num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
            task_manager=plan.manager(), log_samples=False)
    except (KeyError, ValueError, FileNotFoundError) as e:  # a task lm-eval cannot build or whose data is missing
        raise UserError(f"--tasks {','.join(plan.names)}: lm-eval: {_first_line(e)}") from None
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        # lm-eval's metric keys are "metric,filter"; other keys (alias, sample_len, ...) are bookkeeping.
        out[task] = {k: float(v) for k, v in metrics.items()
                     if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out

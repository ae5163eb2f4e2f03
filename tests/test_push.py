"""`llmslim push` and the recipe's `push:` against a local Hub (tests/fake_hub.py) through the real HfApi:
what arrives on the server, resuming an interrupted upload, refusals, one-line errors, the dry run, and
the model card (front matter, relation and tags for each mix of methods)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from cli_runner import run_cli
from fake_hub import FakeHub
from huggingface_hub import ModelCard
from tiny_models import tiny_recipe

from llmslim.card import MARKER, base_model_relation, build_card, card_tags
from llmslim.errors import RecipeError, UserError
from llmslim.hub import PushError, checked_report, export_files, push
from llmslim.pipeline import run
from llmslim.recipe import PushConfig, parse_recipe

TOKEN = "hf_llmslimTestToken0123456789abcdef"


@pytest.fixture(scope="module")
def made(tiny_tok, tmp_path_factory) -> tuple[Path, dict]:
    """A real export and the recipe that made it: a tiny Llama with a layer dropped, then GPTQ W4A16
    (compressed-tensors, one shard per layer)."""
    root = tmp_path_factory.mktemp("push-export")
    text = tiny_recipe(root / "run", tiny_tok("llama"), [{"method": "drop_layers", "layers": [3]},
                                                          {"method": "gptq", "bits": 4, "group_size": 128,
                                                           "data": "calib"}], eval={"perplexity": ["heldout"]})
    return Path(run(parse_recipe(text))["output"]), yaml.safe_load(text)


@pytest.fixture
def export(made) -> Path:
    return made[0]


@pytest.fixture
def copy(export, tmp_path):
    """A fresh copy of the export (a push writes its card into it)."""
    return Path(shutil.copytree(export, tmp_path / "export"))


@pytest.fixture
def hub_env(monkeypatch):
    """Start a FakeHub and point huggingface_hub at it with the token (in this process; `env` for children)."""
    hubs: list[FakeHub] = []

    def start(**kw) -> tuple[FakeHub, dict[str, str | None]]:
        hub = FakeHub(TOKEN, **kw).__enter__()
        hubs.append(hub)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        return hub, {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url}

    yield start
    for hub in hubs:
        hub.__exit__()


@pytest.fixture
def no_xet(monkeypatch):
    """huggingface_hub's single-commit LFS path (as without hf_xet): HF_HUB_DISABLE_XET, which the library
    reads into this constant at import."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


def token_only_in_authorization(hub: FakeHub, *texts: str, root: Path | None = None) -> None:
    """The evidence that the token leaked nowhere: only Authorization headers carry it; no output, log
    line or file under `root` holds it."""
    assert hub.requests
    for r in hub.requests:
        where = [k for k, v in r.headers.items() if TOKEN in v]
        assert where in ([], ["authorization"]), (r.method, r.path, where)
        assert TOKEN not in r.path and TOKEN not in json.dumps(r.query) and TOKEN.encode() not in r.body
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    for text in texts:
        assert TOKEN not in text
    for f in (root.rglob("*") if root else []):
        assert not f.is_file() or TOKEN.encode() not in f.read_bytes(), f


def recorded(export: Path) -> list[str]:
    """What push must upload: the files the report records (the card among them once written), and the report."""
    report = json.loads((export / "llmslim_report.json").read_text())
    return sorted([e["path"] for e in report["export"]["files"]] + ["llmslim_report.json"])


def assert_repo_holds_export(hub: FakeHub, repo_id: str, export: Path, ref: str = "main") -> None:
    on_hub = hub.repos[repo_id].refs[ref]
    assert sorted(on_hub) == recorded(export) and "README.md" in on_hub
    assert sorted(p for p, _ in export_files(export, checked_report(export))) == recorded(export)
    for path in on_hub:
        assert on_hub[path]["content"] == (export / path).read_bytes(), path


# ---------------------------------------------------------------- the card


@pytest.mark.parametrize("methods, relation, expected, absent", [
    (["gptq"], "quantized", ["llmslim", "gptq", "quantized", "w4a16", "compressed-tensors"], ["pruned"]),
    (["awq"], "quantized", ["awq", "quantized"], []),
    (["rtn", "autoround"], "quantized", ["rtn", "autoround", "quantized"], []),
    (["drop_layers", "gptq"], "finetune", ["drop-layers", "pruned", "gptq", "quantized"], ["distilled"]),
    (["prune_heads", "prune_ffn", "distill"], "finetune", ["prune-heads", "prune-ffn", "pruned", "distilled"],
     ["quantized", "w4a16", "compressed-tensors"]),
    (["qat"], "finetune", ["qat", "quantized"], ["pruned"]),
    (["moefy", "set_topk"], "finetune", ["moefy", "moe", "set-topk"], ["quantized"]),
    ([], None, ["llmslim"], ["quantized"]),
])
def test_relation_and_tags_for_each_mix_of_methods(methods, relation, expected, absent):
    quantized = any(m in ("gptq", "awq", "rtn", "autoround", "qat") for m in methods)
    config = {"num_local_experts": 4} if "moefy" in methods else {}
    if quantized:
        config["quantization_config"] = {"config_groups": {"g": {"weights": {"num_bits": 4}}}}
    tags = card_tags(methods, config, "compressed-tensors" if quantized else "hf")
    assert base_model_relation(methods) == relation
    assert set(expected) <= set(tags) and not set(absent) & set(tags), tags
    assert len(tags) == len(set(tags))


def fixture_export(root: Path, model: str, methods: list[str], data: dict, fmt: str = "hf",
                   config: dict | None = None, stage_data: list[str | None] | None = None) -> Path:
    """An export directory made of the three files the card reads (a report as `llmslim run` writes it)."""
    root.mkdir(parents=True)
    plan = [{"label": "original", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "ffn": 128,
             "experts": 0, "top_k": 0, "params": 1000, "bytes": 4000}]
    report = {"model": model, "dtype": "bfloat16", "export": {"format": fmt, "files": ["config.json"]},
              "plan": plan, "stages": [{"index": i, "method": m, "seconds": 1.0, "summary": {}}
                                       for i, m in enumerate(methods)],
              "size": {"before": {"params": 1000, "bytes": 4000}, "after": {"params": 800, "bytes": 1600}},
              "eval": {"before": {}, "after": {}}, "check": {"backend": "transformers", "passed": True, "detail": "ok"},
              "versions": {"llmslim": "0.1.0"}}
    (root / "llmslim_report.json").write_text(json.dumps(report))
    (root / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                                                  "max_position_embeddings": 512, **(config or {})}))
    recipe = {"model": model, "data": data, "push": {"repo_id": "me/x"},
              "stages": [{"method": m, "data": d} for m, d in zip(methods, stage_data or ["calib"] * len(methods))]}
    (root / "llmslim_recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_front_matter_from_a_hub_base_with_a_cached_card(tmp_path, monkeypatch):
    """A Hub id as the base: base_model, relation and the license of the base model's cached card; the
    calibration dataset from the Hub is listed, a local one and an eval-only one are not."""
    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--org--base" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (cache / "models--org--base" / "refs").mkdir()
    (cache / "models--org--base" / "refs" / "main").write_text("abc123")
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: base-license\nlicense_link: LICENSE\n---\nhi")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    local_data = tmp_path / "local.txt"
    local_data.write_text("x")
    data = {"calib": {"dataset": "allenai/c4"}, "local": {"dataset": str(local_data)},
            "wiki": {"dataset": "wikitext"}}
    w8a8 = {"quantization_config": {"config_groups": {"g": {"weights": {"num_bits": 8},
                                                            "input_activations": {"num_bits": 8}}}}}
    export = fixture_export(tmp_path / "q", "org/base", ["gptq", "rtn"], data, "compressed-tensors", w8a8,
                            stage_data=["calib", "local"])
    text = build_card(export, "me/base-w8a8")
    meta = front_matter(text)
    assert meta["base_model"] == "org/base" and meta["base_model_relation"] == "quantized"
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "base-license", "LICENSE")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == ["allenai/c4"]
    assert {"llmslim", "gptq", "rtn", "quantized", "w8a8", "compressed-tensors"} <= set(meta["tags"])
    card = ModelCard(text)  # huggingface_hub parses it as the Hub will
    assert card.data.base_model == "org/base" and card.data.to_dict()["base_model_relation"] == "quantized"
    assert MARKER in card.text and "vllm serve me/base-w8a8" in card.text and "me/x" not in card.text


def test_card_front_matter_from_a_local_base(tmp_path):
    """A local model directory: its README's license is inherited; there is no Hub id for base_model, so
    neither base_model nor a relation is claimed; a pruned and distilled model is tagged as such."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    export = fixture_export(tmp_path / "p", str(base), ["prune_heads", "distill"], {"calib": {"path": "t.txt"}})
    meta = front_matter(build_card(export, "me/pruned"))
    assert meta["license"] == "apache-2.0" and "base_model" not in meta and "base_model_relation" not in meta
    assert {"prune-heads", "pruned", "distill", "distilled"} <= set(meta["tags"]) and "quantized" not in meta["tags"]
    assert "datasets" not in meta


def test_card_says_where_the_license_and_the_data_come_from(tmp_path, monkeypatch):
    """When the base model's card cannot be read (a Hub base not in the cache, a local base without a
    README.md, an unreadable one) the card says the license is not stated and why, and claims none; every
    data source is listed with what it was used for: calibration, training, a training stage's evaluation,
    perplexity, lm-eval tasks. The `datasets` metadata keeps the Hub datasets the weights came from."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    data = {"calib": {"dataset": "allenai/c4"}, "train": {"path": str(tmp_path / "train.txt")},
            "heldout": {"path": str(tmp_path / "heldout.txt")},
            "wiki": {"dataset": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}}
    export = fixture_export(tmp_path / "e", "org/uncached", ["gptq", "distill"], data)
    recipe = yaml.safe_load((export / "llmslim_recipe.yaml").read_text())
    recipe["stages"] = [{"method": "gptq", "data": "calib"},
                        {"method": "distill", "data": "train", "eval_data": "heldout"}]
    recipe["eval"] = {"perplexity": ["wiki"], "tasks": ["hellaswag"]}
    (export / "llmslim_recipe.yaml").write_text(yaml.safe_dump(recipe))
    text = build_card(export, "me/x")
    meta = front_matter(text)
    assert "license" not in meta and meta["datasets"] == ["allenai/c4"]
    assert "## License\n\nNot stated here: llmslim could not read the base model's license (its card (README.md) " \
           "is not on this machine, and llmslim does not fetch it)" in text
    assert "the base model's license applies: check it" in text
    for row in ["| calib | calibration (stage 0 gptq) | [allenai/c4](https://huggingface.co/datasets/allenai/c4) |",
                "| train | training (stage 1 distill) | a local file (`train.txt`) |",
                "| heldout | evaluation (stage 1 distill) | a local file (`heldout.txt`) |",
                "| wiki | evaluation (perplexity) | [wikitext](https://huggingface.co/datasets/wikitext), name "
                "`wikitext-2-raw-v1`, split `test` |",
                "| hellaswag | evaluation (lm-evaluation-harness task) |"]:
        assert row in text, row

    base = tmp_path / "base"
    base.mkdir()
    local = fixture_export(tmp_path / "l", str(base), ["prune_ffn"], {"calib": {"path": "t.txt"}})
    assert "license (its directory has no README.md)" in build_card(local, "me/l")
    (base / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    text = build_card(local, "me/l")
    assert "license (its README.md could not be read (" in text and "license" not in front_matter(text)
    (base / "README.md").write_text("---\ntags: [x]\n---\n")
    assert "license (its card states no license)" in build_card(local, "me/l")
    (base / "README.md").write_text("---\nlicense: mit\n---\n")
    text = build_card(local, "me/l")
    assert front_matter(text)["license"] == "mit" and "`mit`, the base model's license as its card states it" in text


def test_card_of_a_real_export(copy):
    from llmslim.card import write_card

    card = ModelCard.load(write_card(copy, "me/tiny-w4"))
    meta = card.data.to_dict()
    assert {"llmslim", "drop-layers", "pruned", "gptq", "quantized", "w4a16", "compressed-tensors"} <= set(meta["tags"])
    assert "base_model" not in meta and "license" not in meta  # a local random model: nothing to inherit
    report = json.loads((copy / "llmslim_report.json").read_text())
    for row in report["plan"]:  # every shape in the stage table
        assert f"| {row['label']} | {row['layers']} | {row['hidden']} |" in card.text and f"{row['params']:,}" in card.text
    ppl = report["eval"]["after"]["perplexity"]["heldout"]["ppl"]
    assert f"| {ppl:.4f} |" in card.text and "passed" in card.text
    assert "vllm serve me/tiny-w4 --dtype=bfloat16" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-w4"' in card.text
    shown = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    recipe = yaml.safe_load((copy / "llmslim_recipe.yaml").read_text())
    assert shown == {k: v for k, v in recipe.items() if k != "push"}


# ---------------------------------------------------------------- dry run and refusals


def test_dry_run_writes_the_card_lists_files_and_sends_nothing(copy, hub_env):
    hub, env = hub_env()
    rc, out = run_cli("push", str(copy), "me/tiny", "--dry-run", env={**env, "HF_TOKEN": None})
    assert rc == 0, out
    assert (copy / "README.md").is_file() and MARKER in (copy / "README.md").read_text()
    files = export_files(copy, checked_report(copy))
    assert f"would push {len(files)} files" in out
    for path, size in files:
        from llmslim.report import human_bytes

        assert f"  {path}  {human_bytes(size)}" in out
    assert hub.requests == []


def test_refuses_an_export_whose_check_failed_or_that_is_not_an_export(copy, hub_env, tmp_path):
    hub, env = hub_env()
    report = json.loads((copy / "llmslim_report.json").read_text())
    report["check"]["passed"] = False
    (copy / "llmslim_report.json").write_text(json.dumps(report))
    rc, out = run_cli("push", str(copy), "me/tiny", env=env)
    assert rc == 2 and "its check failed" in out and "does not push a model that failed its check" in out, out
    (tmp_path / "plain").mkdir()
    rc, out = run_cli("push", str(tmp_path / "plain"), "me/tiny", env=env)
    assert rc == 2 and "not an llmslim export (no llmslim_report.json)" in out, out
    assert hub.requests == [] and not (copy / "README.md").exists()


def test_a_readme_llmslim_did_not_write_is_kept(copy):
    (copy / "README.md").write_text("my own notes")
    with pytest.raises(UserError, match="README.md llmslim did not write; llmslim will not replace it"):
        push(copy, PushConfig(repo_id="me/tiny"), dry_run=True)
    assert (copy / "README.md").read_text() == "my own notes"


def test_the_card_counts_as_llmslim_s_own_file_in_the_export(copy):
    """A rerun of `llmslim run` may replace an export holding the card push wrote, not one with a README
    somebody else put there."""
    from llmslim.workspace import output_problem

    push(copy, PushConfig(repo_id="me/tiny"), dry_run=True)
    assert output_problem(copy) is None
    push(copy, PushConfig(repo_id="me/other"), dry_run=True)  # a second push rewrites its own card
    assert output_problem(copy) is None and "me/other" in (copy / "README.md").read_text()
    (copy / "README.md").write_text((copy / "README.md").read_text() + "my own notes")
    assert "files changed since llmslim wrote them (README.md (size" in (output_problem(copy) or "")
    with pytest.raises(UserError, match=r"README.md: changed since llmslim wrote it .*will not replace it"):
        push(copy, PushConfig(repo_id="me/tiny"), dry_run=True)
    assert (copy / "README.md").read_text().endswith("my own notes")


@pytest.mark.parametrize("added", ["eval/my_notes.txt", "eval/sub/x.txt"])
def test_a_file_added_inside_the_export_s_folders_is_neither_pushed_nor_published(copy, hub_env, added):
    """A user's file at depth 1 or 2, inside the eval/ folder llmslim wrote: push refuses, naming it; the Hub
    is not contacted, no card is written."""
    hub, env = hub_env(lfs_suffixes=())
    (copy / added).parent.mkdir(exist_ok=True)
    (copy / added).write_text("private notes")
    for dry in ([], ["--dry-run"]):
        rc, out = run_cli("push", str(copy), "me/tiny", *dry, env=env)
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and "Traceback" not in out, out
        assert f"{copy / added}: not written by llmslim (not in llmslim_report.json's export.files)" in errors[0]
        assert "move it out of the export" in errors[0]
    assert hub.requests == [] and not (copy / "README.md").exists()


@pytest.mark.parametrize("change", ["size", "content"])
def test_push_refuses_an_export_whose_files_changed(copy, hub_env, change):
    """A recorded file edited since `llmslim run` wrote it (another size; or the same size, other bytes):
    one line naming the file and what changed, exit 2, nothing sent."""
    hub, env = hub_env(lfs_suffixes=())
    if change == "size":
        target = copy / "eval" / "report.md"
        target.write_text(target.read_text() + "edited\n")
        expected = "eval/report.md: changed since llmslim wrote it (size "
    else:
        target = next(iter(sorted(copy.glob("*.safetensors"))))
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        expected = f"{target.name}: changed since llmslim wrote it (same size, sha256 "
    rc, out = run_cli("push", str(copy), "me/tiny", env=env)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in out, out
    assert f"{copy}/{expected}" in errors[0] and "`llmslim run RECIPE --replace-output`" in errors[0], errors[0]
    assert hub.requests == [] and not (copy / "README.md").exists()


def test_no_token_is_one_line_and_no_request(copy, hub_env, monkeypatch, tmp_path):
    hub, _ = hub_env()
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PushError, match=r"no Hugging Face token: set HF_TOKEN .* `hf auth login`"):
        push(copy, PushConfig(repo_id="me/tiny"))
    assert hub.requests == []


# ---------------------------------------------------------------- pushing


def test_push_end_to_end_through_the_cli(copy, hub_env, tmp_path):
    """With hf_xet as installed (the pipelined upload), every file regular: what the server holds equals
    the export; then a second push of the same export sends no file and makes no commit."""
    hub, env = hub_env(lfs_suffixes=())
    rc, out = run_cli("push", str(copy), "me/tiny", env=env)
    assert rc == 0, out
    assert_repo_holds_export(hub, "me/tiny", copy)
    create = hub.seen("POST", r"^/api/repos/create$")[0].json()
    assert create == {"name": "tiny", "organization": "me", "visibility": "private"}
    (commit,) = hub.repos["me/tiny"].commits
    assert commit["summary"] == "llmslim: drop_layers + gptq of model"
    assert f"pushed {len(commit['files'])} files" in out and f"{hub.url}/me/tiny" in out and commit["oid"] in out

    rc, again = run_cli("push", str(copy), "me/tiny", "--exist-ok", env=env)
    assert rc == 0, again
    assert len(hub.repos["me/tiny"].commits) == 1 and commit["oid"] in again  # nothing changed: no commit
    token_only_in_authorization(hub, out, again, root=tmp_path)


def test_branch_and_pull_request_leave_main_alone(copy, hub_env, no_xet, caplog, capfd):
    """LFS path (no hf_xet): --revision commits to a new branch of an existing repository, --create-pr
    opens a pull request; main keeps the earlier model; public flag and commit message as given."""
    caplog.set_level(logging.DEBUG)
    hub, _ = hub_env()
    hub.add_repo("me/old", {"README.md": b"the earlier model"})
    push(copy, PushConfig(repo_id="me/old", private=False, revision="slim", commit_message="a smaller one"))
    assert hub.repos["me/old"].refs["main"] == {"README.md": {"content": b"the earlier model",
                                                             "oid": hub.repos["me/old"].refs["main"]["README.md"]["oid"],
                                                             "lfs": False}}
    assert_repo_holds_export(hub, "me/old", copy, ref="slim")
    assert hub.repos["me/old"].commits[0]["summary"] == "a smaller one" and hub.seen("POST", "/branch/slim$")
    assert all(hub.repos["me/old"].refs["slim"][f]["lfs"] for f in hub.repos["me/old"].refs["slim"]
               if f.endswith(".safetensors"))

    result = push(copy, PushConfig(repo_id="me/old", create_pr=True))
    assert result.pr_url and hub.repos["me/old"].commits[-1]["ref"] == "refs/pr/1"
    assert list(hub.repos["me/old"].refs["main"]) == ["README.md"]
    push(copy, PushConfig(repo_id="me/new", private=False))
    assert hub.seen("POST", "/api/repos/create$")[-1].json()["visibility"] == "public"
    out, err = capfd.readouterr()
    token_only_in_authorization(hub, out, err, *[r.getMessage() for r in caplog.records], root=copy)


def test_rerun_after_an_interrupted_upload_sends_only_what_is_missing(copy, hub_env, no_xet):
    """One shard's upload fails (an expired storage URL: 403); the others reach LFS storage. The retry the
    message names sends only that shard (the LFS batch API answers "present" for the others), and a push of
    an unchanged export sends nothing (preupload oids match)."""
    hub, _ = hub_env()
    shards = sorted(copy.glob("*.safetensors"))
    oid = {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in shards}
    failing = hashlib.sha256(shards[1].read_bytes()).hexdigest()
    hub.fail("PUT", f"/lfs-upload/{failing}$", 403, "Request has expired", times=1)
    with pytest.raises(PushError) as e:
        push(copy, PushConfig(repo_id="me/tiny"))
    message = str(e.value)
    assert "\n" not in message and "HTTP 403" in message and "export at" in message
    assert message.endswith(f"retry with: llmslim push {copy} me/tiny --exist-ok")
    first = {r.path.rsplit("/", 1)[1] for r in hub.seen("PUT", "/lfs-upload/")}
    assert first == set(oid) and not hub.repos["me/tiny"].commits  # all tried, no commit
    stored = set(hub.lfs)
    assert stored == set(oid) - {failing}

    n = len(hub.requests)
    push(copy, PushConfig(repo_id="me/tiny", exist_ok=True))
    second = [r.path.rsplit("/", 1)[1] for r in hub.requests[n:] if r.method == "PUT"]
    assert second == [failing]  # only the shard that had not arrived
    assert_repo_holds_export(hub, "me/tiny", copy)

    n = len(hub.requests)
    push(copy, PushConfig(repo_id="me/tiny", exist_ok=True))
    assert not [r for r in hub.requests[n:] if r.method == "PUT" or "/commit/" in r.path]
    assert len(hub.repos["me/tiny"].commits) == 1


# ---------------------------------------------------------------- errors, through the command line


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case, expected", [
    ("401", r"the Hub did not accept the token \(HTTP 401.*set HF_TOKEN to a valid token"),
    ("403", r"the token may not write to me/tiny \(HTTP 403: no rights in namespace me\): use a token with write"),
    ("404", r"me/tiny: not found on the Hub \(HTTP 404.*check the repository id.*retry with: llmslim push \S+ "
            r"me/tiny --exist-ok$"),
    ("409", r"me/tiny already exists on the Hub \(HTTP 409\); llmslim does not commit to an existing repository "
            r"unless asked: add --exist-ok .*--revision BRANCH .*--create-pr"),
    ("413", r"too large \(HTTP 413: Payload Too Large\).*export.max_shard_size"),
    ("refused", r"cannot reach the Hub at http://127.0.0.1:\d+ \(.*\): check the network connection"),
])
def test_hub_errors_are_one_line_with_what_to_do(copy, hub_env, case, expected):
    import re

    hub, env = hub_env(lfs_suffixes=())
    if case == "401":
        env["HF_TOKEN"] = "hf_wrong"
    elif case == "403":
        hub.fail("POST", "/api/repos/create$", 403, "no rights in namespace me")
    elif case == "404":
        hub.fail("POST", "/preupload/", 404, "Repository not found", headers={"X-Error-Code": "RepoNotFound"})
    elif case == "409":
        hub.add_repo("me/tiny", {"README.md": b"somebody's model"})
    elif case == "413":
        hub.fail("POST", "/commit/", 413, "Payload Too Large")
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    rc, out = run_cli("push", str(copy), "me/tiny", env=env)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in out, out
    assert re.search(expected, errors[0]), errors[0]
    assert TOKEN not in out
    if case == "409":
        assert hub.repos["me/tiny"].refs["main"]["README.md"]["content"] == b"somebody's model"
        assert not hub.seen("POST", "/preupload/|/commit/")
    assert (copy / "config.json").is_file() and checked_report(copy)  # the export is kept


# ---------------------------------------------------------------- the recipe's push section


def test_recipe_push_is_validated_at_load(tmp_path):
    base = {"model": "m", "output": "o"}
    with pytest.raises(RecipeError, match=r"push.repo_id: expected a Hub repository id namespace/name.*'no-slash'"):
        parse_recipe(yaml.safe_dump({**base, "push": {"repo_id": "no-slash"}}))
    with pytest.raises(RecipeError, match=r"push: create_pr opens a pull request against main; remove revision"):
        parse_recipe(yaml.safe_dump({**base, "push": {"repo_id": "me/x", "revision": "b", "create_pr": True}}))
    spec = parse_recipe(yaml.safe_dump({**base, "push": {"repo_id": "me/x"}})).spec.push
    assert spec is not None and (spec.private, spec.revision, spec.create_pr, spec.exist_ok) == (True, None, False, False)


def test_recipe_pushes_after_a_successful_run_and_a_failed_push_keeps_the_export(made, tmp_path, hub_env, no_xet):
    """The fixture's recipe with a push section, run where a copy of its output and work files lies (the
    run reuses the stages, export, check and evaluation it finds there, as any rerun does)."""
    export, recipe = made
    shutil.copytree(export.parent, tmp_path / "r")
    out = tmp_path / "r" / "out"
    text = yaml.safe_dump({**recipe, "output": str(out), "push": {"repo_id": "me/run"}})
    hub, _ = hub_env()
    hub.fail("POST", "/commit/", 503, "down for maintenance", times=1)  # after the repository is created
    with pytest.raises(PushError, match=r"^push: the Hub is busy or failing \(HTTP 503.*retry with: llmslim push "
                                        r"\S+/out me/run --exist-ok .*rerunning `llmslim run` also retries"):
        run(parse_recipe(text))
    assert (out / "llmslim_report.json").is_file() and not hub.repos["me/run"].commits  # export complete, kept

    report = run(parse_recipe(text))  # up to date: only the push runs, into the repository it created
    assert_repo_holds_export(hub, "me/run", out)
    state = json.loads((tmp_path / "r" / "out.work" / "state.json").read_text())
    assert state["push"]["commit_oid"] == hub.repos["me/run"].commits[0]["oid"] == report["push"]["commit_oid"]
    n = len(hub.requests)
    run(parse_recipe(text))  # pushed already: nothing to do
    assert len(hub.requests) == n
    token_only_in_authorization(hub, root=tmp_path)


def test_recipe_does_not_push_when_the_check_fails(tmp_path, hub_env):
    from tiny_models import config_for
    from transformers import AutoModelForCausalLM

    hub, _ = hub_env()
    cfg = config_for("llama", num_attention_heads=8, head_dim=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m16")  # vLLM's CPU attention: no head_dim 16
    text = tiny_recipe(tmp_path / "r", tmp_path / "m16", [{"method": "drop_layers", "layers": [0]}],
                       export={"check": "vllm"}, push={"repo_id": "me/never"})
    with pytest.raises(UserError, match="head_dim 16 is not supported"):
        run(parse_recipe(text))
    assert hub.requests == [] and not (tmp_path / "r" / "out").exists()

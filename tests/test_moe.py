"""moefy, prune_experts and set_topk: the routing cores, dense equivalence of moefy at top_k = E, planted
dead experts for every criterion, config rewriting, resume after a kill, clear errors, routing statistics
and heatmap, and every exported architecture served by vLLM with the same greedy tokens as transformers."""

from __future__ import annotations

import itertools
import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE
from fault_runs import export_differences, llmslim_run
from tiny_models import tiny_recipe
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from llmslim.check import check_exports
from llmslim.checkpoint import Checkpoint
from llmslim.errors import RecipeError
from llmslim.methods import routing
from llmslim.pipeline import Workspace, prepare, run
from llmslim.recipe import parse_recipe

# ---------------------------------------------------------------- pure cores


@pytest.mark.parametrize("normalize", [True, False])
def test_route_is_what_the_architectures_compute(normalize):
    torch.manual_seed(0)
    x = torch.randn(50, 16)
    if normalize:
        router = MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=6, num_experts_per_tok=2))
    else:
        router = Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=16, num_experts=6, num_experts_per_tok=2,
                                                   norm_topk_prob=False))
    torch.nn.init.normal_(router.weight)
    logits, top_weights, top_index = router(x)
    expected = torch.zeros(50, 6).scatter(1, top_index, top_weights.float())
    assert torch.allclose(routing.route(logits, 2, normalize), expected, atol=1e-6)


def test_balanced_assignment_fills_every_cluster_exactly_and_prefers_close_pairs():
    dist = torch.tensor([[0.0, 5.0], [0.1, 5.0], [0.2, 0.3], [9.0, 0.0]])
    assign = routing.assign_balanced(dist, 2)
    assert assign.tolist() == [0, 0, 1, 1]  # item 2 would rather join 0, which is full
    torch.manual_seed(0)
    for n, k in ((60, 4), (64, 8), (30, 3)):
        out = routing.assign_balanced(torch.rand(n, k), n // k)
        assert torch.bincount(out, minlength=k).tolist() == [n // k] * k


@pytest.mark.parametrize("balanced", [True, False])
def test_clustering_recovers_channels_that_fire_together_in_equal_groups(balanced):
    """Four planted groups of 16 channels, each firing on its own tokens: each expert is one group."""
    gen = torch.Generator().manual_seed(0)
    tokens = 400
    owner = torch.randint(4, (tokens,), generator=gen)  # which group fires on each token
    truth = torch.randperm(64, generator=gen) % 4
    features = (truth[:, None] == owner[None, :]).float() * (1 + torch.rand(64, tokens, generator=gen))
    features += 0.05 * torch.rand(64, tokens, generator=gen)
    assign = routing.cluster_channels(features, 4, balanced=balanced, generator=gen)
    assert torch.bincount(assign, minlength=4).tolist() == [16] * 4
    groups = {frozenset(g) for g in routing.groups_of(assign, 4)}
    assert groups == {frozenset(torch.nonzero(truth == e).squeeze(1).tolist()) for e in range(4)}
    split = routing.random_split(64, 4, gen)
    assert torch.bincount(split, minlength=4).tolist() == [16] * 4


def test_clustering_depends_on_its_generator_only():
    """Fewer distinct activation patterns than experts (here 2 for 4): k-means++ runs out of distinct
    channels and must draw a centroid at random. The draw comes from the stage's generator, so a resumed
    moefy (another process, another global RNG state) splits every layer exactly as the killed run did."""
    patterns = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    features = patterns[torch.arange(32) % 3 % 2]  # 2 patterns, unequal counts: which one a draw repeats matters
    splits = set()
    for global_seed in range(12):
        torch.manual_seed(global_seed)
        assign = routing.cluster_channels(features, 4, balanced=True, generator=torch.Generator().manual_seed(0))
        splits.add(tuple(assign.tolist()))
    assert len(splits) == 1


def test_probe_router_ranks_experts_by_their_gain():
    """Expert gains that are a linear function of x: the probe's top-2 is the best pair on held-out tokens."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=gen)
    mix = torch.randn(12, 5, generator=gen)
    gains = x @ mix
    probe = routing.fit_router_probe(x[:1000], gains[:1000])
    picked = routing.route(x[1000:] @ probe.T, 2, True) > 0
    best = torch.zeros_like(picked).scatter(1, gains[1000:].topk(2).indices, True)
    assert (picked == best).all(dim=1).float().mean() > 0.97


def test_expert_gains_and_routed_error_follow_their_definitions():
    gen = torch.Generator().manual_seed(1)
    out = torch.randn(3, 7, 4, generator=gen)  # [E, T, H]
    dense = out.sum(0)
    gains = routing.expert_gains(out, dense)
    for t, e in itertools.product(range(7), range(3)):
        exact = dense[t].pow(2).sum() - (dense[t] - out[e, t]).pow(2).sum()
        assert abs(gains[t, e] - exact) < 1e-4
    assert routing.routed_error(torch.randn(7, 5), torch.zeros(3, 5), out, dense, 3, True).item() < 1e-12


def test_routing_statistics_count_loads_and_name_unrouted_experts():
    stats = routing.RoutingStats(4)
    logits = torch.tensor([[3.0, 2.0, 0.0, -9.0], [3.0, 0.0, 2.0, -9.0], [0.0, 3.0, 2.0, -9.0]])
    weights = routing.route(logits, 2, True)
    stats.add(logits, weights, torch.ones(3, 4))
    s = stats.summary()
    assert s["tokens_per_expert"] == [2, 2, 2, 0] and s["unrouted"] == [3]
    assert s["load"] == [round(2 / 3, 6)] * 3 + [0.0]
    assert stats.scores("frequency").tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 0])
    assert stats.scores("reap")[3] == 0 and stats.scores("gate_weight")[3] < 1e-4
    assert 0 < s["load_entropy"] < 1 and s["router_entropy"] > 0


# ---------------------------------------------------------------- moefy


def moefy_run(tiny_tok, tmp_path, arch: str, stage: dict, **model_kw) -> dict:
    src = tiny_tok(arch, **model_kw)
    return run(parse_recipe(tiny_recipe(tmp_path / arch, src, [{"method": "moefy", "data": "calib", **stage}])))


def logits_of(path: Path | str, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch, stage, expected", [
    ("llama", {"experts": 4, "top_k": 4}, "MixtralForCausalLM"),
    ("llama", {"experts": 2, "top_k": 2, "shared": 64, "split": "random"}, "Qwen2MoeForCausalLM"),
    ("qwen2", {"experts": 4, "top_k": 4, "shared": 128, "split": "cluster"}, "Qwen2MoeForCausalLM"),
    ("qwen3", {"experts": 8, "top_k": 8}, "Qwen3MoeForCausalLM"),
])
def test_moefy_with_every_expert_active_computes_the_dense_model(tiny_tok, tmp_path, arch, stage, expected):
    """top_k = E: the router is zero (each weight exactly 1/E), the experts carry the folded factor E and
    the shared expert the factor 2 of its zero gate: the reloaded MoE export's logits are the dense model's."""
    report = moefy_run(tiny_tok, tmp_path, arch, stage)
    out = Path(report["output"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [expected]
    routed = 256 - stage.get("shared", 0)
    width_key = "intermediate_size" if expected == "MixtralForCausalLM" else "moe_intermediate_size"
    assert config[width_key] == routed // stage["experts"] and config["num_experts_per_tok"] == stage["top_k"]
    if expected != "MixtralForCausalLM":
        assert config["norm_topk_prob"] is True and config["mlp_only_layers"] == []
    if stage.get("shared"):
        assert config["shared_expert_intermediate_size"] == stage["shared"]
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    dense, moe = logits_of(tiny_tok(arch), ids), logits_of(out, ids)
    assert (dense - moe).abs().max() < 1e-4 * dense.abs().max()
    assert report["plan"][-1]["params"] == report["size"]["after"]["params"]


def test_moefy_splits_into_equal_experts_with_a_router_per_layer(tiny_tok, tmp_path):
    report = moefy_run(tiny_tok, tmp_path, "llama", {"experts": 4, "top_k": 2})
    ckpt = Checkpoint(report["output"])
    shapes = ckpt.shapes()
    for i in range(4):
        assert shapes[f"model.layers.{i}.block_sparse_moe.gate.weight"] == (4, 128)
        for e in range(4):
            assert shapes[f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"] == (64, 128)
            assert shapes[f"model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"] == (128, 64)
    # every original channel sits in exactly one expert, scaled by top_k in the down projection
    src = Checkpoint(tiny_tok("llama"))
    gate = src.read(["model.layers.0.mlp.gate_proj.weight"])["model.layers.0.mlp.gate_proj.weight"]
    down = src.read(["model.layers.0.mlp.down_proj.weight"])["model.layers.0.mlp.down_proj.weight"]
    w = ckpt.read([f"model.layers.0.block_sparse_moe.experts.{e}.{p}.weight" for e in range(4) for p in ("w1", "w2")])
    rows = torch.cat([w[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)])
    order = [int(torch.nonzero((gate == r).all(dim=1)).squeeze()) for r in rows]
    assert sorted(order) == list(range(256))
    cols = torch.cat([w[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"] for e in range(4)], dim=1)
    assert torch.equal(cols, down[:, order] * 2)
    notes = report["stages"][0]["notes"]
    assert notes["architecture"] == "LlamaForCausalLM -> MixtralForCausalLM"
    flops = notes["active_ffn_flops_per_token"]
    assert flops["after"] == 2 * 4 * (3 * 128 * 64 * 2 + 128 * 4) and flops["before"] == 2 * 4 * 3 * 128 * 256
    load = notes["routing"]["layers"]["0"]
    assert sum(load["tokens_per_expert"]) == 2 * load["tokens"]
    assert (Path(report["output"]) / "plots" / "stage-0-moefy-expert-load.png").stat().st_size > 1000


def test_moefy_then_distill_trains_the_router_with_the_balance_term(tiny_tok, tmp_path):
    """The recovery stage after moefy: distill with the load-balancing term, which the curve records
    (1 for perfectly balanced routing), and the routers move away from what moefy fitted."""
    moefy = {"method": "moefy", "experts": 4, "top_k": 2, "data": "calib"}
    distill = {"method": "distill", "data": "train", "steps": 4, "batch_size": 4, "lr": 1e-3,  # MoE blocks: 1e-2
               "loss": {"logits": 1.0, "balance": 0.1}, "save_every": 4}
    fitted = run(parse_recipe(tiny_recipe(tmp_path / "moefy", tiny_tok("llama"), [moefy])))
    trained = run(parse_recipe(tiny_recipe(tmp_path / "trained", tiny_tok("llama"), [moefy, distill])))
    curve = trained["stages"][1]["notes"]["curve"]
    assert curve and all(0.9 < p["balance"] < 2.5 for p in curve)
    name = "model.layers.0.block_sparse_moe.gate.weight"
    before, after = Checkpoint(fitted["output"]).read([name])[name], Checkpoint(trained["output"]).read([name])[name]
    assert before.shape == after.shape == (4, 128) and not torch.equal(before, after)


@pytest.mark.parametrize("student, loss, applied", [
    ("moe", {"logits": 1.0}, {"loss.balance": 0.01, "moe_lr_scale": 10.0}),
    ("moe", {"logits": 1.0, "balance": 0}, {"moe_lr_scale": 10.0}),  # an explicit 0 switches the term off
    ("dense", {"logits": 1.0}, None),
])
def test_distill_fills_in_the_moe_defaults_for_moe_students_only(tiny_tok, tmp_path, student, loss, applied):
    """loss.balance and moe_lr_scale left out: an MoE student trains with the load-balancing term and its
    MoE blocks (routers, experts) at 10 x lr, which the notes list; a dense student trains as before (no
    balance term, every weight at lr); a value the recipe gives is kept."""
    moefy = [{"method": "moefy", "experts": 4, "top_k": 2, "data": "calib"}] if student == "moe" else []
    distill = {"method": "distill", "data": "train", "steps": 2, "batch_size": 2, "lr": 1e-4, "schedule": "constant",
               "loss": loss, "save_every": 2}
    notes = run(parse_recipe(tiny_recipe(tmp_path, tiny_tok("llama"), [*moefy, distill])))["stages"][-1]["notes"]
    assert notes.get("moe_defaults") == applied
    balance = 0.01 if applied and "loss.balance" in applied else 0.0
    assert notes["loss_weights"]["balance"] == balance
    for point in notes["curve"]:
        assert ("balance" in point) == bool(balance)
        assert point["lr"] == 1e-4
        assert point.get("lr_moe") == (pytest.approx(1e-3) if student == "moe" else None)
    assert notes.get("moe_lr") == (pytest.approx(1e-3) if student == "moe" else None)


# ---------------------------------------------------------------- prune_experts


def plant_dead_experts(src: Path, dst: Path, dead: list[int]) -> Path:
    """A copy of an MoE model whose router never picks experts `dead`: coordinate 0 of every token's
    embedding is 10, which keeps that coordinate of every hidden state large and positive, and the dead
    experts' router rows are -5 there and 0 elsewhere (logits near -50; the live ones are a few units)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.gate.weight[dead] = 0.0
                layer.mlp.gate.weight[dead, 0] = -5.0
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("arch, criterion", [("mixtral", "frequency"), ("mixtral", "gate_weight"),
                                             ("mixtral", "reap"), ("qwen2_moe", "reap"), ("qwen3_moe", "frequency")])
def test_prune_experts_removes_planted_dead_experts(tiny_tok, tmp_path, arch, criterion):
    """Experts 1 and 3 are never routed to: every data criterion removes them, the config and router
    shrink to 2 experts, and the pruned model computes the same logits (never-chosen experts with ~0
    router probability changed nothing, normalised top-k weights or not)."""
    src = plant_dead_experts(tiny_tok(arch), tmp_path / "planted", [1, 3])
    stages = [{"method": "prune_experts", "keep": 2, "criterion": criterion, "data": "calib"}]
    report = run(parse_recipe(tiny_recipe(tmp_path / "run", src, stages)))
    notes = report["stages"][0]["notes"]
    moe_layers = [i for i, d in notes["layers"].items() if d]
    assert moe_layers and all(notes["layers"][i]["kept"] == [0, 2] for i in moe_layers)
    assert all(notes["routing"]["unrouted_experts"][i] == [1, 3] for i in moe_layers)
    config = json.loads((Path(report["output"]) / "config.json").read_text())
    assert config.get("num_local_experts", config.get("num_experts")) == 2
    assert config["num_experts_per_tok"] == 2
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    shapes = Checkpoint(report["output"]).shapes()
    assert shapes[f"model.layers.{moe_layers[0]}.{block}.gate.weight"] == (2, 128)
    assert not any(".experts.2." in n for n in shapes)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits_of(src, ids), logits_of(report["output"], ids), atol=1e-4)


def test_random_expert_pruning_follows_the_seed(tiny_tok, tmp_path):
    stages = [{"method": "prune_experts", "ratio": 0.5, "criterion": "random"}]
    kept = []
    for seed in (0, 0, 1):
        text = tiny_recipe(tmp_path / f"s{seed}-{len(kept)}", tiny_tok("mixtral"), stages, seed=seed)
        notes = run(parse_recipe(text))["stages"][0]["notes"]
        kept.append([notes["layers"][str(i)]["kept"] for i in range(4)])
    assert kept[0] == kept[1] != kept[2]
    assert all(len(k) == 2 for k in kept[0])


# ---------------------------------------------------------------- set_topk


@pytest.mark.parametrize("arch, stage, expected_norm", [("mixtral", {"top_k": 1}, None),
                                                        ("qwen3_moe", {"top_k": 3, "norm_topk_prob": True}, True)])
def test_set_topk_rewrites_the_config_and_keeps_the_weights(tiny_tok, tmp_path, arch, stage, expected_norm):
    src = tiny_tok(arch)
    report = run(parse_recipe(tiny_recipe(tmp_path, src, [{"method": "set_topk", **stage}])))
    config = json.loads((Path(report["output"]) / "config.json").read_text())
    assert config["num_experts_per_tok"] == stage["top_k"]
    if expected_norm is not None:
        assert config["norm_topk_prob"] is expected_norm
    a, b = Checkpoint(src), Checkpoint(report["output"])
    assert sorted(a.names) == sorted(b.names)
    assert all(torch.equal(a.read([n])[n], b.read([n])[n]) for n in a.names)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("arch, stage, message", [
    ("llama", {"method": "moefy", "experts": 3, "top_k": 1, "data": "calib"},
     r"stages\[0\]\.experts: the FFN width 256 = 256 does not divide into 3 equal experts; divisors: 2, 4, 8"),
    ("llama", {"method": "moefy", "experts": 4, "top_k": 1, "shared": 98, "data": "calib"},
     r"stages\[0\]\.experts: the FFN width 256 less shared 98 = 158 does not divide into 4 equal experts"),
    ("qwen3", {"method": "moefy", "experts": 4, "top_k": 1, "shared": 64, "data": "calib"},
     r"stages\[0\]\.shared: Qwen3 models become Qwen3-MoE, which has no shared expert"),
    ("qwen2", {"method": "moefy", "experts": 4, "top_k": 1, "data": "calib"},
     r"stages\[0\]\.shared: a Qwen2 model becomes Qwen2-MoE.*give `shared` > 0"),
    ("mixtral", {"method": "moefy", "experts": 2, "top_k": 1, "data": "calib"},
     r"stages\[0\]\.experts: moefy turns dense models into MoE; this model is already 'mixtral'"),
    ("llama", {"method": "prune_experts", "keep": 2, "data": "calib"},
     r"stages\[0\]\.keep: prune_experts needs an MoE model .*this model is 'llama', which is dense"),
    ("mixtral", {"method": "prune_experts", "keep": 1, "data": "calib"},
     r"stages\[0\]\.keep: keeping 1 experts is below num_experts_per_tok \(2\).*lower top_k first with set_topk"),
    ("mixtral", {"method": "prune_experts", "keep": 4, "data": "calib"}, r"keeping 4 of 4 experts removes nothing"),
    ("llama", {"method": "set_topk", "top_k": 1}, r"stages\[0\]\.top_k: set_topk needs an MoE model"),
    ("mixtral", {"method": "set_topk", "top_k": 5}, r"stages\[0\]\.top_k: top_k 5 is more than the model's 4 experts"),
    ("mixtral", {"method": "set_topk", "top_k": 1, "norm_topk_prob": False},
     r"stages\[0\]\.norm_topk_prob: Mixtral always normalises its top-k weights"),
    ("llama", {"method": "distill", "data": "train", "steps": 2, "loss": {"logits": 1.0, "balance": 0.1}},
     r"stages\[0\]\.loss: loss.balance 0.1: the load-balancing term needs an MoE student .*this one is 'llama'"),
])
def test_impossible_moe_stages_are_refused_by_the_plan(tiny, tmp_path, arch, stage, message):
    recipe = parse_recipe(tiny_recipe(tmp_path, tiny(arch), [stage]))
    with pytest.raises(RecipeError, match=message):
        prepare(recipe, Workspace(recipe.spec.output))


@pytest.mark.parametrize("stage, message", [
    ({"method": "moefy", "experts": 4, "top_k": 5, "data": "calib"}, r"stages\[0\]: .*top_k 5 is more than experts 4"),
    ({"method": "moefy", "experts": 4, "top_k": 2}, r"stages\[0\]\.data: required field is missing"),
    ({"method": "prune_experts", "keep": 2}, r"criterion 'reap' measures routing on text: set 'data'"),
    ({"method": "prune_experts", "keep": 2, "ratio": 0.5, "criterion": "random"}, r"give exactly one of 'keep'"),
])
def test_bad_moe_parameters_get_one_clear_line(tiny, tmp_path, stage, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tiny_recipe(tmp_path, tiny("llama"), [stage]))


# ---------------------------------------------------------------- resume


def test_killed_moe_stages_resume_per_layer_and_end_byte_identical(tiny_tok, tmp_path):
    """dense -> moefy -> prune_experts -> set_topk, killed inside moefy (after layer 2) and inside
    prune_experts (after layer 3): each rerun restores the finished layers and the export is the same."""
    stages = [{"method": "moefy", "experts": 4, "top_k": 2, "data": "calib"},
              {"method": "prune_experts", "keep": 3, "criterion": "reap", "data": "calib"},
              {"method": "set_topk", "top_k": 1}]

    def recipe(name: str) -> Path:
        path = tmp_path / name / "recipe.yaml"
        text = tiny_recipe(tmp_path / name, tiny_tok("llama"), stages)
        path.write_text(text)
        return path

    rc, out = llmslim_run(recipe("uninterrupted"))
    assert rc == 0, out[-3000:]
    killed = recipe("killed")
    for point in ("moefy.layer:2", "prune_experts.layer:3"):
        rc, out = llmslim_run(killed, crash_at=point)
        assert rc == -signal.SIGKILL, f"{point} was not reached: {out[-3000:]}"
    rc, out = llmslim_run(killed)
    assert rc == 0, out[-3000:]
    report = json.loads((tmp_path / "killed" / "out" / "llmslim_report.json").read_text())
    assert report["stages"][0]["notes"]["layers_from_earlier_run"] == 2
    assert report["stages"][1]["notes"]["layers_from_earlier_run"] == 3
    assert export_differences(tmp_path / "uninterrupted" / "out", tmp_path / "killed" / "out") == []


# ---------------------------------------------------------------- vLLM


@pytest.mark.vllm
def test_moe_exports_serve_in_vllm_with_the_same_tokens(tiny_tok, tmp_path):
    """moefy (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE; and the bundled reference model, also
    followed by prune_experts and set_topk), prune_experts (Mixtral, Qwen2-MoE, Qwen3-MoE) and set_topk:
    each export, in vLLM on this CPU, gives transformers' greedy tokens."""
    runs = [
        ("reference", REFERENCE, [{"method": "moefy", "experts": 4, "top_k": 2, "data": "calib"}]),
        ("reference-chain", REFERENCE, [{"method": "moefy", "experts": 4, "top_k": 2, "data": "calib"},
                                        {"method": "prune_experts", "keep": 3, "data": "calib"},
                                        {"method": "set_topk", "top_k": 1}]),
        ("llama", tiny_tok("llama"), [{"method": "moefy", "experts": 4, "top_k": 2, "data": "calib"}]),
        ("llama-shared", tiny_tok("llama"),
         [{"method": "moefy", "experts": 4, "top_k": 1, "shared": 64, "data": "calib"}]),
        ("qwen3", tiny_tok("qwen3"), [{"method": "moefy", "experts": 8, "top_k": 2, "data": "calib"}]),
        ("mixtral", tiny_tok("mixtral"), [{"method": "prune_experts", "keep": 3, "data": "calib"},
                                          {"method": "set_topk", "top_k": 1}]),
        ("qwen2_moe", tiny_tok("qwen2_moe"), [{"method": "prune_experts", "keep": 3, "criterion": "frequency",
                                               "data": "calib"}]),
        ("qwen3_moe", tiny_tok("qwen3_moe"), [{"method": "prune_experts", "keep": 2, "criterion": "gate_weight",
                                               "data": "calib"}, {"method": "set_topk", "top_k": 1}]),
    ]
    dirs = [run(parse_recipe(tiny_recipe(tmp_path / name, src, stages)))["output"] for name, src, stages in runs]
    for (name, _, _), r in zip(runs, check_exports(dirs, "vllm")):
        assert r.passed and r.generated, f"{name}: {r.detail}"
        assert "agree on 4 x 32 greedy tokens" in r.detail, f"{name}: {r.detail}"

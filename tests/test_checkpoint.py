"""Adapters and checkpoints on every supported architecture: our layer-by-layer loader and shard writer
agree exactly with transformers, config rewrites give loadable models, and the plan's parameter count
is the real one."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, config_for
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

from llmslim.adapters import ARCHITECTURES, Adapter
from llmslim.checkpoint import Checkpoint, CheckpointWriter, LazyModel, save_model
from llmslim.errors import UserError
from llmslim.export import verify_shapes
from llmslim.plan import PlanState

VARIANTS = [(a, tied, gqa) for a in ARCHS for tied in (False, True) for gqa in (True, False)]


def test_every_supported_architecture_is_tested():
    assert sorted(config_for(a).model_type for a in ARCHS) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch,tied,gqa", VARIANTS, ids=[f"{a}-{'tied' if t else 'untied'}-{'gqa' if g else 'mha'}"
                                                          for a, t, g in VARIANTS])
def test_lazy_load_and_write_match_transformers(tiny, tmp_path, arch, tied, gqa):
    path = tiny(arch, tied=tied, gqa=gqa)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    lazy = LazyModel(Checkpoint(path), torch.float32)
    assert all(not lazy.is_materialized(i) for i in range(len(lazy.layers)))
    lazy.materialize(1)
    assert lazy.is_materialized(1) and not lazy.is_materialized(0)
    lazy.release(1)
    assert not lazy.is_materialized(1)
    model = lazy.materialize_all()
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(ref(x).logits, model(x).logits)
    # our writer produces exactly the tensors transformers wrote, in small shards
    save_model(model, lazy.adapter, tmp_path / "out", max_shard_bytes=200_000)
    ours, theirs = Checkpoint(tmp_path / "out"), Checkpoint(path)
    assert sorted(ours.names) == sorted(theirs.names)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    a, b = ours.read(ours.names), theirs.read(theirs.names)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert verify_shapes(tmp_path / "out") == len(a)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_rewrites_load_and_plan_counts_parameters(tiny, tmp_path, arch):
    src = Checkpoint(tiny(arch))
    adapter = src.adapter
    keep = [0, 2, 3]
    config = adapter.with_layers(src.config, keep)
    assert config.num_hidden_layers == 3
    if adapter.is_moe:  # every kept layer keeps its kind (sparse or dense)
        assert [adapter.is_moe_layer(config, j) for j in range(3)] == [adapter.is_moe_layer(src.config, i) for i in keep]
    model = AutoModelForCausalLM.from_config(config)
    params, nbytes = PlanState(config, adapter, torch.float32).size()
    assert params == sum(p.numel() for p in model.parameters())
    assert nbytes == 4 * params
    heads = adapter.with_heads(src.config, heads=2, kv_heads=1)
    assert adapter.shape(heads).heads == 2 and adapter.shape(heads).head_dim == adapter.shape(src.config).head_dim
    AutoModelForCausalLM.from_config(heads)  # builds
    ffn = adapter.with_ffn(src.config, width=128, expert_width=32, shared_width=64)
    shape = adapter.shape(ffn)
    assert shape.ffn == (32 if adapter.is_moe else 128)


def test_unsupported_architecture_lists_supported(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"architecture 'gpt2'.*not supported; supported: llama .*qwen3_moe"):
        Adapter.for_config(AutoConfig.from_pretrained(tmp_path), str(tmp_path))


def test_verify_shapes_catches_a_wrong_tensor(tiny, tmp_path):
    src = Checkpoint(tiny("llama"))
    tensors = src.read(src.names)
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :100].clone()
    writer = CheckpointWriter(tmp_path)
    writer.add(tensors)
    writer.close(src.config)
    with pytest.raises(UserError, match=r"down_proj.weight has shape \[128, 100\] but config.json implies \[128, 256\]"):
        verify_shapes(tmp_path)


def test_mismatched_weights_are_a_clear_error(tiny, tmp_path):
    src = Checkpoint(tiny("llama"))
    config = src.adapter.with_layers(src.config, [0, 1])  # config says 2 layers, weights hold 4
    writer = CheckpointWriter(tmp_path)
    writer.add(src.read([n for n in src.names if ".layers." not in n]))
    writer.close(src.adapter.with_heads(config, 2, 1))
    writer = None
    bad = Checkpoint(tmp_path)
    with pytest.raises(UserError, match="missing"):
        LazyModel(bad, torch.float32).materialize(0)

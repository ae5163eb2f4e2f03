"""Perplexity agrees with a hand computation and with the plain transformers loop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEV_TXT, STORIES, need
from tiny_models import build_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmslim.data import DataHub
from llmslim.perplexity import perplexity
from llmslim.recipe import DataSource


def test_matches_a_hand_computation_on_a_tiny_model():
    model = build_model("llama")
    torch.manual_seed(0)
    w = torch.randint(0, 512, (3, 10))
    total, count = 0.0, 0
    with torch.no_grad():
        for row in w:
            logits = model(input_ids=row[None]).logits[0]
            for t in range(1, 10):  # position t is predicted from tokens < t
                p = torch.softmax(logits[t - 1].double(), -1)[row[t]]
                total -= math.log(float(p))
                count += 1
    result = perplexity(model, w, batch_size=2)
    assert result.tokens == count == 27 and result.windows == 3
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-6)


def test_matches_plain_transformers_loop_on_stories260k():
    need(STORIES, DEV_TXT)
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    hub = DataHub({"dev": DataSource(path=str(DEV_TXT), seq_len=512, samples=40)}, tok, seed=0)
    w = hub.evaluation("dev")
    ours = perplexity(model, w).ppl
    with torch.no_grad():
        losses = [model(input_ids=x[None], labels=x[None]).loss.item() for x in w]
    reference = math.exp(sum(losses) / len(losses))
    assert abs(ours - reference) / reference < 1e-4
    assert 3.0 < ours < 8.0  # a trained model, not noise (whole file: ~4.74)

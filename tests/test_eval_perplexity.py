"""Perplexity for the eval harness: sliding-window (stride) logic on crafted streams, hand-computed values,
and agreement with the standard transformers computation on stories260K."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import DEV_TXT, STORIES, need
from tiny_models import build_model

from llmslim.perplexity import Span, perplexity, sliding_perplexity, sliding_spans


class Successor(torch.nn.Module):
    """A stub LM over V tokens that gives the successor (x + 1) % V probability 1/2 and every other token
    1/(2(V-1)); it records the windows it is fed."""

    def __init__(self, vocab: int = 8):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives next(parameters()) a device
        self.seen: list[list[int]] = []

    def forward(self, input_ids, use_cache=False):
        v = self.config.vocab_size
        self.seen += input_ids.tolist()
        probs = torch.full((*input_ids.shape, v), 0.5 / (v - 1), dtype=torch.float64)
        probs.scatter_(-1, ((input_ids + 1) % v)[..., None], 0.5)
        return SimpleNamespace(logits=probs.log().float())


def test_spans_on_a_crafted_stream():
    assert sliding_spans(10, 4, 2) == [Span(0, 4, 1), Span(2, 6, 4), Span(4, 8, 6), Span(6, 10, 8)]
    # stride == seq_len: non-overlapping windows; a window's first token has no context and is not scored
    assert sliding_spans(10, 4, 4) == [Span(0, 4, 1), Span(4, 8, 5), Span(8, 10, 9)]
    assert sliding_spans(3, 8, 2) == [Span(0, 3, 1)]
    assert sliding_spans(1, 8, 2) == [] and sliding_spans(0, 8, 2) == []
    with pytest.raises(ValueError, match="stride must be in 1..seq_len"):
        sliding_spans(10, 4, 5)


@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 4), (101, 16, 15), (64, 8, 1), (37, 37, 10), (50, 7, 3)])
def test_every_token_scored_once_with_enough_context(n, seq_len, stride):
    spans = sliding_spans(n, seq_len, stride)
    scored = [t for s in spans for t in range(s.score_from, s.end)]
    assert scored == list(range(1, n))  # each token after the first exactly once, in order
    for s in spans:
        assert s.end - s.begin <= seq_len and s.begin <= s.score_from
        if s.begin > 0:  # after the first window every scored token sees >= seq_len - stride tokens before it
            assert s.score_from - s.begin >= seq_len - stride


def test_sliding_perplexity_hand_computed_on_a_stub_model():
    model = Successor(vocab=8)
    stream = torch.arange(30) % 8  # every token is its predecessor's successor: probability 1/2 each
    stream[17] = 0  # ... except this one (probability 1/14), and 18, whose predecessor changed (1/14)
    result = sliding_perplexity(model, stream, seq_len=8, stride=3, batch_size=2)
    expected_nll = (27 * math.log(2) + 2 * math.log(14)) / 29
    assert result.tokens == 29 and result.nll == pytest.approx(expected_nll, rel=1e-6)  # float32 logits
    assert result.ppl == pytest.approx(math.exp(expected_nll), rel=1e-6)
    # the model saw exactly the planned windows (full-length ones batched first, then the short tail)
    spans = sliding_spans(30, 8, 3)
    assert sorted(model.seen) == sorted(stream[s.begin: s.end].tolist() for s in spans)
    assert result.windows == len(spans)


def test_stride_equal_to_seq_len_matches_the_non_overlapping_function():
    model = build_model("llama")
    torch.manual_seed(0)
    stream = torch.randint(0, 512, (5 * 12,))
    ours = sliding_perplexity(model, stream, seq_len=12, stride=12)
    reference = perplexity(model, stream.view(5, 12))
    assert ours.tokens == reference.tokens == 5 * 11
    assert ours.ppl == pytest.approx(reference.ppl, rel=1e-6)


def test_sliding_perplexity_matches_a_hand_loop_on_a_tiny_model():
    model = build_model("llama")
    torch.manual_seed(1)
    stream = torch.randint(0, 512, (23,))
    total, count = 0.0, 0
    with torch.no_grad():
        for s in sliding_spans(23, 10, 4):
            logits = model(input_ids=stream[None, s.begin: s.end]).logits[0].double()
            for t in range(s.score_from, s.end):  # stream position t, predicted at window index t-begin-1
                total -= float(torch.log_softmax(logits[t - s.begin - 1], -1)[stream[t]])
                count += 1
    result = sliding_perplexity(model, stream, seq_len=10, stride=4, batch_size=3)
    assert result.tokens == count == 22
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-6)


def _standard_stride_loop(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """Hugging Face's "perplexity of fixed-length models" loop (token-weighted), as its docs give it."""
    nll_sum, n_tokens, prev_end, n = 0.0, 0, 0, ids.numel()
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + max_length, n)
            trg_len = end - prev_end
            input_ids = ids[begin:end][None]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            loss = model(input_ids, labels=target_ids).loss
            valid = int((target_ids[:, 1:] != -100).sum())  # labels shift left by one inside the model
            nll_sum += float(loss) * valid
            n_tokens += valid
            prev_end = end
            if end == n:
                break
    return math.exp(nll_sum / n_tokens)


def test_eval_harness_agrees_with_the_standard_computation_on_stories260k(tmp_path):
    need(STORIES, DEV_TXT)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmslim.evaluate.harness import EvalRequest, run_eval

    text = DEV_TXT.read_text()[:60_000]
    (tmp_path / "part.txt").write_text(text)
    report = run_eval(EvalRequest(models=[str(STORIES)], out=tmp_path / "out", ppl=[str(tmp_path / "part.txt")],
                                  seq_len=2048, stride=256))  # 2048 is capped at the model's 512 context
    ours = report["models"][0]["perplexity"][str(tmp_path / "part.txt")]
    assert ours["seq_len"] == 512 and ours["stride"] == 256
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ids = torch.tensor(tok(text)["input_ids"])
    assert ids[0] == tok.bos_token_id  # the llama tokenizer's own BOS, once at the start of the stream
    reference = _standard_stride_loop(model, ids, 512, 256)
    assert abs(ours["ppl"] - reference) / reference < 1e-4
    assert ours["tokens"] == ids.numel() - 1
    assert 3.0 < ours["ppl"] < 8.0

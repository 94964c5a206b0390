"""Search invariants: beam 1 == greedy, batch == one by one, limits, n-best order."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqtool.config import ModelConfig
from seqtool.data import make_batch
from seqtool.search import beam_search, greedy, length_penalty

MODELS = {}


def model_for(cell, context):
    if (cell, context) not in MODELS:
        torch.manual_seed(len(MODELS) + 1)
        cfg = ModelConfig(cell=cell, context=context, embedding_size=16, encoder_hidden_size=16, hidden_size=32, dropout=0.0)
        model = MODELS[(cell, context)] = __import__("seqtool.model.seq2seq", fromlist=["x"]).build_model(cfg, 40, 40).eval()
        # Sharpen the output layer so the untrained model has clear preferences (fewer near-ties).
        with torch.no_grad():
            model.output.weight.mul_(4)
    return MODELS[(cell, context)]


sources = st.lists(st.lists(st.integers(4, 39), min_size=1, max_size=12), min_size=1, max_size=6)
models = st.sampled_from([("gru", "attention"), ("lstm", "init"), ("rnn", "every_step")])


@settings(max_examples=40, deadline=None)
@given(sources, models)
def test_beam_one_equals_greedy(srcs, which):
    model = model_for(*which)
    b = make_batch(srcs, [[4]] * len(srcs))
    g = greedy(model, b.src, b.src_lens, 1.5, 4)
    bs = beam_search(model, b.src, b.src_lens, 1, 1.5, 4, alpha=0.0)
    assert [h[0].tokens for h in g] == [h[0].tokens for h in bs]
    for x, y in zip(g, bs):
        assert x[0].score == pytest.approx(y[0].score, abs=1e-4)


@settings(max_examples=25, deadline=None)
@given(sources, models, st.integers(2, 5))
def test_batch_equals_one_by_one(srcs, which, k):
    model = model_for(*which)
    b = make_batch(srcs, [[4]] * len(srcs))
    together = beam_search(model, b.src, b.src_lens, k, 1.5, 4, alpha=1.0, nbest=k)
    for src, hyps in zip(srcs, together):
        one = make_batch([src], [[4]])
        alone = beam_search(model, one.src, one.src_lens, k, 1.5, 4, alpha=1.0, nbest=k)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]


@settings(max_examples=25, deadline=None)
@given(sources, st.integers(1, 6), st.floats(0.0, 2.0))
def test_nbest_sorted_and_within_length_limit(srcs, k, alpha):
    model = model_for("gru", "attention")
    b = make_batch(srcs, [[4]] * len(srcs))
    results = beam_search(model, b.src, b.src_lens, k, 1.0, 2, alpha=alpha, nbest=k)
    for src, hyps in zip(srcs, results):
        assert 1 <= len(hyps) <= k
        assert all(len(h.tokens) <= len(src) + 2 for h in hyps)
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert all(3 not in h.tokens and 2 not in h.tokens for h in hyps)  # no EOS / BOS inside


def test_length_penalty_values():
    assert length_penalty(1, 0.0) == 1.0
    assert length_penalty(7, 1.0) == pytest.approx(2.0)

"""Search invariants: beam 1 == greedy, batch == one by one, limits, n-best order, constraints."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqtool.config import DecodingConfig, ModelConfig
from seqtool.constraints import LineSpec, Vocab, make_rules
from seqtool.data import make_batch
from seqtool.model.seq2seq import build_model
from seqtool.search import beam_search, greedy, length_penalty
from seqtool.tokenizer import BOS, EOS, PAD, UNK

V = 40
MODELS = {}


def model_for(cell, context, copy=False, attention="bahdanau"):
    key = (cell, context, copy, attention)
    if key not in MODELS:
        torch.manual_seed(len(MODELS) + 1)
        cfg = ModelConfig(cell=cell, context=context, embedding_size=16, encoder_hidden_size=16, hidden_size=32,
                          dropout=0.0, copy_source=copy, attention=attention, input_feeding=attention != "bahdanau")
        model = MODELS[key] = build_model(cfg, V, V).eval()
        with torch.no_grad():  # sharpen the output layer: clear preferences, fewer near-ties
            model.output.weight.mul_(4)
    return MODELS[key]


def rules_for(srcs, forced=None, free_banned=(), banned=(), prefix=None, include=None, avoid=None, space=None,
              glue=(), mirror=None, echo=None, tones=None, vocab_tones=(), **decoding):
    """The rules of a batch: `forced` (exact length, -1 = free), `prefix`, `include`, `avoid`, `mirror`, `echo`,
    `tones`: one entry per source; the rest are decoding keys (max_len_a 1.5, max_len_b 4 unless given)."""
    d = DecodingConfig(**{"max_len_a": 1.5, "max_len_b": 4, **decoding})
    n = len(srcs)
    specs = [LineSpec(len(s), tuple(forced[i]) if forced else None, tuple(prefix[i]) if prefix else (),
                      tuple(map(tuple, include[i])) if include else (), tuple(map(tuple, avoid[i])) if avoid else (),
                      *(tuple(x[i]) if x else None for x in (mirror, echo, tones)))
             for i, s in zip(range(n), srcs)]
    return make_rules(specs, d, Vocab(V, tuple(banned), tuple(free_banned), tuple(glue), tuple(vocab_tones)), space)


def run(search, srcs, which=("gru", "attention"), **rule_args):
    model = model_for(*which)
    b = make_batch(srcs, [[4]] * len(srcs))
    return search(model, b.src, b.src_lens, rules_for(srcs, **rule_args))


sources = st.lists(st.lists(st.integers(4, V - 1), min_size=1, max_size=12), min_size=1, max_size=6)
models = st.sampled_from([("gru", "attention"), ("lstm", "init"), ("rnn", "every_step"), ("lstm", "attention", True),
                          ("gru", "attention", False, "luong_general")])


@settings(max_examples=40, deadline=None)
@given(sources, models, st.integers(0, 3))
def test_beam_one_equals_greedy(srcs, which, ngram):
    g = run(lambda m, s, lens, r: greedy(m, s, lens, r), srcs, which, no_repeat_ngram=ngram)
    bs = run(lambda m, s, lens, r: beam_search(m, s, lens, r, 1, alpha=0.0), srcs, which, no_repeat_ngram=ngram)
    assert [h[0].tokens for h in g] == [h[0].tokens for h in bs]
    for x, y in zip(g, bs):
        assert x[0].score == pytest.approx(y[0].score, abs=1e-4)


@settings(max_examples=25, deadline=None)
@given(sources, models, st.integers(2, 5))
def test_batch_equals_one_by_one(srcs, which, k):
    def search(m, s, lens, r):
        return beam_search(m, s, lens, r, k, alpha=1.0, nbest=k)
    together = run(search, srcs, which)
    for src, hyps in zip(srcs, together):
        assert [h.tokens for h in hyps] == [h.tokens for h in run(search, [src], which)[0]]


@settings(max_examples=25, deadline=None)
@given(sources, st.integers(1, 6), st.floats(0.0, 2.0), st.floats(0.0, 1.0))
def test_nbest_sorted_within_limits_and_no_specials(srcs, k, alpha, beta):
    results = run(lambda m, s, lens, r: beam_search(m, s, lens, r, k, alpha=alpha, nbest=k, coverage_penalty=beta),
                  srcs, max_len_a=1.0, max_len_b=2, min_len=2)
    for src, hyps in zip(srcs, results):
        assert 1 <= len(hyps) <= k
        assert all(2 <= len(h.tokens) <= len(src) + 2 for h in hyps)
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert all(not {PAD, BOS, EOS, UNK} & set(h.tokens) for h in hyps)


@settings(max_examples=30, deadline=None)
@given(sources, st.integers(1, 5), st.integers(1, 3))
def test_no_repeated_ngrams(srcs, k, n):
    for hyps in run(lambda m, s, lens, r: beam_search(m, s, lens, r, k, nbest=k), srcs, no_repeat_ngram=n,
                    max_len_b=20):
        for h in hyps:
            grams = [tuple(h.tokens[i:i + n]) for i in range(len(h.tokens) - n + 1)]
            assert len(grams) == len(set(grams))


PUNCT = [5, 6]  # stand-ins for '，' and '。'


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(5, V - 1), min_size=1, max_size=14), min_size=1, max_size=5),
       st.integers(1, 5), models)
def test_exact_length_and_punctuation_positions_for_any_input(srcs, k, which):
    forced = [[tok if tok in PUNCT else -1 for tok in s] for s in srcs]
    for search in (lambda m, s, lens, r: greedy(m, s, lens, r),
                   lambda m, s, lens, r: beam_search(m, s, lens, r, k, nbest=k)):
        for src, hyps in zip(srcs, run(search, srcs, which, forced=forced, free_banned=PUNCT)):
            assert hyps
            for h in hyps:
                assert len(h.tokens) == len(src)
                assert [i for i, t in enumerate(h.tokens) if t in PUNCT] == [i for i, t in enumerate(src) if t in PUNCT]
                assert all(h.tokens[i] == src[i] for i, t in enumerate(src) if t in PUNCT)


def test_length_penalty_values():
    assert length_penalty(1, 0.0) == 1.0
    assert length_penalty(7, 1.0) == pytest.approx(2.0)


def test_absolute_max_len():
    for hyps in run(lambda m, s, lens, r: beam_search(m, s, lens, r, 3), [[7] * 30], max_len=5, min_len=100):
        assert all(len(h.tokens) == 5 for h in hyps)


@settings(max_examples=20, deadline=None)
@given(sources, st.floats(0.5, 2.0))
def test_sampling_top_k_one_is_greedy_and_seeded_sampling_repeats(srcs, temperature):
    from seqtool.search import sampler

    g = run(lambda m, s, lens, r: greedy(m, s, lens, r), srcs)
    k1 = run(lambda m, s, lens, r: greedy(m, s, lens, r, pick=sampler(temperature, top_k=1)), srcs)
    assert [h[0].tokens for h in g] == [h[0].tokens for h in k1]
    def draw(seed):
        return run(lambda m, s, lens, r: greedy(m, s, lens, r, pick=sampler(temperature, top_p=0.9, seed=seed)),
                   srcs)
    assert [h[0].tokens for h in draw(3)] == [h[0].tokens for h in draw(3)]


def test_top_p_keeps_the_smallest_head_reaching_p():
    """Token 0 alone holds exactly half the mass: top-p 0.5 draws only it; a hair more needs token 1 too."""
    from seqtool.search import sampler

    lp = torch.tensor([[0.5, 0.25, 0.25]]).log().repeat(400, 1)
    assert set(sampler(top_p=0.5, seed=0)(lp)[1].tolist()) == {0}
    assert set(sampler(top_p=0.51, seed=0)(lp)[1].tolist()) == {0, 1}
    for tiny in ({"temperature": 1e-300}, {"top_p": 1e-300}):  # fp32 zero: the best token, not NaN probabilities
        assert set(sampler(**tiny, seed=0)(lp)[1].tolist()) == {0}


def test_sampling_explores():
    from seqtool.search import sampler

    outs = {tuple(run(lambda m, s, lens, r, seed=seed: greedy(m, s, lens, r, pick=sampler(5.0, seed=seed)),
                      [[7, 8, 9]])[0][0].tokens)
            for seed in range(10)}
    assert len(outs) > 1


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_rules_that_allow_no_ending_give_the_best_unfinished_hypothesis(search):
    """Only tokens 4 and 5 allowed, never twice in a row nor alternating three times, and EOS banned before
    5 tokens: after two steps nothing is allowed. The search returns the best unfinished hypothesis (never nothing,
    never a banned token)."""
    from seqtool.search import sampler

    fn = {"greedy": lambda m, s, lens, r: greedy(m, s, lens, r),
          "beam": lambda m, s, lens, r: beam_search(m, s, lens, r, 3, nbest=3),
          "sample": lambda m, s, lens, r: greedy(m, s, lens, r, pick=sampler(seed=1))}[search]
    avoid = [[(4, 4), (5, 5), (4, 5, 4), (5, 4, 5)]] * 2
    results = run(fn, [[7, 8, 9], [10, 11]], avoid=avoid, min_len=5, banned=list(range(6, V)))
    for hyps in results:
        assert len(hyps) == 1 and sorted(hyps[0].tokens) == [4, 5] and not hyps[0].complete
        assert hyps[0].score > float("-inf")


def test_greedy_scores_as_beam_one_does_finished_or_stuck():
    """Greedy and beam 1 find the same hypothesis and must give it the same length-penalised score, also when the
    rules leave it unfinished."""
    srcs = [[7, 8, 9], [10, 11], [12, 13, 14, 15]]
    for stuck in (False, True):
        rule_args = dict(avoid=[[(4, 4), (5, 5), (4, 5, 4), (5, 4, 5)]] * 3, min_len=5,
                         banned=list(range(6, V))) if stuck else {}
        g = run(lambda m, s, lens, r: greedy(m, s, lens, r, alpha=1.0), srcs, **rule_args)
        b = run(lambda m, s, lens, r: beam_search(m, s, lens, r, 1, alpha=1.0), srcs, **rule_args)
        assert [(h[0].tokens, h[0].complete) for h in g] == [(h[0].tokens, h[0].complete) for h in b]
        assert [h[0].score for h in g] == pytest.approx([h[0].score for h in b], rel=1e-5)

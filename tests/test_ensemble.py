"""Ensembles: the members' mean log-probabilities at every step, in every search; through the CLI."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SAMPLE, bleu_per_flags, run_cli, tiny_config, write_config
from seqtool.checkpoint import load_model
from seqtool.data import make_batch
from seqtool.ensemble import Ensemble
from seqtool.search import argmax, beam_search, greedy, sampler
from test_cli_errors import assert_one_line_error
from test_search import model_for, models, rules_for, sources


def _decode(model, srcs, beam, pick=argmax, **rules):
    b = make_batch(srcs, [[4]] * len(srcs))
    r = rules_for(srcs, **rules)
    if beam == 1:
        return greedy(model, b.src, b.src_lens, r, pick=pick)
    return beam_search(model, b.src, b.src_lens, r, beam, nbest=beam, coverage_penalty=0.2)


@settings(max_examples=25, deadline=None)
@given(sources, models, st.integers(1, 3))
def test_an_ensemble_of_copies_decodes_as_the_model_alone(srcs, which, beam):
    model = model_for(*which)
    alone, twice = _decode(model, srcs, beam), _decode(Ensemble([model, model]), srcs, beam)
    for a, b in zip(alone, twice):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_each_step_is_the_renormalised_mean_of_the_members_log_probabilities():
    a, b = model_for("gru", "attention"), model_for("lstm", "init")
    batch = make_batch([[5, 6, 7], [8, 9]], [[4], [4]])
    ensemble = Ensemble([a, b])
    state = ensemble.encode(batch.src, batch.src_lens)
    prev = torch.tensor([2, 2])
    lp, _, weights = ensemble.step(prev, state)
    lp_a = a.step(prev, a.encode(batch.src, batch.src_lens))[0]
    lp_b = b.step(prev, b.encode(batch.src, batch.src_lens))[0]
    torch.testing.assert_close(lp, torch.log_softmax((lp_a + lp_b) / 2, dim=-1))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2))
    assert weights is None  # one member does not attend: no weights to average


@settings(max_examples=20, deadline=None)
@given(sources, st.integers(1, 3), st.integers(0, 2))
def test_constraints_and_sampling_hold_for_an_ensemble(srcs, beam, ngram):
    ensemble = Ensemble([model_for("gru", "attention"), model_for("rnn", "every_step")])
    prefix = [[7, 8]] * len(srcs)
    for hyps in _decode(ensemble, srcs, beam, prefix=prefix, no_repeat_ngram=ngram):
        assert all(h.tokens[:2] == [7, 8] for h in hyps)
    drawn = [_decode(ensemble, srcs, 1, pick=sampler(seed=3)) for _ in range(2)]
    assert [h[0].tokens for h in drawn[0]] == [h[0].tokens for h in drawn[1]]  # seeded: the same draws


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """The sample model of conftest's trained_model again with another seed: the same tokenizers."""
    from conftest import LEARNS

    work = tmp_path_factory.mktemp("second")
    cfg = tiny_config(work / "model", model=LEARNS["model"], training={**LEARNS["training"], "seed": 7})
    run_cli("train", "-c", str(write_config(work / "c.yaml", cfg)), "-q", check=True)
    return work / "model"


def test_translate_with_an_ensemble_from_the_cli(trained_model, second_model, tmp_path):
    a, b = load_model(trained_model), load_model(second_model)
    assert a.tgt_tok.model_bytes == b.tgt_tok.model_bytes  # another seed, the same data: the same tokenizer
    flags = [["-m", str(second_model)], ["-m", str(second_model), "--beam", "1"],
             ["-m", str(second_model), "--set", "decoding.sample=true", "--set", "decoding.temperature=0.5"],
             ["-m", str(second_model), "--shortlist", "0"], ["-m", str(second_model), "--quantize"]]
    bleus = bleu_per_flags(trained_model, tmp_path, flags)
    # Two models that each learned the task (test BLEU 100 alone): so does their ensemble, in every search.
    assert all(bleu >= 99 for bleu in bleus.values()), bleus
    same = run_cli("translate", "-m", str(trained_model), "-m", str(trained_model), str(SAMPLE / "test.src"),
                   "--format", "json", check=True).stdout
    alone = run_cli("translate", "-m", str(trained_model), str(SAMPLE / "test.src"), "--format", "json",
                    check=True).stdout
    assert same == alone  # a model with itself: the same outputs, the same scores (as rounded)


def test_an_ensemble_of_models_with_other_tokenizers_is_one_line(trained_model, tmp_path):
    cfg = tiny_config(tmp_path / "other", tokenizer={"vocab_size": 500}, training={"max_steps": 5, "valid_every": 5})
    run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), "-q", check=True)
    proc = run_cli("translate", "-m", str(trained_model), "-m", str(tmp_path / "other"), input="a\n")
    assert_one_line_error(proc, "its tokenizers differ")
    proc = run_cli("translate", "-m", str(trained_model), "-m", str(trained_model), "--format", "json",
                   "--attention", input="a\n")
    assert_one_line_error(proc, "an ensemble has none")

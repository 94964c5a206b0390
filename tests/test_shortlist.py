"""Vocabulary shortlist: the lexical table, batch vocabularies, searches over them, model files and the CLI."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import bleu_per_flags, run_cli
from seqtool.checkpoint import load_model, save_model
from seqtool.data import make_batch
from seqtool.device import int8_dynamic
from seqtool.errors import ModelFileError
from seqtool.search import beam_search, greedy
from seqtool.shortlist import BatchVocab, OutputRows, Shortlist, Shortlisted, build_shortlist
from seqtool.tokenizer import BOS, EOS
from test_cli_errors import assert_one_line_error
from test_search import V, model_for, rules_for, sources

PAIRS = [([10, 11], [20, 21]), ([10], [20]), ([11, 12], [21, 22]), ([10, 12], [20, 22, 22])]


def test_table_ranks_targets_by_dice_and_frequent_by_count():
    # Sentence counts: sources 10:3 11:2 12:2, targets 20:3 21:2 22:2; Dice 2 c(s,t) / (c(s) + c(t)):
    # 10 -> 20: 1, 21: .4, 22: .4 (ties keep id order); 11 -> 21: 1, 22: .5, 20: .4; 12 -> 22: 1, 21: .5, 20: .4
    sl = build_shortlist(iter(PAIRS), 15, 25, size=2)
    assert sl.table.shape == (15, 2)
    assert sl.table[10].tolist() == [20, 21] and sl.table[11].tolist() == [21, 22] and sl.table[12].tolist() == [22, 21]
    assert (sl.table[:10] == -1).all() and (sl.table[13:] == -1).all()
    assert sl.frequent.tolist() == [20, 22, 21]  # token counts 3, 3, 2
    assert sl.fits(15, 25) and not sl.fits(16, 25) and not sl.fits(15, 22)


def _held(rows: torch.Tensor) -> list[list[int]]:
    return [r.nonzero().squeeze(1).tolist() for r in rows]


def test_each_sentence_has_its_own_list_with_the_special_ids():
    sl = build_shortlist(iter(PAIRS), 15, 25, size=3)
    # specials 0..3, the most frequent target (20), each source token's best association, its own forced ids
    rows = sl.rows([[10], [12, 12]], per_token=1, frequent=1, with_sources=False, forced=[[24], []], tgt_vocab=25)
    assert rows.shape == (2, 25) and _held(rows) == [[0, 1, 2, 3, 20, 24], [0, 1, 2, 3, 20, 22]]
    with_sources = sl.rows([[10], [12, 12]], per_token=1, frequent=1, with_sources=True, forced=[[24], []],
                           tgt_vocab=25)
    assert _held(with_sources) == [[0, 1, 2, 3, 10, 20, 24], [0, 1, 2, 3, 12, 20, 22]]
    assert _held(sl.rows([[10], [11]], per_token=2, frequent=0, with_sources=False, forced=[[], []], tgt_vocab=25)
                 ) == [[0, 1, 2, 3, 20, 21], [0, 1, 2, 3, 21, 22]]
    assert rows.any(0).nonzero().squeeze(1)[EOS] == EOS  # in the union, the specials keep their ids as positions


def test_restricted_output_layer_gives_the_same_scores_as_the_full_layer_in_fp32_and_in_int8():
    torch.manual_seed(0)
    layer, x, ids = torch.nn.Linear(16, 50), torch.randn(7, 16), torch.tensor([0, 3, 8, 9, 30, 49])
    torch.testing.assert_close(OutputRows.of(layer).restricted(ids)(x), layer(x)[:, ids])
    q = int8_dynamic(layer)
    small_q = OutputRows.of(q).restricted(ids)
    weight, _ = torch.ops.quantized.linear_unpack(small_q.keywords["W_prepack"])  # what it multiplies by
    assert weight.dtype == torch.qint8  # int8 stays int8, not float
    torch.testing.assert_close(weight.int_repr(), q.weight().int_repr()[ids])  # the same int8 rows
    torch.testing.assert_close(small_q(x), q(x)[:, ids])
    torch.testing.assert_close(small_q(x), layer(x)[:, ids], atol=0.05, rtol=0.05)


def _search(which, srcs, vocab_ids, beam, allowed=None, **rule_args):
    model = model_for(*which)
    b = make_batch(srcs, [[4]] * len(srcs))
    rules = rules_for(srcs, space=vocab_ids, **rule_args)
    if vocab_ids is None:
        return greedy(model, b.src, b.src_lens, rules) if beam == 1 else beam_search(
            model, b.src, b.src_lens, rules, beam, nbest=beam)
    vocab = BatchVocab(vocab_ids, OutputRows.of(model.output).restricted(vocab_ids), allowed)
    listed = Shortlisted(model, vocab)
    if beam == 1:
        return vocab.mapped(greedy(listed, b.src, b.src_lens, rules))
    return vocab.mapped(beam_search(listed, b.src, b.src_lens, rules, beam, nbest=beam))


models = st.sampled_from([("gru", "attention"), ("lstm", "init"), ("rnn", "every_step"), ("lstm", "attention", True)])
subsets = st.sets(st.integers(EOS + 1, V - 1), min_size=1, max_size=V - EOS - 1)


@settings(max_examples=25, deadline=None)
@given(sources, models, st.integers(1, 4))
def test_a_shortlist_of_the_whole_vocabulary_changes_nothing(srcs, which, beam):
    full = _search(which, srcs, None, beam)
    listed = _search(which, srcs, torch.arange(V), beam)
    assert [[h.tokens for h in hyps] for hyps in full] == [[h.tokens for h in hyps] for hyps in listed]


@settings(max_examples=30, deadline=None)
@given(sources, models, subsets)
def test_greedy_over_a_shortlist_is_greedy_with_every_other_token_banned(srcs, which, subset):
    ids = torch.tensor(sorted({0, 1, 2, 3} | subset | ({t for s in srcs for t in s} if len(which) == 3 else set())))
    listed = _search(which, srcs, ids, beam=1)
    for hyps in listed:
        assert set(hyps[0].tokens) <= set(ids.tolist())
    if len(which) == 2:  # without copying, the argmax over the kept tokens is the argmax of the masked full scores
        model = model_for(*which)
        b = make_batch(srcs, [[4]] * len(srcs))
        rules = rules_for(srcs, banned=(~torch.isin(torch.arange(V), ids)).nonzero().flatten().tolist())
        banned = greedy(model, b.src, b.src_lens, rules)
        assert [h[0].tokens for h in listed] == [h[0].tokens for h in banned]


@settings(max_examples=30, deadline=None)
@given(sources, models, st.lists(subsets, min_size=4, max_size=4), st.integers(1, 4))
def test_each_line_over_its_own_list_decodes_as_it_would_alone(srcs, which, own, beam):
    """Every row is restricted to its own sentence's list, and normalised over it: the batch's other lines
    (and so the union of the lists) change nothing."""
    copying = len(which) == 3  # a copy model's list holds its own source's tokens (translate: with_sources)
    lists = [torch.tensor(sorted({0, 1, 2, 3} | own[i % 4] | (set(src) if copying else set())))
             for i, src in enumerate(srcs)]
    union = torch.unique(torch.cat(lists))
    allowed = torch.stack([torch.isin(union, ids) for ids in lists])
    together = _search(which, srcs, union, beam, allowed)
    for src, ids, hyps in zip(srcs, lists, together):
        alone = _search(which, [src], ids, beam)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-4)
        assert all(set(h.tokens) <= set(ids.tolist()) for h in hyps)


@pytest.mark.parametrize("which", [("gru", "attention"), ("lstm", "attention", True)])
def test_a_step_scores_each_row_over_its_own_list_and_nothing_outside(which):
    """The step under the searches: outside a sentence's list a score is -inf (a copy model's floor of
    log 1e-12 would let a beam fill with the other lines' tokens), inside it the scores of the line alone."""
    model = model_for(*which)
    srcs, lists = [[5], [21, 23, 30]], [torch.tensor([0, 1, 2, 3, 5]), torch.tensor([0, 1, 2, 3, 21, 23, 30])]
    union = torch.unique(torch.cat(lists))
    allowed = torch.stack([torch.isin(union, ids) for ids in lists])

    def first_step(srcs, ids, allowed=None):
        listed = Shortlisted(model, BatchVocab(ids, OutputRows.of(model.output).restricted(ids), allowed))
        b = make_batch(srcs, [[4]] * len(srcs))
        with torch.no_grad():
            return listed.step(b.src.new_full((len(srcs),), BOS), listed.encode(b.src, b.src_lens))[0]

    together = first_step(srcs, union, allowed)
    assert torch.isneginf(together[~allowed]).all()
    for row, (src, ids) in enumerate(zip(srcs, lists)):
        torch.testing.assert_close(together[row, allowed[row]], first_step([src], ids)[0])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(5, V - 1), min_size=1, max_size=10), min_size=1, max_size=4), subsets,
       st.integers(1, 4))
def test_forced_tokens_are_kept_and_placed_with_a_shortlist(srcs, subset, beam):
    punct = [5, 6]
    forced = [[t if t in punct else -1 for t in s] for s in srcs]
    sl = Shortlist(torch.full((V, 1), -1, dtype=torch.long), torch.tensor(sorted(subset)))
    rows = sl.rows(srcs, 1, len(subset), False, [[t for t in f if t >= 0] for f in forced], V)
    ids = rows.any(0).nonzero().squeeze(1)
    for src, hyps in zip(srcs, _search(("gru", "attention"), srcs, ids, beam, forced=forced, free_banned=punct)):
        for h in hyps:
            assert len(h.tokens) == len(src)
            assert [i for i, t in enumerate(h.tokens) if t in punct] == [i for i, t in enumerate(src) if t in punct]
            assert all(h.tokens[i] == src[i] for i, t in enumerate(src) if t in punct)


def test_model_file_keeps_the_table_and_refuses_a_foreign_one(trained_model, tmp_path):
    bundle = load_model(trained_model)
    assert bundle.shortlist is not None and bundle.shortlist.table.size(0) == bundle.src_tok.vocab_size
    bundle.shortlist = Shortlist(bundle.shortlist.table[:-1], bundle.shortlist.frequent)
    save_model(tmp_path / "bad.safetensors", bundle)
    with pytest.raises(ModelFileError, match="shortlist table does not match"):
        load_model(tmp_path / "bad.safetensors")


def test_shortlist_from_the_cli_keeps_lines_and_quality(trained_model, tmp_path):
    variants = [["--shortlist", "0"], ["--shortlist", "5"], ["--shortlist", "5", "--quantize", "--beam", "1"]]
    bleus = bleu_per_flags(trained_model, tmp_path, variants, n=200)
    full = bleus["--shortlist 0"]
    # Tenths of a point, as docs/performance.md measured on Multi30k (measured here: 100.0, 100.0, 99.8).
    assert full >= 95 and all(abs(b - full) <= 0.5 for b in bleus.values()), bleus


def test_a_model_without_a_table_refuses_shortlist_in_one_line(trained_model, tmp_path):
    bundle = load_model(trained_model)
    bundle.shortlist = None
    save_model(tmp_path / "old.safetensors", bundle)
    proc = run_cli("translate", "-m", str(tmp_path / "old.safetensors"), "--shortlist", "5", input="a b c\n")
    assert_one_line_error(proc, "no shortlist table")
    proc = run_cli("translate", "-m", str(tmp_path / "old.safetensors"), "--shortlist", "0", input="a b c\n",
                   check=True)
    assert proc.stdout.count("\n") == 1

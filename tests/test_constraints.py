"""Decoding constraints: prefixes, phrases to include and to avoid, with every search, model and rule."""

import json
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import SAMPLE, run_cli, tiny_config, write_config
from seqtool.config import DecodingConfig
from seqtool.constraints import START, Include, LineSpec, line_problem
from seqtool.data import make_batch
from seqtool.search import beam_search, greedy, sampler
from test_search import PUNCT, V, model_for, models, rules_for

# Prefix and included phrases draw from one half of the vocabulary and avoided phrases from the other: an
# avoided phrase can then never end where a required one must begin (see docs/constraints.md).
WANTED, UNWANTED = (7, 22), (23, V - 1)


def phrases(lo_hi, most):
    return st.lists(st.lists(st.integers(*lo_hi), min_size=1, max_size=3).map(tuple), max_size=most)


@st.composite
def controlled(draw, exact=False):
    """(sources, per-line controls): prefix, include and avoid for each source."""
    srcs = draw(st.lists(st.lists(st.integers(4, V - 1), min_size=1, max_size=10), min_size=1, max_size=4))
    lines = []
    for src in srcs:
        prefix = tuple(draw(st.lists(st.integers(*WANTED), max_size=min(3, len(src)))))
        lines.append({"prefix": prefix, "include": draw(phrases(WANTED, 2)), "avoid": draw(phrases(UNWANTED, 3))})
    return srcs, lines


def satisfied(hyp_tokens, prefix, include, avoid) -> bool:
    def has(p):
        return any(tuple(hyp_tokens[i:i + len(p)]) == p for i in range(len(hyp_tokens) - len(p) + 1))
    return tuple(hyp_tokens[: len(prefix)]) == prefix and all(map(has, include)) and not any(map(has, avoid))


def search_with(kind, k):
    return {"greedy": lambda m, s, lens, r: greedy(m, s, lens, r),
            "sample": lambda m, s, lens, r: greedy(m, s, lens, r, pick=sampler(1.0, seed=7)),
            "beam": lambda m, s, lens, r: beam_search(m, s, lens, r, k, alpha=1.0, nbest=k)}[kind]


def decode(kind, k, srcs, which, lines, **decoding):
    model = model_for(*which)
    b = make_batch(srcs, [[4]] * len(srcs))
    rules = rules_for(srcs, prefix=[x["prefix"] for x in lines], include=[x["include"] for x in lines],
                      avoid=[x["avoid"] for x in lines], **decoding)
    return search_with(kind, k)(model, b.src, b.src_lens, rules)


def specs(srcs, lines, forced=None):
    return [LineSpec(len(s), tuple(forced[i]) if forced else None, x["prefix"], tuple(x["include"]), tuple(x["avoid"]))
            for i, (s, x) in enumerate(zip(srcs, lines))]


@settings(max_examples=60, deadline=None)
@given(controlled(), models, st.sampled_from(["greedy", "sample", "beam"]), st.integers(1, 4),
       st.sampled_from([0, 2, 3]))
def test_every_output_meets_every_constraint(data, which, kind, k, ngram):
    srcs, lines = data
    d = DecodingConfig(max_len_a=1.5, max_len_b=4, no_repeat_ngram=ngram)
    assume(all(line_problem(spec, d) is None for spec in specs(srcs, lines)))
    for x, hyps in zip(lines, decode(kind, k, srcs, which, lines, no_repeat_ngram=ngram)):
        assert hyps
        for h in hyps:
            assert h.complete and satisfied(h.tokens, **x), (h.tokens, x)


@settings(max_examples=40, deadline=None)
@given(controlled(), st.integers(1, 4), models)
def test_exact_length_and_punctuation_hold_with_a_prefix_and_phrases(data, k, which):
    srcs, lines = data
    srcs = [[t if t != 7 else 5 for t in s] for s in srcs]  # some punctuation (5, 6) in the sources
    forced = [[tok if tok in PUNCT else -1 for tok in s] for s in srcs]
    d = DecodingConfig()
    assume(all(line_problem(spec, d, PUNCT) is None for spec in specs(srcs, lines, forced)))
    model = model_for(*which)
    b = make_batch(srcs, [[4]] * len(srcs))
    rules = rules_for(srcs, forced=forced, free_banned=PUNCT, prefix=[x["prefix"] for x in lines],
                      include=[x["include"] for x in lines], avoid=[x["avoid"] for x in lines])
    for kind in ("greedy", "beam"):
        for src, x, hyps in zip(srcs, lines, search_with(kind, k)(model, b.src, b.src_lens, rules)):
            for h in hyps:
                assert h.complete and satisfied(h.tokens, **x), (h.tokens, x)
                assert len(h.tokens) == len(src)
                assert [i for i, t in enumerate(h.tokens) if t in PUNCT] == [i for i, t in enumerate(src) if t in PUNCT]


@settings(max_examples=25, deadline=None)
@given(controlled(), models, st.integers(2, 4))
def test_a_batch_with_constraints_equals_its_lines_one_by_one(data, which, k):
    srcs, lines = data
    d = DecodingConfig(max_len_a=1.5, max_len_b=4)
    assume(all(line_problem(spec, d) is None for spec in specs(srcs, lines)))
    together = decode("beam", k, srcs, which, lines)
    for src, x, hyps in zip(srcs, lines, together):
        assert [h.tokens for h in hyps] == [h.tokens for h in decode("beam", k, [src], which, [x])[0]]


@settings(max_examples=30, deadline=None)
@given(controlled(), models)
def test_beam_one_equals_greedy_with_a_prefix_and_avoided_phrases(data, which):
    srcs, lines = data
    lines = [{**x, "include": []} for x in lines]  # with phrases to include, beam search ranks by them (banks)
    g = decode("greedy", 1, srcs, which, lines)
    model = model_for(*which)
    b = make_batch(srcs, [[4]] * len(srcs))
    rules = rules_for(srcs, prefix=[x["prefix"] for x in lines], avoid=[x["avoid"] for x in lines])
    bs = beam_search(model, b.src, b.src_lens, rules, 1, alpha=0.0)
    assert [h[0].tokens for h in g] == [h[0].tokens for h in bs]


@settings(max_examples=200, deadline=None)
@given(phrases((4, 8), 4), st.lists(st.integers(4, 8), max_size=30))
def test_include_tracks_exactly_which_phrases_the_output_holds(ps, seq):
    """The automaton's state after any token sequence: met = the phrases occurring in it; tokens still
    needed fall by at least one with each `advancing` token."""
    ps = tuple(dict.fromkeys(ps))
    inc = Include([ps], [[(0, 40)]])
    state = START
    for i, tok in enumerate(seq):
        need, advancing = inc.needs(0, state)
        nxt = inc.transition(0, state, tok)
        if tok in advancing:
            assert inc.needs(0, nxt)[0] <= need - 1
        state = nxt
        occurs = {j for j, p in enumerate(ps) if any(tuple(seq[a:a + len(p)]) == p for a in range(i + 2 - len(p)))}
        assert {j for j in range(len(ps)) if state.met >> j & 1} == occurs
    need, advancing = inc.needs(0, state)
    assert (need == 0) == (state.met == (1 << len(ps)) - 1) and (need == 0 or advancing)


def test_beam_search_places_phrases_where_they_fit_not_only_at_the_end():
    """Dynamic beam allocation keeps hypotheses that met a phrase early: at least one output of a batch
    holds its phrase before the last position, which masking alone (forced at the end) would not."""
    srcs = [[8, 9, 10, 11, 12, 13], [14, 15, 16, 17]]
    model = model_for("gru", "attention")
    b = make_batch(srcs, [[4]] * len(srcs))
    free = beam_search(model, b.src, b.src_lens, rules_for(srcs), 5, nbest=5)
    used = {t for hyps in free for h in hyps for t in h.tokens}
    phrase = [(t,) for t in range(7, V) if t not in used][:2]  # tokens no free output has
    hyps = beam_search(model, b.src, b.src_lens, rules_for(srcs, include=[[phrase[0]], [phrase[1]]]), 5, nbest=5)
    for (p,), out in zip(phrase, hyps):
        assert all(p in h.tokens for h in out)
    assert any(h.tokens.index(p) < len(h.tokens) - 1 for (p,), out in zip(phrase, hyps) for h in out)


@settings(max_examples=30, deadline=None)
@given(controlled(), st.sampled_from(["greedy", "beam"]), st.sets(st.integers(4, V - 1), max_size=20))
def test_a_phrase_ends_where_a_word_ends(data, kind, glue):
    """Right after a phrase to include, no token that would continue its word ('Sabe' + 'd'); a prefix that
    glues on to the phrase inside it does not meet it."""
    srcs, lines = data
    d = DecodingConfig(max_len_a=1.5, max_len_b=4)
    assume(all(line_problem(spec, d) is None for spec in specs(srcs, lines)))
    for x, hyps in zip(lines, decode(kind, 3, srcs, ("gru", "attention"), lines, glue=sorted(glue))):
        for h in hyps:
            assert h.complete and satisfied(h.tokens, **x)
            after = [h.tokens[i + len(p)] for p in x["include"] for i in range(len(h.tokens) - len(p))
                     if tuple(h.tokens[i:i + len(p)]) == p]
            # the first occurrence of each phrase is followed by a word start (a later one may be glued)
            assert all(any(h.tokens[i + len(p)] not in glue for i in range(len(h.tokens) - len(p))
                           if tuple(h.tokens[i:i + len(p)]) == p) or tuple(h.tokens[-len(p):]) == p
                       for p in x["include"]), (h.tokens, x, after)


@pytest.mark.parametrize("kind", ["greedy", "beam"])
def test_a_prefix_that_holds_a_phrase_inside_a_word_keeps_the_word_and_places_the_phrase_after(kind):
    """Prefix 'Bavo govo' (pieces 10 11 12 11, 11 continues a word) with the phrase 'Ba' (10): the prefix is kept
    whole, and 'Ba' appears again after it, as a word of its own."""
    line = {"prefix": (10, 11, 12, 11), "include": [(10,)], "avoid": []}
    (hyps,) = decode(kind, 3, [[8, 9, 13]], ("gru", "attention"), [line], glue=[11])
    for h in hyps:
        assert h.complete and h.tokens[:4] == [10, 11, 12, 11], h.tokens
        assert any(tok == 10 and h.tokens[i + 1:i + 2] != [11] for i, tok in enumerate(h.tokens[4:], 4)), h.tokens


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(4, 9), min_size=1, max_size=6),
       st.lists(st.lists(st.integers(4, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=3),
       st.sets(st.integers(4, 9), max_size=3), st.lists(st.integers(4, 9), max_size=3), models)
def test_every_line_accepted_with_glue_comes_out_complete_and_meets_its_phrases(src, include, glue, prefix, which):
    """Whatever continues a word: the glue ban yields where it would leave no token (phrases (6,) and (4, 6, 5),
    glue {5}: after 4 6, only 5 goes on), and a prefix holds a phrase only where its word ends there."""
    include = list(dict.fromkeys(include))
    assume(not any(p[0] in glue for p in include))  # a phrase begins a word: the tokenizer writes it with ▁ first
    d = DecodingConfig(max_len_a=1.5, max_len_b=4)
    assume(line_problem(LineSpec(len(src), None, tuple(prefix), tuple(include)), d, glue=glue) is None)
    for kind in ("greedy", "beam"):
        (hyps,) = decode(kind, 3, [src], which, [{"prefix": tuple(prefix), "include": include, "avoid": []}],
                         glue=sorted(glue))
        for h in hyps:
            assert h.complete and h.tokens[:len(prefix)] == prefix, (h.tokens, include, glue)
            assert all(any(tuple(h.tokens[i:i + len(p)]) == p and h.tokens[i + len(p):i + len(p) + 1] not in
                           [[g] for g in glue] for i in range(len(h.tokens))) for p in include), (h.tokens, include)


def test_a_prefix_holding_a_phrase_only_inside_a_word_needs_room_for_it_after():
    d = DecodingConfig(max_len_a=1.5, max_len_b=4, max_len=2)
    spec = LineSpec(3, None, (10, 11), ((10,),))  # 'Bavo' holds 'Ba' only as the start of a longer word
    assert line_problem(spec, d) is None and spec.needed() == 2
    assert spec.needed(glue=[11]) == 3
    assert "need 3 tokens, more than decoding.max_len 2" in line_problem(spec, d, glue=[11])


def test_ngram_blocking_yields_to_a_phrase_that_must_appear():
    """no_repeat_ngram 1 forbids any token twice; a prefix of 9 and a phrase (9, 10) need 9 twice:
    the blocking (a heuristic) gives way, the constraint (a request) does not."""
    srcs = [[8, 9, 10]]
    for kind in ("greedy", "beam"):
        hyps = decode(kind, 3, srcs, ("gru", "attention"), [{"prefix": (9,), "include": [(9, 10)], "avoid": []}],
                      no_repeat_ngram=1)
        assert all(h.complete and h.tokens[0] == 9 and satisfied(h.tokens, (9,), [(9, 10)], []) for h in hyps[0])


@pytest.mark.parametrize("spec, decoding, problem", [
    (LineSpec(3, include=((5, 6),), avoid=((6,),)), {}, "a constraint contains an avoided phrase"),
    (LineSpec(3, prefix=(5, 6), avoid=((5, 6),)), {}, "the prefix contains an avoided phrase"),
    (LineSpec(3, prefix=(5, 5)), {"no_repeat_ngram": 1}, "repeats a 1-gram"),
    (LineSpec(3, include=((5, 6, 7, 8),)), {"max_len": 3}, "need 4 tokens, more than decoding.max_len 3"),
    (LineSpec(2, positions=(-1, -1), prefix=(5, 6, 7)), {}, "more than the exact output length 2"),
    (LineSpec(2, positions=(-1, 30), prefix=(5, 6)), {}, "token 2 falls where the input's punctuation is copied"),
    (LineSpec(2, positions=(-1, -1), prefix=(31,)), {}, "token 1 is punctuation where the input has none"),
    (LineSpec(3, positions=(-1, 30, -1), include=((5, 6),)), {}, "(2 tokens) do not fit in the 2 free positions"),
    (LineSpec(3, positions=(-1, 30, -1), include=((5, 30),)), {}, "a constraint holds punctuation"),
    (LineSpec(3, positions=(-1, 30, -1), prefix=(5,), include=((30, 6),)), {}, "a constraint holds punctuation"),
])
def test_controls_that_cannot_be_met_are_refused_with_a_reason(spec, decoding, problem):
    assert problem in line_problem(spec, DecodingConfig(**decoding), free_banned=[30, 31])


def test_controls_that_fit_are_accepted_and_the_length_limit_makes_room():
    from seqtool.constraints import length_limit

    d = DecodingConfig(max_len_a=1.0, max_len_b=2)
    spec = LineSpec(2, prefix=(5, 6, 7), include=((8, 9), (6, 7)))  # (6, 7) is inside the prefix: counted once
    assert line_problem(spec, d) is None and spec.needed() == 5
    assert length_limit(spec, d) == 5 + 2  # 1.0 * 2 + 2 = 4 would not hold them: room for them + max_len_b
    assert line_problem(LineSpec(2, positions=(-1, 30, -1), prefix=(5,), include=((6,),)), d, [30]) is None
    assert line_problem(LineSpec(2, positions=(-1, 30, -1), prefix=(5, 30), include=((5, 30),)), d, [30]) is None


# --- from the CLI, on the sample model (test BLEU 100) ------------------------------------------------

def has_words(text: str, phrase: str) -> bool:
    """`phrase` in `text` as whole words (punctuation may follow: 'Sabe' is in 'to Sabe.')."""
    return re.search(rf"(^| ){re.escape(phrase)}(?![^\W_])", text) is not None


def _jsonl(records) -> str:
    return "".join((json.dumps(r) if r is not None else "") + "\n" for r in records)


def test_cli_controls_are_all_met_and_natural_ones_keep_bleu(trained_model):
    """Controls taken from the reference (as a user who knows part of the answer) keep BLEU at 100; controls
    against what the model would say (a word of another sentence, a word of its own answer avoided, a
    prefix it would not start with) are met all the same; every line is answered in place."""
    from sacrebleu import corpus_bleu

    src = (SAMPLE / "test.src").read_text().splitlines()[:60]
    ref = (SAMPLE / "test.tgt").read_text().splitlines()[:60]
    natural, forced = [], []
    for i, (s, r) in enumerate(zip(src, ref)):
        words, other = r.split(), ref[(i + 1) % len(ref)].split()
        natural.append({"text": s, "prefix": " ".join(words[:2])} if i % 3 == 0 else
                       {"text": s, "constraints": [words[-2]]} if i % 3 == 1 else
                       {"text": s, "avoid": [w for w in other if w not in words][:1]})
        forced.append({"text": s, "prefix": other[0] + " " + other[-1]} if i % 3 == 0 else
                      {"text": s, "constraints": [w for w in other if w not in words][:1]} if i % 3 == 1 else
                      {"text": s, "avoid": [words[1]]})
    for records, bleu_floor in ((natural, 95.0), (forced, 0.0)):
        with_gap = records[:30] + [None] + records[30:]
        out = run_cli("translate", "-m", str(trained_model), "--input-format", "jsonl", "-q", input=_jsonl(with_gap),
                      check=True).stdout.split("\n")
        assert len(out) == len(with_gap) + 1 and out[30] == "" and out[-1] == ""
        hyps = out[:30] + out[31:-1]
        for rec, hyp in zip(records, hyps):
            assert hyp.startswith(rec.get("prefix", "")), (rec, hyp)
            assert all(has_words(hyp, c) for c in rec.get("constraints", [])), (rec, hyp)
            assert not any(has_words(hyp, a) for a in rec.get("avoid", [])), (rec, hyp)
        assert corpus_bleu(hyps, [ref]).score >= bleu_floor


def test_cli_prefix_flag_drop_prefix_and_avoid_file(trained_model, tmp_path):
    src = "\n".join((SAMPLE / "test.src").read_text().splitlines()[:8]) + "\n"
    plain = run_cli("translate", "-m", str(trained_model), "-q", input=src, check=True).stdout.splitlines()
    kept = run_cli("translate", "-m", str(trained_model), "-q", "--prefix", "govo Zoti", input=src,
                   check=True).stdout.splitlines()
    dropped = run_cli("translate", "-m", str(trained_model), "-q", "--prefix", "govo Zoti", "--drop-prefix", input=src,
                      check=True).stdout.splitlines()
    assert all(k.startswith("govo Zoti ") for k in kept) and kept != plain
    int8 = run_cli("translate", "-m", str(trained_model), "-q", "--prefix", "govo Zoti", "--quantize", "--beam", "1",
                   input=src, check=True).stdout.splitlines()
    assert len(int8) == 8 and all(k.startswith("govo Zoti ") for k in int8)
    assert dropped == [k[len("govo Zoti "):] for k in kept]
    avoid = tmp_path / "avoid.txt"
    avoid.write_text("voba\n\ngovo\n")
    free = run_cli("translate", "-m", str(trained_model), "-q", "--avoid-file", str(avoid), input=src,
                   check=True).stdout
    assert len(free.splitlines()) == 8 and not any(has_words(free, w) for w in ("voba", "govo"))
    assert {"voba", "govo"} & set(" ".join(plain).split())  # they were there to avoid
    avoid.write_text("voba\n\nvo\tba\n")  # line 3: a tab, which no output may hold
    for stdin in (src, "\n\n"):  # checked before any line, named by the avoid file's own line
        proc = run_cli("translate", "-m", str(trained_model), "--avoid-file", str(avoid), input=stdin)
        assert proc.returncode == 1 and proc.stdout == "", proc.stdout
        assert proc.stderr.splitlines() == [f"seqtool: error: {avoid}:3: an avoided phrase 'vo\\tba' holds a "
                                            "control character or a line break"], proc.stderr
    avoid.write_text("")  # nothing to avoid
    assert run_cli("translate", "-m", str(trained_model), "-q", "--avoid-file", str(avoid), input=src,
                   check=True).stdout.splitlines() == plain


@pytest.mark.parametrize("stdin, message", [
    ('{"text": "seliti roma"}\n{"text": "seliti roma"}\n{"text": \n', "line 3: not valid JSON"),
    ('{"text": "seliti"}\n["seliti"]\n', "line 2: expected a JSON object"),
    ('{"text": "seliti", "prefix": 3}\n', 'line 1: "prefix" must be a string'),
    ('{"text": "seliti", "constraints": "roma"}\n', 'line 1: "constraints" must be a list of strings'),
    ('{"text": "seliti", "constraints": ["  "]}\n', "line 1: a constraint is empty"),
    ('{"text": "seliti roma"}\n{"text": "seliti", "constraints": ["voba"], "avoid": ["voba"]}\n',
     "line 2: a constraint contains an avoided"),
    ('{"text": "seliti", "prefix": "a\\u0007b"}\n', "line 1: the prefix 'a\\x07b' holds a control character"),
    ('{"text": "seliti", "constraints": ["voba ' + 'govo ' * 30 + '"]}\n', "more than decoding.max_len 20"),
])
def test_cli_controls_that_cannot_be_met_are_one_line_and_earlier_lines_are_kept(trained_model, tmp_path, stdin,
                                                                                 message):
    from test_cli_errors import assert_one_line_error

    out = tmp_path / "out.txt"
    proc = run_cli("translate", "-m", str(trained_model), "--input-format", "jsonl", "-q", "-o", str(out),
                   "--set", "decoding.max_len=20", input=stdin)
    assert_one_line_error(proc, message)
    good = stdin.count('{"text": "seliti roma"}')
    if good:
        assert ("translated before it are in" in proc.stderr
                and len(out.with_name("out.txt.partial").read_text().splitlines()) == good)


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A word-level model decoding to the input's exact length, as couplets do (it need not be good)."""
    work = tmp_path_factory.mktemp("word")
    cfg = tiny_config(work / "model", tokenizer={"type": "word", "vocab_size": 2000},
                      training={"max_steps": 60, "valid_every": 60}, decoding={"exact_length": True})
    run_cli("train", "-c", str(write_config(work / "word.yaml", cfg)), "-q", check=True)
    return work / "model"


def test_cli_acrostic_head_keeps_the_exact_length(word_model):
    src = (SAMPLE / "test.src").read_text().splitlines()[:20]
    heads = ["voba", "govo", "Kevi", "mela"]
    records = [{"text": s, "prefix": heads[i % 4]} for i, s in enumerate(src)]
    out = run_cli("translate", "-m", str(word_model), "--input-format", "jsonl", "-q", input=_jsonl(records),
                  check=True).stdout.splitlines()
    for rec, hyp in zip(records, out):
        assert hyp.split()[0] == rec["prefix"] and len(hyp.split()) == len(rec["text"].split())
    from test_cli_errors import assert_one_line_error

    long = _jsonl([{"text": "seliti roma", "prefix": "voba Kevi nata"}])
    assert_one_line_error(run_cli("translate", "-m", str(word_model), "--input-format", "jsonl", input=long),
                          "line 1: the prefix has 3 tokens, more than the exact output length 2")
    unknown = _jsonl([{"text": "seliti roma", "prefix": "qqq"}])
    assert_one_line_error(run_cli("translate", "-m", str(word_model), "--input-format", "jsonl", input=unknown),
                          "line 1: the prefix 'qqq' holds a word or character the model's target vocabulary lacks")

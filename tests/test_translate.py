"""Streaming translation: one output per input, order kept, empty lines empty, errors in order."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqtool.config import validate
from seqtool.errors import DataError
from seqtool.model.seq2seq import build_model
from seqtool.tokenizer import train_tokenizer
from seqtool.translate import Translator, read_ahead, translate_stream

_CFG = validate({"model": {"embedding_size": 8, "encoder_hidden_size": 8, "hidden_size": 16, "dropout": 0.0},
                 "tokenizer": {"vocab_size": 400}, "decoding": {"beam_size": 2, "batch_size": 3, "buffer_lines": 4,
                                                                "max_len_b": 3, "max_input_tokens": 30}})
_TOK = train_tokenizer([f"alpha beta {i} gamma" for i in range(100)], _CFG.tokenizer)
torch.manual_seed(0)
_MODEL = build_model(_CFG.model, _TOK.vocab_size, _TOK.vocab_size).eval()


def translator(**decoding) -> Translator:
    return Translator(_MODEL, _TOK, _TOK, _CFG.decoding.model_copy(update=decoding))


lines_strategy = st.lists(st.one_of(st.just(""), st.just("   "),
                                    st.text(max_size=30).map(lambda s: s.replace("\n", " ").replace("\r", " "))),
                          max_size=25)


@settings(max_examples=30, deadline=None)
@given(lines_strategy)
def test_one_output_line_per_input_line(lines):
    out = io.StringIO()
    n = translate_stream(translator(), iter(lines), out)
    result = out.getvalue().split("\n")
    assert n == len(lines) and len(result) == len(lines) + 1 and result[-1] == ""
    for src, hyp in zip(lines, result):
        if not src.strip():
            assert hyp == ""
        assert "\n" not in hyp


@settings(max_examples=15, deadline=None)
@given(st.lists(st.text(alphabet="abg 0123456789", min_size=1, max_size=25), min_size=1, max_size=12))
def test_order_and_results_do_not_depend_on_chunking(lines):
    t = translator()
    together = [x.text for x in t.translate(lines)]
    assert together == [t.translate([line])[0].text for line in lines]


def test_read_ahead_chunks_and_reports_errors_after_good_lines():
    def source():
        yield from ["a", "b", "c", "d", "e"]
        raise DataError("x:6: invalid UTF-8")

    chunks = []
    with pytest.raises(DataError, match="x:6"):
        for chunk in read_ahead(source(), 2):
            chunks.append(chunk)
    assert [line for c in chunks for line in c] == ["a", "b", "c", "d", "e"]
    assert all(1 <= len(c) <= 2 for c in chunks)


def test_read_ahead_fills_chunks_from_a_steady_source_and_waits_little_for_a_slow_one():
    # A file or a fast pipe: full chunks whatever the thread timing (the batches, and so a shortlist's or
    # int8's outputs, must not change from run to run).
    assert [len(c) for c in read_ahead(iter([str(i) for i in range(10)]), 4)] == [4, 4, 2]

    # A person typing: the next line is not written until the answer to this one came back, so each chunk
    # must be one line, yielded without waiting for a line that is not coming (it would deadlock).
    answered = [threading.Event() for _ in range(10)]

    def person():
        for i in range(10):
            yield str(i)
            assert answered[i].wait(30), "a chunk waited for a line that only comes after its answer"

    chunks = []
    for chunk in read_ahead(person(), 4, patience=0.01):
        chunks.append(chunk)
        answered[int(chunk[-1])].set()
    assert chunks == [[str(i)] for i in range(10)]


def test_long_input_truncated_with_warning():
    warnings = []
    t = Translator(_MODEL, _TOK, _TOK, _CFG.decoding, warn=warnings.append)
    out = t.translate(["alpha " * 200, ""], first_lineno=7)
    assert len(out) == 2 and out[1].text == ""
    assert warnings and warnings[0].startswith("line 7:") and "truncated to 30" in warnings[0]


UNSAFE = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]] + ["\u2028", "\u2029"]


@pytest.mark.parametrize("decoding", [{"beam_size": 1}, {"beam_size": 3, "nbest": 3}, {"sample": True, "seed": 3}],
                         ids=["greedy", "beam", "sample"])
def test_no_line_break_or_control_character_whatever_the_model_prefers(decoding):
    """A model whose output bias favours the byte pieces of a line feed, a carriage return and an escape:
    every output is still one line of printable text."""
    model = build_model(_CFG.model, _TOK.vocab_size, _TOK.vocab_size).eval()
    with torch.no_grad():
        for byte in ("<0x0A>", "<0x0D>", "<0x1B>", "<0x85>"):
            model.output.bias[_TOK.sp.piece_to_id(byte)] = 50.0
    t = Translator(model, _TOK, _TOK, _CFG.decoding.model_copy(update=decoding))
    out = io.StringIO()
    translate_stream(t, iter(["alpha beta 1", "gamma"]), out)
    assert out.getvalue().count("\n") == 2
    for tr in t.translate(["alpha beta 1", "gamma"]):
        for text, _ in tr.hypotheses:
            assert text and not any(c in text for c in UNSAFE), repr(text)


def test_decode_never_returns_a_line_separator():
    """U+2028 and NEL spelled by byte pieces (each harmless alone) decode to spaces."""
    ids = [_TOK.sp.piece_to_id(f"<0x{b:02X}>") for b in "a\u2028b\u0085c\rd".encode()]
    assert _TOK.decode(ids) == "a b c d"

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seqtool.data import bucket_batches, decode_line, iter_lines, make_batch, read_pairs
from seqtool.errors import DataError
from seqtool.tokenizer import BOS, EOS, PAD


def test_decode_line_accepts_crlf_and_bom():
    assert decode_line(b"\xef\xbb\xbfhallo\r\n", "f", 1) == "hallo"
    assert decode_line("über\n".encode(), "f", 2) == "über"


def test_invalid_utf8_and_nul_name_file_and_line():
    with pytest.raises(DataError, match=r"f:7: invalid UTF-8"):
        decode_line(b"ab\xffc\n", "f", 7)
    with pytest.raises(DataError, match=r"f:2: contains a NUL"):
        decode_line(b"a\x00b\n", "f", 2)


def test_iter_lines_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(iter_lines(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="is a directory"):
        list(iter_lines(tmp_path))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\nok\n\xc3\x28\n")
    with pytest.raises(DataError, match=r"bad.txt:3"):
        list(iter_lines(bad))


def test_read_pairs_names_both_counts(tmp_path):
    (tmp_path / "a").write_text("1\n2\n3\n")
    (tmp_path / "b").write_text("1\n2\n")
    with pytest.raises(DataError, match=r"has 3 lines but .* has 2"):
        read_pairs(tmp_path / "a", tmp_path / "b")
    (tmp_path / "e").write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_pairs(tmp_path / "e", tmp_path / "b")


def test_make_batch_shapes():
    b = make_batch([[5, 6, 7], [8]], [[9], [10, 11]])
    assert b.src.tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert b.tgt_in.tolist() == [[BOS, 9, PAD], [BOS, 10, 11]]
    assert b.tgt_out.tolist() == [[9, EOS, PAD], [10, 11, EOS]]
    assert b.n_tgt_tokens == 5


@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=300),
       st.integers(60, 3000), st.integers(0, 5))
def test_bucket_batches_cover_each_example_once_within_budget(lens, budget, seed):
    src, tgt = [s for s, _ in lens], [t for _, t in lens]
    batches = bucket_batches(src, tgt, budget, seed)
    assert sorted(i for b in batches for i in b) == list(range(len(lens)))
    for b in batches:
        width = max(max(src[i], tgt[i] + 1) for i in b)
        assert len(b) == 1 or width * len(b) <= budget
    assert batches == bucket_batches(src, tgt, budget, seed)  # same seed, same epoch


@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=300),
       st.integers(1, 80), st.integers(0, 5))
def test_sentence_batches_hold_exactly_that_many_sorted_by_length(lens, sentences, seed):
    src, tgt = [s for s, _ in lens], [t for _, t in lens]
    batches = bucket_batches(src, tgt, 1, seed, sentences=sentences)  # the token budget is not used
    assert sorted(i for b in batches for i in b) == list(range(len(lens)))
    assert sorted(len(b) for b in batches)[1:] == [sentences] * (len(batches) - 1)  # only one batch may be short
    assert len(batches) == -(-len(lens) // sentences)
    # Length buckets: the batches, taken in length order, never overlap in target length.
    spans = sorted((min(tgt[i] for i in b), max(tgt[i] for i in b)) for b in batches)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))

"""Streaming training data from shard files: every pair once per epoch, bounded memory, same results on resume."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import LEARNS, SAMPLE, read_metrics, run_cli, tiny_config, write_config
from seqtool.checkpoint import STATE_FILE, load_state
from seqtool.config import TokenizerConfig, validate
from seqtool.data import encode_pairs
from seqtool.errors import DataError
from seqtool.shards import Counts, ShardStream, aligned_lines, shard_pairs, shuffled
from seqtool.tokenizer import train_tokenizer
from seqtool.train import run_training


@given(st.lists(st.integers(), max_size=200), st.integers(1, 50), st.integers(0, 1000))
def test_shuffle_buffer_gives_every_item_once_and_holds_at_most_its_size(items, size, seed):
    taken = 0

    def source():
        nonlocal taken
        for x in items:
            taken += 1
            yield x

    out = []
    for x in shuffled(source(), size, random.Random(seed)):
        out.append(x)
        assert taken - len(out) <= size  # never more than `size` read and not yet given out
    assert sorted(out) == sorted(items)


def write_shards(tmp_path, n_shards: int, lines: int = 60) -> tuple[str, str]:
    src, tgt = (SAMPLE / "train.src").read_text().splitlines(), (SAMPLE / "train.tgt").read_text().splitlines()
    for k in range(n_shards):
        part = slice(k * lines, (k + 1) * lines)
        (tmp_path / f"part{k}.src").write_text("\n".join(src[part]) + "\n")
        (tmp_path / f"part{k}.tgt").write_text("\n".join(tgt[part]) + "\n")
    return str(tmp_path / "part*.src"), str(tmp_path / "part*.tgt")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer((SAMPLE / "train.src").read_text().splitlines()[:2000], TokenizerConfig(vocab_size=300))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return shard_pairs(*write_shards(tmp_path_factory.mktemp("shards"), 3))


@settings(max_examples=30)
@given(buffer=st.integers(1, 400), seed=st.integers(0, 100))
def test_one_streamed_epoch_holds_exactly_the_pairs_in_memory(shards, tok, buffer, seed):
    stream = ShardStream(shards, tok, tok, max_src_len=30, max_tgt_len=30, truncate_src=0, buffer=buffer)
    counts = Counts()
    batches = list(stream.batches(batch_tokens=200, seed=seed, counts=counts))
    streamed = Counter((tuple(s), tuple(t)) for b in batches for s, t in zip(b.src, b.tgt))
    lines = [pair for s, t in shards for pair in aligned_lines(s, t)]
    ex = encode_pairs([s for s, _ in lines], [t for _, t in lines], tok, tok, 30, 30)
    assert streamed == Counter(zip(map(tuple, ex.src), map(tuple, ex.tgt)))
    assert (counts.pairs, counts.dropped_long, counts.dropped_empty) == (len(ex), ex.dropped_long, ex.dropped_empty)
    assert all(len(b) <= buffer for b in batches)
    again = list(stream.batches(batch_tokens=200, seed=seed, counts=Counts()))
    assert [b.src for b in again] == [b.src for b in batches]  # the seed decides the order


def test_shard_files_must_pair_up_and_align(tmp_path):
    (tmp_path / "a.src").write_text("x\ny\n")
    (tmp_path / "a.tgt").write_text("x\n")
    with pytest.raises(DataError, match="names 1 files but data.train_tgt names 0"):
        shard_pairs([str(tmp_path / "a.src")], [])
    with pytest.raises(DataError, match="no file matches"):
        shard_pairs(str(tmp_path / "*.nope"), str(tmp_path / "a.tgt"))
    with pytest.raises(DataError, match=r"a\.tgt ends after 1 lines but .*a\.src goes on"):
        list(aligned_lines(str(tmp_path / "a.src"), str(tmp_path / "a.tgt")))


def test_streamed_training_learns_and_resumes_exactly(tmp_path):
    src, tgt = write_shards(tmp_path, 4, lines=5000)
    stream = {"train_src": src, "train_tgt": tgt, "stream": True, "shuffle_buffer": 3000}
    small = {"max_steps": 40, "valid_every": 20, "valid_max_sentences": 30, "batch_tokens": 600}
    run_training(validate(tiny_config(tmp_path / "a", data=stream, training=small)), quiet=True)
    run_training(validate(tiny_config(tmp_path / "b", data=stream, training={**small, "max_steps": 20})), quiet=True)
    run_training(validate(tiny_config(tmp_path / "b", data=stream, training=small)), resume=True, quiet=True)
    a, b = load_state(tmp_path / "a" / STATE_FILE), load_state(tmp_path / "b" / STATE_FILE)
    assert a.progress["step"] == b.progress["step"] == 40
    for (name, wa), (_, wb) in zip(a.bundle.model.state_dict().items(), b.bundle.model.state_dict().items()):
        assert torch.equal(wa, wb), name

    # The whole tiny task through the CLI, streamed: it learns as in memory.
    cfg = write_config(tmp_path / "s.yaml", tiny_config(tmp_path / "c", data=stream, **LEARNS))
    proc = run_cli("train", "-c", str(cfg), check=True)
    assert "streaming training pairs from 4 file pair(s)" in proc.stderr
    assert "epoch 1: streamed 20,000 training pairs" in proc.stderr
    assert read_metrics(tmp_path / "c")[-1]["valid_bleu"] >= 95


def test_a_bad_line_in_a_streamed_shard_is_one_clear_error(tmp_path):
    src, tgt = write_shards(tmp_path, 2)
    with open(tmp_path / "part1.src", "ab") as f:
        f.write(b"bad \xff byte\n")
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "m", data={"train_src": src, "train_tgt": tgt,
                                                                             "stream": True}))
    proc = run_cli("train", "-c", str(cfg))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("part1.src:61: invalid UTF-8 at byte 5")
    assert "Traceback" not in proc.stderr

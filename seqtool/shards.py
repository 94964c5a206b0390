"""Training data larger than memory: pairs streamed from shard files through a bounded shuffle buffer.

With `data.stream: true` the training pairs are never all in memory. Each epoch visits the shard
file pairs in a seeded random order, reads them line by line, encodes them in chunks, passes them
through a shuffle buffer of `data.shuffle_buffer` pairs, and cuts each buffer-full (sorted by
length, as in memory) into token-budget batches in random order. Memory is bounded by the buffer,
whatever the corpus size; the same seed gives the same batches, so --resume and every rank of a
data-parallel run see the same stream.
"""

from __future__ import annotations

import glob
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, zip_longest
from typing import Optional

from seqtool.data import Examples, encode_pairs, epoch_batches, iter_lines, read_pairs
from seqtool.errors import DataError
from seqtool.tokenizer import Tokenizer

ENCODE_CHUNK = 2000  # lines encoded per sentencepiece call: fast, and small next to the buffer


def expand(paths: str | Sequence[str]) -> list[str]:
    """A path or a list of them, with glob patterns replaced by the files they match (sorted)."""
    out: list[str] = []
    for p in [paths] if isinstance(paths, str) else paths:
        if glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise DataError(f"no file matches {p}")
            out.extend(matches)
        else:
            out.append(p)
    return out


def shard_pairs(src: str | Sequence[str], tgt: str | Sequence[str]) -> list[tuple[str, str]]:
    """Source and target shard files, paired in order; both lists must name as many files."""
    src_files, tgt_files = expand(src), expand(tgt)
    if len(src_files) != len(tgt_files):
        raise DataError(f"data.train_src names {len(src_files)} files but data.train_tgt names {len(tgt_files)}; "
                        "each source shard needs its target shard")
    return list(zip(src_files, tgt_files))


def aligned_lines(src_path: str, tgt_path: str) -> Iterator[tuple[str, str]]:
    """The line pairs of two files read in step; a file that ends first is an error naming both."""
    n = 0
    for s, t in zip_longest(iter_lines(src_path), iter_lines(tgt_path)):
        if s is None or t is None:
            longer, shorter = (src_path, tgt_path) if t is None else (tgt_path, src_path)
            raise DataError(f"{shorter} ends after {n} lines but {longer} goes on; the files must be line-aligned")
        n += 1
        yield s, t
    if n == 0:
        raise DataError(f"{src_path} is empty")


def side_lines(shards: Sequence[tuple[str, str]], side: int) -> Iterator[str]:
    """Every source (side 0) or target (side 1) line of the shards, for training a tokenizer."""
    for pair in shards:
        yield from iter_lines(pair[side])


def read_shards(shards: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """All pairs of all shards in memory (the default, when data.stream is off)."""
    src: list[str] = []
    tgt: list[str] = []
    for s, t in shards:
        more_src, more_tgt = read_pairs(s, t)
        src += more_src
        tgt += more_tgt
    return src, tgt


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """`items` in random order, holding at most `size` of them: each new item takes the place of a
    random one held, which is given out."""
    held: list = []
    for item in items:
        if len(held) < size:
            held.append(item)
            continue
        k = rng.randrange(size)
        yield held[k]
        held[k] = item
    rng.shuffle(held)
    yield from held


@dataclass
class Counts:
    """What one pass over the shards kept and dropped (for the log and the model card)."""

    pairs: int = 0
    dropped_empty: int = 0
    dropped_long: int = 0


@dataclass
class ShardStream:
    shards: list[tuple[str, str]]
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    max_src_len: int
    max_tgt_len: int
    truncate_src: int
    buffer: int
    counts: Counts = field(default_factory=Counts, init=False)  # of the epoch being read
    _known: Optional[int] = field(default=None, init=False)

    def _encoded(self, rng: random.Random, counts: Counts) -> Iterator[tuple[list[int], list[int]]]:
        order = list(self.shards)
        rng.shuffle(order)
        lines = chain.from_iterable(aligned_lines(s, t) for s, t in order)
        while True:
            chunk = [pair for _, pair in zip(range(ENCODE_CHUNK), lines)]
            if not chunk:
                return
            ex = encode_pairs([s for s, _ in chunk], [t for _, t in chunk], self.src_tok, self.tgt_tok,
                              self.max_src_len, self.max_tgt_len, self.truncate_src)
            counts.pairs += len(ex)
            counts.dropped_empty += ex.dropped_empty
            counts.dropped_long += ex.dropped_long
            yield from zip(ex.src, ex.tgt)

    def pairs(self) -> Iterator[tuple[list[int], list[int]]]:
        """One pass over the encoded pairs, shards in a fixed order (for counting, not training)."""
        return self._encoded(random.Random(0), Counts())

    # As training data (train.TrainingData, which data.Examples also is):
    @property
    def known_pairs(self) -> Optional[int]:
        """Pairs kept, once an epoch has read them all."""
        return self._known

    def epoch(self, batch_tokens: int, seed: int, sentences: int = 0) -> tuple[Iterator[Examples], None]:
        """An epoch's batches in training order; how many there are is not known before they are read."""
        self.counts = Counts()
        return self.batches(batch_tokens, seed, self.counts, sentences), None

    def finished_epoch(self) -> str:
        """What the epoch just read kept and dropped."""
        c = self.counts
        if not c.pairs:
            raise DataError("no training pairs left after filtering; check data.max_src_len / max_tgt_len")
        self._known = c.pairs
        return (f"streamed {c.pairs:,} training pairs ({c.dropped_long} over the length limits and "
                f"{c.dropped_empty} with an empty side dropped)")

    def batches(self, batch_tokens: int, seed: int, counts: Counts, sentences: int = 0) -> Iterator[Examples]:
        """One epoch's batches; `counts` is filled in as the stream is read."""
        rng = random.Random(seed)
        pairs = shuffled(self._encoded(rng, counts), self.buffer, rng)
        while True:
            pool = [pair for _, pair in zip(range(self.buffer), pairs)]
            if not pool:
                return
            pool_ex = Examples([s for s, _ in pool], [t for _, t in pool])
            for idx in epoch_batches(pool_ex, batch_tokens, rng.randrange(1 << 30), sentences):
                yield pool_ex.subset(idx)


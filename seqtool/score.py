"""Scoring given outputs: the model's log-probability of each target line given its source.

pairs of lines -> ids (sources cut as translation cuts them) -> batches of similar length -> teacher-forced
log-probabilities -> one LineScore per pair, in input order. The target's EOS counts as one of its tokens,
as in the training loss, so the per-token figure over a file is minus the validation loss on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Optional, TypeVar

import torch

from seqtool.data import iter_lines, make_batch
from seqtool.errors import DataError
from seqtool.model.seq2seq import Seq2Seq
from seqtool.tokenizer import PAD, Tokenizer
from seqtool.translate import source_ids

T = TypeVar("T")
CHUNK = 2000  # pairs read, scored and written at a time: output streams, memory stays bounded
PADDED_TARGET_TOKENS = 4096  # per batch: the (B, T, V) scores of one batch stay about 130 MB at V = 8,000


@dataclass(frozen=True)
class LineScore:
    logprob: float  # natural log, summed over the target's tokens and its EOS
    tokens: int  # the target's tokens, EOS included

    @property
    def per_token(self) -> float:
        return self.logprob / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(min(-self.per_token, 50.0))


def read_pairs_streamed(src_path: str, tgt_path: str) -> Iterator[tuple[str, str]]:
    """Line pairs of two files, read together; a file that ends first is a DataError at that line."""
    for lineno, (src, tgt) in enumerate(zip_longest(iter_lines(src_path), iter_lines(tgt_path)), 1):
        if src is None or tgt is None:
            short = src_path if src is None else tgt_path
            raise DataError(f"{short} ends at line {lineno - 1} but the other file goes on; the files must be "
                            f"line-aligned")
        yield src, tgt


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of up to `size` items; an error while reading (a misaligned or undecodable line) comes after
    the items read before it, so that their scores are written first."""
    items = iter(items)
    chunk: list[T] = []
    while True:
        try:
            item = next(items)
        except StopIteration:
            break
        except Exception:
            if chunk:
                yield chunk
            raise
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Scorer:
    model: Seq2Seq
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    truncate_src: int = 0  # data.truncate_src, as in training and translation
    max_input_tokens: int = 1024  # decoding.max_input_tokens: longer sources are cut (and said so), as translate does
    batch_size: int = 64
    warn: Callable[[str], None] = lambda message: None

    def score(self, pairs: Iterable[tuple[str, str]]) -> Iterator[Optional[LineScore]]:
        """One LineScore per pair, in order; None for a pair whose source is empty (the model never saw one:
        training drops them, and the encoder needs a token)."""
        first = 1
        for chunk in _chunks(pairs, CHUNK):
            yield from self._chunk(chunk, first)
            first += len(chunk)

    @torch.no_grad()
    def _chunk(self, pairs: Sequence[tuple[str, str]], first: int) -> list[Optional[LineScore]]:
        src = [source_ids(self.src_tok, s, self.truncate_src, self.max_input_tokens, self.warn, first + i)
               if s.strip() else [] for i, (s, _) in enumerate(pairs)]
        tgt = [self.tgt_tok.encode(t) for _, t in pairs]
        out: list[Optional[LineScore]] = [None] * len(pairs)
        order = sorted((i for i in range(len(pairs)) if src[i]), key=lambda i: (len(tgt[i]), len(src[i])))
        for idx in self._batches(order, tgt):
            batch = make_batch([src[i] for i in idx], [tgt[i] for i in idx]).to(self.model.device)
            # Logits, or log-probabilities with copy: log_softmax leaves those as they are.
            scores = self.model(batch.src, batch.src_lens, batch.tgt_in)
            logp = torch.log_softmax(scores.float(), dim=-1)
            real = batch.tgt_out != PAD
            picked = logp.gather(-1, batch.tgt_out.unsqueeze(-1)).squeeze(-1) * real  # padding: PAD's, zeroed
            for i, total, n in zip(idx, picked.sum(1).tolist(), real.sum(1).tolist()):
                out[i] = LineScore(total, int(n))
        return out

    def _batches(self, order: list[int], tgt: list[list[int]]) -> Iterator[list[int]]:
        """Up to batch_size pairs of similar target length, and at most PADDED_TARGET_TOKENS padded target
        tokens (one longer pair is a batch of its own)."""
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size
                          or (len(batch) + 1) * (len(tgt[i]) + 1) > PADDED_TARGET_TOKENS):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

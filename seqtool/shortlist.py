"""Vocabulary shortlist: the target tokens a batch may produce, from a table learned on the training pairs.

At small hidden sizes the output layer and the softmax over the whole target vocabulary are most of
a decoding step. As Marian and Sockeye do, decoding can restrict them to the target tokens likely
for the batch's sources: for each source token its best associated target tokens (Dice coefficient
of sentence co-occurrence, counted on the training pairs when training starts), the most frequent
target tokens, the special tokens, and any token a rule forces.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from seqtool.config import SHORTLIST_TABLE
from seqtool.model.decoder import DecoderState
from seqtool.model.seq2seq import OutputLayer, Seq2Seq
from seqtool.search import Hypothesis
from seqtool.tokenizer import EOS

MAX_PAIRS = 1_000_000  # pairs counted: enough for stable associations, bounded time on huge corpora
CHUNK = 20_000  # pairs counted per vectorized pass
SPECIALS = EOS + 1  # ids 0..EOS: kept first in every shortlist, so that they keep their ids in it


@dataclass
class Shortlist:
    table: torch.Tensor  # (src_vocab, SHORTLIST_TABLE) int64 target ids, best first, -1 where fewer
    frequent: torch.Tensor  # (n,) int64 target ids seen in training, most frequent first

    def tensors(self) -> dict[str, torch.Tensor]:
        """For the model file: int32 halves the table's size there."""
        return {"shortlist.table": self.table.int(), "shortlist.frequent": self.frequent.int()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Optional[Shortlist]:
        table, frequent = tensors.get("shortlist.table"), tensors.get("shortlist.frequent")
        if table is None or frequent is None:
            return None
        return cls(_widened(table), _widened(frequent))

    def fits(self, src_vocab: int, tgt_vocab: int) -> bool:
        """Whether the tensors are a table for these vocabularies (a damaged or foreign file is refused)."""
        t, f = self.table, self.frequent
        return (t.dtype == f.dtype == torch.long and t.dim() == 2 and t.size(0) == src_vocab
                and f.dim() == 1 and bool(((t >= -1) & (t < tgt_vocab)).all())
                and bool(((f >= 0) & (f < tgt_vocab)).all()))

    def rows(self, sources: Sequence[Sequence[int]], per_token: int, frequent: int, with_sources: bool,
             forced: Sequence[Sequence[int]], tgt_vocab: int) -> torch.Tensor:
        """(B, tgt_vocab) bool: the target ids each source id list of a batch may produce: specials, the
        `frequent` most frequent tokens, `per_token` associated tokens per source token, the source tokens
        themselves if `with_sources` (one vocabulary: names pass through, copying lands on them), and its
        `forced` tokens. One scatter for the batch: a unique and an isin per sentence took 0.25 s of the 1.7 s
        that greedy decoding of test2016 took."""
        own = torch.zeros(len(sources), tgt_vocab, dtype=torch.bool)
        own[:, :SPECIALS] = True
        own[:, self.frequent[:frequent]] = True
        row = torch.tensor([b for b, s in enumerate(sources) for _ in s], dtype=torch.long)
        src = torch.tensor([i for s in sources for i in s], dtype=torch.long)
        assoc = self.table[src, :per_token]  # (tokens, per_token), -1 past a source token's associations
        known = assoc >= 0
        own[row.unsqueeze(1).expand_as(assoc)[known], assoc[known]] = True
        if with_sources:
            own[row, src] = True
        own[[b for b, f in enumerate(forced) for _ in f], [t for f in forced for t in f]] = True
        return own


def _widened(t: torch.Tensor) -> torch.Tensor:
    return t.long() if t.dtype == torch.int32 else t  # any other dtype is a foreign table: `fits` refuses it


@dataclass
class BatchVocab:
    """A batch's shortlist: the target ids its sentences may produce, the output layer cut to them, and which
    of them each sentence's own list holds."""

    ids: torch.Tensor  # (n,) sorted target ids, the union of the sentences' lists
    output: OutputLayer
    allowed: Optional[torch.Tensor] = None  # (B, n) bool: sentence b's own list; None: all n for every one

    def mapped(self, results: list[list[Hypothesis]]) -> list[list[Hypothesis]]:
        """Hypotheses over positions in `ids` -> over target ids (in place)."""
        ids = self.ids.tolist()
        for hyps in results:
            for h in hyps:
                h.tokens = [ids[t] for t in h.tokens]
        return results


@dataclass
class Shortlisted:
    """A model over a batch's shortlist with Seq2Seq's `encode` / `step`, its tokens positions in `vocab.ids`:
    the translator builds it and maps the results back (BatchVocab.mapped); a search never knows. Each row's
    scores are normalised over its own sentence's list (the rest get -inf before the softmax, and after a copy
    model's mixing too), so a line's output does not depend on the lines that share its batch."""

    model: Seq2Seq
    vocab: BatchVocab

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> DecoderState:
        return replace(self.model.encode(src, src_lens, self.vocab.ids), allowed=self.vocab.allowed)

    def step(self, prev: torch.Tensor, state: DecoderState
             ) -> tuple[torch.Tensor, DecoderState, Optional[torch.Tensor]]:
        if state.allowed is None:
            return self.model.step(self.vocab.ids[prev], state, self.vocab.output)
        banned = state.per_row(~state.allowed)  # negated per sentence, then repeated for its rows

        def output(feats: torch.Tensor) -> torch.Tensor:
            return self.vocab.output(feats).masked_fill_(banned, float("-inf"))  # fresh logits: in place
        lp, state, weights = self.model.step(self.vocab.ids[prev], state, output)
        if self.model.copy_gate is not None:  # its log of mixed probabilities floors the banned ones at log 1e-12
            lp.masked_fill_(banned, float("-inf"))
        return lp, state, weights


def _unique_counts(keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum `counts` over equal `keys`."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    return uniq, torch.zeros(len(uniq), dtype=torch.long).scatter_add_(0, inverse, counts)


def _count_chunk(pairs: list[tuple[Sequence[int], Sequence[int]]], src_vocab: int, tgt_vocab: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (co-occurrence keys src_id * tgt_vocab + tgt_id, one per (source type, target type) of a pair;
    pairs holding each source token; pairs holding each target token; target token counts)."""
    srcs = [torch.tensor(sorted(set(s)), dtype=torch.long) for s, _ in pairs]
    tgts = [torch.tensor(sorted(set(t)), dtype=torch.long) for _, t in pairs]
    keys = torch.cat([(s.unsqueeze(1) * tgt_vocab + t.unsqueeze(0)).flatten() for s, t in zip(srcs, tgts)])
    tokens = torch.tensor([i for _, t in pairs for i in t], dtype=torch.long)
    return (keys, torch.bincount(torch.cat(srcs), minlength=src_vocab),
            torch.bincount(torch.cat(tgts), minlength=tgt_vocab), torch.bincount(tokens, minlength=tgt_vocab))


def build_shortlist(pairs: Iterable[tuple[Sequence[int], Sequence[int]]], src_vocab: int, tgt_vocab: int,
                    size: int = SHORTLIST_TABLE) -> Shortlist:
    """Count sentence co-occurrences over (at most MAX_PAIRS) id pairs and keep, per source token, the
    `size` target tokens with the highest Dice coefficient 2 c(s,t) / (c(s) + c(t))."""
    keys = torch.zeros(0, dtype=torch.long)
    counts = torch.zeros(0, dtype=torch.long)
    src_count = torch.zeros(src_vocab, dtype=torch.long)
    tgt_count = torch.zeros(tgt_vocab, dtype=torch.long)
    tgt_tokens = torch.zeros(tgt_vocab, dtype=torch.long)
    pairs = islice(pairs, MAX_PAIRS)
    while chunk := list(islice(pairs, CHUNK)):
        chunk_keys, chunk_src, chunk_tgt, chunk_tokens = _count_chunk(chunk, src_vocab, tgt_vocab)
        keys, counts = _unique_counts(torch.cat([keys, chunk_keys]), torch.cat([counts, torch.ones_like(chunk_keys)]))
        src_count += chunk_src
        tgt_count += chunk_tgt
        tgt_tokens += chunk_tokens
    s, t = keys // tgt_vocab, keys % tgt_vocab
    dice = 2.0 * counts / (src_count[s] + tgt_count[t])
    order = torch.sort(dice, descending=True, stable=True).indices
    order = order[torch.sort(s[order], stable=True).indices]  # by source, best association first
    s, t = s[order], t[order]
    starts = torch.searchsorted(s, s, side="left")
    rank = torch.arange(len(s)) - starts
    keep = rank < size
    table = torch.full((src_vocab, size), -1, dtype=torch.long)
    table[s[keep], rank[keep]] = t[keep]
    seen = tgt_tokens > 0
    frequent = torch.sort(tgt_tokens, descending=True, stable=True).indices[: int(seen.sum())]
    return Shortlist(table, frequent)


@dataclass
class OutputRows:
    """The output layer's weight and bias as tensors, taken once per model: an int8 layer keeps its weight
    packed, and unpacking all of it for every batch cost 18 ms (4% of fast beam-5 decoding)."""

    weight: torch.Tensor  # (V, O) float, or qint8 for an int8 layer
    bias: torch.Tensor  # (V,)

    @classmethod
    def of(cls, layer: nn.Module) -> OutputRows:
        if isinstance(layer, torch.ao.nn.quantized.dynamic.Linear):
            return cls(layer.weight(), layer.bias())
        # torch's stubs type a Module's attributes as Tensor | Module, so .detach reads as possibly not callable
        return cls(layer.weight.detach(), layer.bias.detach())  # type: ignore[operator]

    @torch.no_grad()
    def restricted(self, ids: torch.Tensor) -> OutputLayer:
        """The output layer cut to the rows of `ids`; an int8 layer's rows stay the same int8 values, packed once
        and multiplied as torch's dynamic int8 Linear does (its reduce_range for qint8). Not a new Linear
        module: its constructor packs a placeholder weight first (1.7 of 3.5 ms a batch); nor torch's
        uninitialised-module helper (skip_init), whose meta-device path imports sympy, 0.4 s of every
        decoding command's start."""
        rows, bias = self.weight.index_select(0, ids), self.bias.index_select(0, ids)
        if not rows.is_quantized:
            return partial(F.linear, weight=rows, bias=bias)
        packed = torch.ops.quantized.linear_prepack(rows, bias)
        return partial(torch.ops.quantized.linear_dynamic, W_prepack=packed, reduce_range=True)

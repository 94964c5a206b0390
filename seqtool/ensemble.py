"""Ensembles: several models with the same tokenizers decoding as one (`translate -m A -m B ...`).

At every step each member scores the next token from its own decoder state; the ensemble's scores are
the mean of the members' log-probabilities, renormalised: a product of experts (OpenNMT-py takes the
same mean), kept a distribution so that hypothesis scores, n-best lists and sampling read as for one
model. The search sees one Decodable, so greedy, beam search, sampling and every constraint work as
they do for a single model; a shortlist wraps each member (seqtool.shortlist.Shortlisted) before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from seqtool.search import Decodable, SearchState


@dataclass(frozen=True)
class EnsembleState:
    """The members' decoder states, rows kept and reordered together."""

    parts: tuple[SearchState, ...]

    @property
    def mask(self) -> torch.Tensor:
        return self.parts[0].mask  # the same sources for every member

    def grouped(self, group: int) -> EnsembleState:
        return EnsembleState(tuple(p.grouped(group) for p in self.parts))

    def select(self, index: torch.Tensor, sources: torch.Tensor) -> EnsembleState:
        return EnsembleState(tuple(p.select(index, sources) for p in self.parts))


@dataclass(frozen=True)
class Ensemble:
    members: Sequence[Decodable]

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> EnsembleState:
        return EnsembleState(tuple(m.encode(src, src_lens) for m in self.members))

    def step(self, prev: torch.Tensor, state: EnsembleState
             ) -> tuple[torch.Tensor, EnsembleState, Optional[torch.Tensor]]:
        """-> (the mean of the members' log-probabilities, renormalised; their states; the mean of their attention
        weights, None unless every member attends)."""
        steps = [m.step(prev, s) for m, s in zip(self.members, state.parts)]
        lp = torch.log_softmax(torch.stack([lp for lp, _, _ in steps]).mean(0), dim=-1)
        weights = [w for _, _, w in steps if w is not None]
        mean_weights = torch.stack(weights).mean(0) if len(weights) == len(steps) else None
        return lp, EnsembleState(tuple(s for _, s, _ in steps)), mean_weights

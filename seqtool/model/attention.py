"""Attention scores over encoder states: additive (Bahdanau), dot and general (Luong)."""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """score(q, h): additive v·tanh(Wq q + Wk h); dot q·h; general q·(W h).

    Keys are projected once per source (`keys`), then every decoder step reuses them.
    Queries may be one step (B, Q) or all steps at once (B, T, Q).
    """

    def __init__(self, kind: str, query_size: int, key_size: int):
        super().__init__()
        self.kind = kind
        if kind == "additive":
            self.key_proj = nn.Linear(key_size, query_size, bias=False)
            self.query_proj = nn.Linear(query_size, query_size, bias=True)
            self.v = nn.Linear(query_size, 1, bias=False)
        elif kind == "general":
            self.key_proj = nn.Linear(key_size, query_size, bias=False)
        elif kind == "dot":
            assert key_size == query_size, "dot attention needs equal query and key sizes"
        else:
            raise ValueError(kind)

    def keys(self, states: torch.Tensor) -> torch.Tensor:
        if self.kind == "additive":
            return 2.0 * self.key_proj(states)  # see forward: the additive scores work on doubled sums
        return states if self.kind == "dot" else self.key_proj(states)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (context, weights): context (B, [T,] K), weights (B, [T,] S)."""
        one_step = query.dim() == 2
        q = query.unsqueeze(1) if one_step else query  # (B, T, Q)
        if self.kind == "additive":
            # v.tanh(x) = 2 v.sigmoid(2x) - sum(v), and softmax ignores the constant: sigmoid is 3x faster
            # than tanh on the CPU, and this (B, T, S, Q) tensor is the largest one of a decoder step: one
            # temporary, sigmoid in place (backward needs only its output).
            hidden = torch.add(keys.unsqueeze(1), self.query_proj(q).unsqueeze(2), alpha=2.0).sigmoid_()
            scores = 2.0 * self.v(hidden).squeeze(-1)
        else:
            scores = torch.bmm(q, keys.transpose(1, 2))  # (B, T, S)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)  # statistics in fp32 (bf16)
        context = torch.bmm(weights, values)  # (B, T, K)
        if one_step:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights

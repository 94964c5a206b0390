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
        return states if self.kind == "dot" else self.key_proj(states)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (context, weights): context (B, [T,] K), weights (B, [T,] S)."""
        one_step = query.dim() == 2
        q = query.unsqueeze(1) if one_step else query  # (B, T, Q)
        if self.kind == "additive":
            hidden = torch.tanh(self.query_proj(q).unsqueeze(2) + keys.unsqueeze(1))  # (B, T, S, Q)
            scores = self.v(hidden).squeeze(-1)
        else:
            scores = torch.bmm(q, keys.transpose(1, 2))  # (B, T, S)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights, values)  # (B, T, K)
        if one_step:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights

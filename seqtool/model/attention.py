"""Attention scores over encoder states: additive (Bahdanau), dot and general (Luong)."""

from __future__ import annotations

import torch
from torch import nn


def _additive_hidden(keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sigmoid(keys + 2 q), broadcast to (B, T, S, Q): one temporary, sigmoid in place."""
    return torch.add(keys, q, alpha=2.0).sigmoid_()


class _AdditiveScores(torch.autograd.Function):
    """2 v.sigmoid(keys + 2 q) for keys (B, 1, S, Q) and queries (B, T, 1, Q) -> (B, T, S), without keeping the
    (B, T, S, Q) sigmoid for the backward pass: it is recomputed there from keys and queries, which costs an add
    and a sigmoid more per call (Attention.forward's `recompute`)."""

    @staticmethod
    def forward(ctx, keys: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(keys, q, v)
        return 2.0 * (_additive_hidden(keys, q) @ v.t()).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keys, q, v = ctx.saved_tensors
        hidden = _additive_hidden(keys, q)
        grad = 2.0 * grad.unsqueeze(-1)  # (B, T, S, 1)
        grad_v = (grad.flatten(0, 2).t() @ hidden.flatten(0, 2)) if ctx.needs_input_grad[2] else None
        grad_x = torch.ops.aten.sigmoid_backward(grad * v, hidden)  # d/dx of sigmoid(x), x = keys + 2 q
        grad_keys = None
        if ctx.needs_input_grad[0]:
            grad_keys = grad_x if keys.size(1) == grad_x.size(1) else grad_x.sum(1, keepdim=True)  # no copy for T = 1
        grad_q = 2.0 * grad_x.sum(2, keepdim=True) if ctx.needs_input_grad[1] else None
        return grad_keys, grad_q, grad_v


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

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (context, weights): context (B, [T,] K), weights (B, [T,] S). `recompute`: additive scores keep
        nothing of size (B, T, S, Q) for the backward pass (see Decoder.forward for when that pays)."""
        one_step = query.dim() == 2
        q = query.unsqueeze(1) if one_step else query  # (B, T, Q)
        if self.kind == "additive":
            # v.tanh(x) = 2 v.sigmoid(2x) - sum(v), and softmax ignores the constant: sigmoid is 3x faster
            # than tanh on the CPU, and this (B, T, S, Q) tensor is the largest one of a decoder step: one
            # temporary, sigmoid in place (backward needs only its output, or with `recompute` nothing).
            k, q = keys.unsqueeze(1), self.query_proj(q).unsqueeze(2)
            if recompute:
                scores = _AdditiveScores.apply(k, q, self.v.weight)
            else:
                scores = 2.0 * self.v(_additive_hidden(k, q)).squeeze(-1)
        else:
            scores = torch.bmm(q, keys.transpose(1, 2))  # (B, T, S)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)  # statistics in fp32 (bf16)
        context = torch.bmm(weights, values)  # (B, T, K)
        if one_step:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights

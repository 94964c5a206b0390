"""Target ids -> output features, with the source reaching the decoder in one of three ways.

- init: the encoder's final state, through a bridge, is the decoder's initial state only.
- every_step: that fixed context also enters every decoder step and the output layer (Cho et al.).
- attention: a context recomputed each step from all encoder states; `bahdanau` queries with the
  previous state and feeds the context into the RNN, `luong_*` queries with the current state and
  may feed the attentional vector to the next step (input feeding).
Modes without a step-to-step dependency outside the RNN run over the whole target in one call;
`bahdanau` loops over attention and the RNN only, and computes every step's output features at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union, cast

import torch
from torch import nn

from seqtool.model.attention import Attention
from seqtool.model.dropout import Dropout
from seqtool.model.encoder import EncoderOutput, make_rnn


@dataclass
class DecoderState:
    """Everything one decoder step needs. Rows (hypotheses) are dim 1 of hidden/cell and dim 0 of feed; the
    source side is kept once per sentence, dim 0, and serves `group` consecutive rows (beam search's K)."""

    hidden: torch.Tensor  # (L, B * group, H)
    cell: Optional[torch.Tensor]  # (L, B * group, H) for LSTM
    feed: Optional[torch.Tensor]  # (B * group, O) previous attentional vector (input feeding)
    context: torch.Tensor  # (B, K) fixed context (every_step), unused with attention
    states: torch.Tensor  # (B, S, K) encoder states
    keys: Optional[torch.Tensor]  # (B, S, *) attention keys, projected once
    mask: torch.Tensor  # (B, S)
    src: Optional[torch.Tensor] = None  # (B, S) source ids, kept for copying
    group: int = 1  # rows per sentence

    def grouped(self, group: int) -> DecoderState:
        """Each sentence's row repeated `group` times; the source side is not copied (beams share it)."""
        assert self.group == 1
        index = torch.arange(self.hidden.size(1), device=self.hidden.device).repeat_interleave(group)
        return replace(self._rows(index), group=group)

    def select(self, index: torch.Tensor) -> DecoderState:
        """Keep / reorder rows (greedy drops finished sentences, beam search reorders hypotheses): `group`
        consecutive entries of `index` per kept sentence, all rows of that one sentence."""
        state = self._rows(index)
        sents = index[:: self.group] // self.group if self.group > 1 else index
        changes = {}
        for name in ("context", "states", "keys", "mask", "src"):
            value = getattr(state, name)
            if value is not None:
                changes[name] = value.index_select(0, sents)
        return replace(state, **changes)

    def _rows(self, index: torch.Tensor) -> DecoderState:
        changes = {}
        for name, dim in (("hidden", 1), ("cell", 1), ("feed", 0)):
            value = getattr(self, name)
            if value is not None:
                changes[name] = value.index_select(dim, index)
        return replace(self, **changes)

    def per_row(self, value: torch.Tensor) -> torch.Tensor:
        """A source-side tensor (B, ...) repeated for the rows (B * group, ...)."""
        return value if self.group == 1 else value.repeat_interleave(self.group, dim=0)


class Decoder(nn.Module):
    def __init__(self, embed: nn.Embedding, cell: str, hidden_size: int, layers: int, enc_size: int,
                 context: str, attention: str, input_feeding: bool, output_size: int, dropout: float):
        super().__init__()
        self.embed = embed
        self.mode = context
        self.cell = cell
        self.layers = layers
        self.hidden_size = hidden_size
        self.output_size = output_size
        emb = embed.embedding_dim
        self.luong = context == "attention" and attention != "bahdanau"
        self.bahdanau = context == "attention" and attention == "bahdanau"
        self.input_feeding = self.luong and input_feeding

        self.bridge = nn.Linear(enc_size, layers * hidden_size)
        self.cell_bridge = nn.Linear(enc_size, layers * hidden_size) if cell == "lstm" else None

        rnn_in = (emb + (enc_size if context != "init" and not self.luong else 0)
                  + (output_size if self.input_feeding else 0))
        self.rnn = make_rnn(cell, rnn_in, hidden_size, layers, dropout)
        if context == "attention":
            kind = {"bahdanau": "additive", "luong_concat": "additive", "luong_dot": "dot",
                    "luong_general": "general"}[attention]
            self.attention = Attention(kind, hidden_size, enc_size)
        if self.luong:
            out_in = hidden_size + enc_size  # attentional vector tanh(W [c_t; s_t])
        elif context == "init":
            out_in = hidden_size + emb
        else:
            out_in = hidden_size + enc_size + emb
        self.pre_output = nn.Linear(out_in, output_size)
        # On the embeddings and the output features only (as OpenNMT-py): dropping the RNN outputs as well
        # learned slower at equal time on Multi30k (docs/performance.md).
        self.dropout = Dropout(dropout)

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        B = enc.final.size(0)
        hidden = torch.tanh(self.bridge(enc.final)).view(B, self.layers, self.hidden_size).transpose(0, 1).contiguous()
        cell = None
        if self.cell_bridge is not None:
            cell = (torch.tanh(self.cell_bridge(enc.final_cell)).view(B, self.layers, self.hidden_size)
                    .transpose(0, 1).contiguous())
        feed = enc.final.new_zeros(B, self.output_size) if self.input_feeding else None
        keys = self.attention.keys(enc.states) if self.mode == "attention" else None
        return DecoderState(hidden, cell, feed, enc.final, enc.states, keys, enc.mask)

    def _run_rnn(self, x: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        h0 = state.hidden if state.cell is None else (state.hidden, state.cell)
        out, h = self.rnn(x, h0)
        hidden, cell = h if isinstance(h, tuple) else (h, None)
        return out, replace(state, hidden=hidden, cell=cell)

    def _attend(self, query: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention for query rows (B * group, Q), or all steps (B, T, Q) when group is 1: a sentence's rows are
        its "time" axis, so its encoder states serve them all without copies -> context and weights, per row."""
        if state.group == 1:
            return self.attention(query, state.keys, state.states, state.mask)
        ctx, weights = self.attention(query.view(-1, state.group, query.size(-1)), state.keys, state.states, state.mask)
        return ctx.flatten(0, 1), weights.flatten(0, 1)

    def _features(self, emb: torch.Tensor, s: torch.Tensor, state: DecoderState,
                  attn_ctx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decoder outputs s (B, [T,] H) -> output features (B, [T,] O) and attention weights."""
        weights = None
        if self.luong:
            ctx, weights = self._attend(s, state)
            feats = [ctx, s]
        elif self.bahdanau:
            assert attn_ctx is not None  # the Bahdanau paths attend before the RNN and pass its context
            feats = [s, attn_ctx, emb]
        elif self.mode == "every_step":
            ctx = state.per_row(state.context) if s.dim() == 2 else state.context.unsqueeze(1).expand(-1, s.size(1), -1)
            feats = [s, ctx, emb]
        else:
            feats = [s, emb]
        return torch.tanh(self.pre_output(torch.cat(feats, dim=-1))), weights

    def _bahdanau_rnn_step(self, emb: torch.Tensor, state: DecoderState
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DecoderState]:
        """Attend with the previous state, then one RNN step: emb (B, E) -> (out (B, 1, H), context, weights, state)."""
        attn_ctx, weights = self._attend(state.hidden[-1], state)
        out, state = self._run_rnn(torch.cat([emb, attn_ctx], dim=-1).unsqueeze(1), state)
        return out, attn_ctx, weights, state

    def step(self, prev: torch.Tensor,
             state: DecoderState) -> tuple[torch.Tensor, DecoderState, Optional[torch.Tensor]]:
        """One step for a batch of previous tokens (B,) -> (features (B, O), new state, attention weights)."""
        emb = self.dropout(self.embed(prev))
        weights: Optional[torch.Tensor]
        if self.bahdanau:
            out, attn_ctx, weights, state = self._bahdanau_rnn_step(emb, state)
            feats, _ = self._features(emb, out.squeeze(1), state, attn_ctx)
            return self.dropout(feats), state, weights
        inputs, weights = [emb], None
        if self.mode == "every_step":
            inputs.append(state.per_row(state.context))
        if self.input_feeding:
            inputs.append(state.feed)
        out, state = self._run_rnn(torch.cat(inputs, dim=-1).unsqueeze(1), state)
        feats, weights = self._features(emb, out.squeeze(1), state)
        if self.input_feeding:
            state = replace(state, feed=feats)
        return self.dropout(feats), state, weights

    def forward(self, tgt_in: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Teacher-forced features for a whole target (B, T) -> (B, T, O), and the attention weights
        (B, T, S) with context attention, else None."""
        weights: Union[list[Optional[torch.Tensor]], Optional[torch.Tensor]]  # per step in the loops, or all steps
        if self.input_feeding:
            outs, weights = [], []
            for t in range(tgt_in.size(1)):
                feats, state, w = self.step(tgt_in[:, t], state)
                outs.append(feats)
                weights.append(w)
            # input feeding is for luong_* attention only (ModelConfig): every step has weights
            return torch.stack(outs, dim=1), torch.stack(cast(list[torch.Tensor], weights), dim=1)
        emb = self.dropout(self.embed(tgt_in))
        if self.bahdanau:
            # Only attention and the RNN recur; the output features of all steps are one matrix product after.
            outs, contexts, weights = [], [], []
            for emb_t in emb.unbind(1):  # not emb[:, t]: each slice's backward would zero a whole (B, T, E) gradient
                out, attn_ctx, w, state = self._bahdanau_rnn_step(emb_t, state)
                outs.append(out)
                contexts.append(attn_ctx)
                weights.append(w)
            feats, _ = self._features(emb, torch.cat(outs, dim=1), state, torch.stack(contexts, dim=1))
            return self.dropout(feats), torch.stack(cast(list[torch.Tensor], weights), dim=1)
        x = emb
        if self.mode == "every_step":
            x = torch.cat([emb, state.context.unsqueeze(1).expand(-1, emb.size(1), -1)], dim=-1)
        out, state = self._run_rnn(x, state)
        feats, weights = self._features(emb, out, state)
        return self.dropout(feats), weights

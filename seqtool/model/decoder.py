"""Target ids -> output features, with the source reaching the decoder in one of three ways.

- init: the context vector c is the decoder's initial state only (Sutskever et al.).
- every_step: c also enters every decoder step and the output layer; the first state is tanh(V c) (Cho et al.).
- attention: a context recomputed each step from all encoder states; `bahdanau` queries with the
  previous state and feeds the context into the RNN, `luong_*` queries with the current state and
  may feed the attentional vector to the next step (input feeding). The first state is tanh(V c).
Each is a `Mode` in MODES: what its steps' RNN input and its output layer read, and where its context
comes from; the decoder's code is the same for all. Modes without a step-to-step dependency outside the
RNN run over the whole target in one call; `bahdanau` loops over attention and the RNN only, and computes
every step's output features at once; input feeding runs step by step.

c is formed from the encoder states h_1..h_T in one of four ways (`model.context_vector`; the tutorials'
c = h_T, c = g(h_T), c = g(h_1, ..., h_T)): `last` (h_T), `last_transform` (tanh(W h_T)), `mean` or `max`
(over the real tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, cast

import torch
from torch import nn

from seqtool.config import ContextVector
from seqtool.model.attention import Attention
from seqtool.model.dropout import Dropout
from seqtool.model.encoder import EncoderOutput, make_rnn


def pooled(enc: EncoderOutput, how: ContextVector) -> torch.Tensor:
    """The encoder's states -> one vector a sentence (B, K): the last state h_T (both directions' last), or the
    mean or the max over the real tokens' states (padding never counts)."""
    if how == "mean":
        real = enc.mask.unsqueeze(-1).to(enc.states.dtype)
        return (enc.states * real).sum(1) / real.sum(1)
    if how == "max":
        return enc.states.masked_fill(~enc.mask.unsqueeze(-1), float("-inf")).amax(1)
    return enc.final


@dataclass
class DecoderState:
    """Everything one decoder step needs. Rows (hypotheses) are dim 1 of hidden/cell and dim 0 of feed; the
    source side is kept once per sentence, dim 0, and serves `group` consecutive rows (beam search's K)."""

    hidden: torch.Tensor  # (L, B * group, H)
    cell: Optional[torch.Tensor]  # (L, B * group, H) for LSTM
    feed: Optional[torch.Tensor]  # (B * group, O) previous attentional vector (input feeding)
    context: torch.Tensor  # (B, K) the context vector c (every_step reads it), unused with attention
    states: torch.Tensor  # (B, S, K) encoder states
    keys: Optional[torch.Tensor]  # (B, S, *) attention keys, projected once
    mask: torch.Tensor  # (B, S)
    src: Optional[torch.Tensor] = None  # (B, S) source ids, kept for copying
    allowed: Optional[torch.Tensor] = None  # (B, V) the output tokens each sentence may take (a shortlist's)
    group: int = 1  # rows per sentence
    recompute: bool = False  # attention keeps no (rows, S, Q) tensor for the backward pass (Decoder.forward)

    def grouped(self, group: int) -> DecoderState:
        """Each sentence's row repeated `group` times; the source side is not copied (beams share it)."""
        assert self.group == 1
        index = torch.arange(self.hidden.size(1), device=self.hidden.device).repeat_interleave(group)
        return replace(self._rows(index), group=group)

    def select(self, index: torch.Tensor, sources: torch.Tensor) -> DecoderState:
        """Keep / reorder rows (greedy drops finished sentences, beam search reorders hypotheses): row r of the
        result is row index[r]; `sources` are the kept sentences' positions on the source side, in order, each
        serving `group` consecutive rows of the result (all of them rows of that sentence)."""
        assert len(index) == len(sources) * self.group
        state = self._rows(index)
        changes = {}
        for name in ("context", "states", "keys", "mask", "src", "allowed"):
            value = getattr(state, name)
            if value is not None:
                changes[name] = value.index_select(0, sources)
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


@dataclass(frozen=True)
class Mode:
    """One way the source reaches the decoder. `context` says which source context a step has: none, the
    encoder's fixed summary, or attention queried with the previous state before the RNN step (Bahdanau) or
    with the RNN's output after it (Luong). `rnn_reads` and `features` name, in order, what the RNN input and
    the output layer concatenate: "emb" (the target embedding), "ctx" (the context), "out" (the RNN output),
    "feed" (the previous step's features: input feeding). `score` is the attention's scoring function."""

    context: Literal["none", "fixed", "before", "after"]
    rnn_reads: tuple[str, ...]
    features: tuple[str, ...]
    score: Optional[Literal["additive", "dot", "general"]] = None


# model.context, or model.attention for context attention -> its mode; input feeding adds "feed" (Luong only)
MODES = {
    "init": Mode("none", ("emb",), ("out", "emb")),
    "every_step": Mode("fixed", ("emb", "ctx"), ("out", "ctx", "emb")),
    "bahdanau": Mode("before", ("emb", "ctx"), ("out", "ctx", "emb"), "additive"),
    "luong_concat": Mode("after", ("emb",), ("ctx", "out"), "additive"),
    "luong_dot": Mode("after", ("emb",), ("ctx", "out"), "dot"),
    "luong_general": Mode("after", ("emb",), ("ctx", "out"), "general"),
}


def mode_of(context: str, attention: str, input_feeding: bool) -> Mode:
    mode = MODES[attention if context == "attention" else context]
    assert not input_feeding or mode.context == "after"  # ModelConfig allows input feeding for luong_* only
    return replace(mode, rnn_reads=(*mode.rnn_reads, "feed")) if input_feeding else mode


KEPT_FOR_BACKWARD = 96 << 20  # bytes of additive-attention activations a batch keeps; more are recomputed


class Decoder(nn.Module):
    def __init__(self, embed: nn.Embedding, cell: str, hidden_size: int, layers: int, enc_size: int, mode: Mode,
                 output_size: int, dropout: float, context_vector: ContextVector):
        super().__init__()
        self.embed = embed
        self.mode = mode
        self.layers = layers
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.input_feeding = "feed" in mode.rnn_reads
        sizes = {"emb": embed.embedding_dim, "ctx": enc_size, "out": hidden_size, "feed": output_size}

        self.context_vector = context_vector
        # init with last_transform: c = tanh(W h_T) is the first state itself, so W is the bridge (as model files
        # before context_vector have it); init with another c starts at c (ModelConfig checks the sizes).
        init = mode.context == "none"
        starts_at_c = init and context_vector != "last_transform"
        self.transform = nn.Linear(enc_size, enc_size) if context_vector == "last_transform" and not init else None
        self.bridge = None if starts_at_c else nn.Linear(enc_size, layers * hidden_size)
        lstm_bridge = cell == "lstm" and self.bridge is not None
        self.cell_bridge = nn.Linear(enc_size, layers * hidden_size) if lstm_bridge else None
        self.lstm = cell == "lstm"
        self.rnn = make_rnn(cell, sum(sizes[x] for x in mode.rnn_reads), hidden_size, layers, dropout)
        if mode.score is not None:
            self.attention = Attention(mode.score, hidden_size, enc_size)
        self.pre_output = nn.Linear(sum(sizes[x] for x in mode.features), output_size)
        # On the embeddings and the output features only (as OpenNMT-py): dropping the RNN outputs as well
        # learned slower at equal time on Multi30k (docs/performance.md).
        self.dropout = Dropout(dropout)

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        B = enc.final.size(0)
        c = pooled(enc, self.context_vector)
        if self.transform is not None:
            c = torch.tanh(self.transform(c))
        cell: Optional[torch.Tensor] = None
        if self.bridge is None:  # every layer starts at c; an LSTM's memory at h_T's cell (last) or empty
            hidden = self._per_layer(c)
            if self.lstm:
                assert enc.final_cell is not None  # an LSTM encoder keeps its cell
                cell = self._per_layer(enc.final_cell if self.context_vector == "last" else torch.zeros_like(c))
        else:
            hidden = self._split_layers(torch.tanh(self.bridge(c)))
            if self.cell_bridge is not None:
                cell = self._split_layers(torch.tanh(self.cell_bridge(enc.final_cell)))
        feed = enc.final.new_zeros(B, self.output_size) if self.input_feeding else None
        keys = self.attention.keys(enc.states) if self.mode.score is not None else None
        return DecoderState(hidden, cell, feed, c, enc.states, keys, enc.mask)

    def _split_layers(self, x: torch.Tensor) -> torch.Tensor:
        """(B, layers * H) -> (layers, B, H)."""
        return x.view(x.size(0), self.layers, self.hidden_size).transpose(0, 1).contiguous()

    def _per_layer(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H) -> (layers, B, H), the same for every layer."""
        return x.unsqueeze(0).expand(self.layers, -1, -1).contiguous()

    def _run_rnn(self, x: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        h0 = state.hidden if state.cell is None else (state.hidden, state.cell)
        out, h = self.rnn(x, h0)
        hidden, cell = h if isinstance(h, tuple) else (h, None)
        return out, replace(state, hidden=hidden, cell=cell)

    def _attend(self, query: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention for query rows (B * group, Q), or all steps (B, T, Q) when group is 1: a sentence's rows are
        its "time" axis, so its encoder states serve them all without copies -> context and weights, per row."""
        if state.group == 1:
            return self.attention(query, state.keys, state.states, state.mask, state.recompute)
        ctx, weights = self.attention(query.view(-1, state.group, query.size(-1)), state.keys, state.states, state.mask)
        return ctx.flatten(0, 1), weights.flatten(0, 1)

    @staticmethod
    def _fixed(state: DecoderState, like: torch.Tensor) -> torch.Tensor:
        """The fixed context for rows like `like`: one step (B * group, E) or all steps (B, T, E)."""
        if like.dim() == 2:
            return state.per_row(state.context)
        return state.context.unsqueeze(1).expand(-1, like.size(1), -1)

    def _features(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the mode's output layer reads, one step (B, *) or all steps (B, T, *) -> features (B, [T,] O)."""
        return torch.tanh(self.pre_output(_joined(parts, self.mode.features)))

    def step(self, prev: torch.Tensor,
             state: DecoderState) -> tuple[torch.Tensor, DecoderState, Optional[torch.Tensor]]:
        """One step for a batch of previous tokens (B,) -> (features (B, O), new state, attention weights)."""
        parts, weights, state = self._rnn_step(self.dropout(self.embed(prev)), state)
        if self.mode.context == "after":
            parts["ctx"], weights = self._attend(parts["out"], state)
        feats = self._features(parts)
        if self.input_feeding:
            state = replace(state, feed=feats)
        return self.dropout(feats), state, weights

    def _rnn_step(self, emb: torch.Tensor, state: DecoderState
                  ) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor], DecoderState]:
        """One RNN step on what the mode reads, the embedding emb (B, E) first -> (the parts so far, with the RNN
        output "out" (B, H); attention weights when attended before the step; the new state)."""
        parts, weights = self._before_rnn(emb, state)
        out, state = self._run_rnn(_joined(parts, self.mode.rnn_reads).unsqueeze(1), state)
        parts["out"] = out.squeeze(1)
        return parts, weights, state

    def _before_rnn(self, emb: torch.Tensor, state: DecoderState
                    ) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """A step's inputs known before its RNN step: the embedding, the previous features, the fixed context or
        the attention queried with the previous state -> (parts, attention weights)."""
        parts, weights = {"emb": emb}, None
        if self.input_feeding:
            assert state.feed is not None  # init_state makes it for input feeding
            parts["feed"] = state.feed
        if self.mode.context == "fixed":
            parts["ctx"] = self._fixed(state, emb)
        elif self.mode.context == "before":
            parts["ctx"], weights = self._attend(state.hidden[-1], state)
        return parts, weights

    def forward(self, tgt_in: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Teacher-forced features for a whole target (B, T) -> (B, T, O), and the attention weights
        (B, T, S) with context attention, else None."""
        if self.mode.score == "additive" and torch.is_grad_enabled():
            # Additive attention keeps a (B, S, Q) tensor per target step for the backward pass: on the longest
            # 256-sentence Multi30k batch (48 x 36 tokens) 453 MB in bf16, most of a step's peak memory. Beyond
            # KEPT_FOR_BACKWARD it is recomputed in the backward pass instead, which made bf16 training 7% slower
            # when done for every batch, so short batches keep it (docs/performance.md).
            assert state.keys is not None  # init_state projects keys for every attention mode
            kept = tgt_in.numel() * state.keys.shape[1:].numel() * state.keys.element_size()
            state = replace(state, recompute=kept > KEPT_FOR_BACKWARD)
        if self.input_feeding:  # each step reads the last one's features: step by step
            outs, weights = [], []
            for t in range(tgt_in.size(1)):
                feats, state, step_w = self.step(tgt_in[:, t], state)
                outs.append(feats)
                weights.append(cast(torch.Tensor, step_w))  # input feeding is for attention: each step has weights
            return torch.stack(outs, dim=1), torch.stack(weights, dim=1)
        emb = self.dropout(self.embed(tgt_in))
        w: Optional[torch.Tensor]
        if self.mode.context == "before":
            # Only attention and the RNN recur; the output features of all steps are one matrix product after.
            outs, contexts, ws = [], [], []
            for emb_t in emb.unbind(1):  # not emb[:, t]: each slice's backward would zero a whole (B, T, E) gradient
                parts, w, state = self._rnn_step(emb_t, state)
                outs.append(parts["out"])
                contexts.append(parts["ctx"])
                ws.append(cast(torch.Tensor, w))
            parts = {"emb": emb, "out": torch.stack(outs, dim=1), "ctx": torch.stack(contexts, dim=1)}
            return self.dropout(self._features(parts)), torch.stack(ws, dim=1)
        # Nothing outside the RNN recurs: the whole target in one RNN call.
        parts, w = self._before_rnn(emb, state)
        out, state = self._run_rnn(_joined(parts, self.mode.rnn_reads), state)
        parts["out"] = out
        if self.mode.context == "after":
            parts["ctx"], w = self._attend(out, state)
        return self.dropout(self._features(parts)), w


def _joined(parts: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    """The named parts side by side on the last axis (one part is passed as it is: no copy)."""
    return parts[names[0]] if len(names) == 1 else torch.cat([parts[x] for x in names], dim=-1)

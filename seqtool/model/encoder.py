"""Source ids -> encoder states: an embedding and a GRU, LSTM or Elman RNN over packed sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqtool.model.dropout import Dropout
from seqtool.tokenizer import PAD

RNN_CELLS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


def make_rnn(cell: str, input_size: int, hidden_size: int, layers: int, dropout: float,
             bidirectional: bool = False) -> nn.RNNBase:
    return RNN_CELLS[cell](
        input_size, hidden_size, num_layers=layers, batch_first=True,
        dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional,
    )


@dataclass
class EncoderOutput:
    states: torch.Tensor  # (B, S, K) top-layer states, both directions concatenated
    mask: torch.Tensor  # (B, S) True at real tokens
    final: torch.Tensor  # (B, K) last state of the top layer, both directions concatenated
    final_cell: Optional[torch.Tensor]  # (B, K) LSTM cell state of the top layer, else None


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, layers: int,
                 bidirectional: bool, cell: str, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding_size, padding_idx=PAD)
        self.rnn = make_rnn(cell, embedding_size, hidden_size, layers, dropout, bidirectional)
        self.dropout = Dropout(dropout)  # on the embeddings; not on the states, which the attention reads
        self.directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.directions

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor) -> EncoderOutput:
        x = self.dropout(self.embed(src))
        packed = pack_padded_sequence(x, src_lens.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.rnn(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        cell = None
        if isinstance(final, tuple):
            final, cell = final
        return EncoderOutput(
            states=states,
            mask=src != PAD,
            final=self._top_layer(final),
            final_cell=None if cell is None else self._top_layer(cell),
        )

    def _top_layer(self, h: torch.Tensor) -> torch.Tensor:
        """(layers * directions, B, H) -> (B, directions * H) for the top layer."""
        return torch.cat(list(h[-self.directions:]), dim=-1)

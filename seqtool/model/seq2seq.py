"""Seq2Seq = embeddings -> encoder -> bridge -> decoder -> output layer (+ copy gate); built from a ModelConfig."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from seqtool.config import ModelConfig
from seqtool.model.decoder import Decoder, DecoderState, mode_of
from seqtool.model.encoder import Encoder
from seqtool.model.loss import linear_cross_entropy
from seqtool.tokenizer import PAD

OutputLayer = Callable[[torch.Tensor], torch.Tensor]  # the output layer, or a shortlist's cut of it: features -> scores


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab: int, tgt_vocab: int):
        super().__init__()
        self.encoder = Encoder(src_vocab, cfg.embedding_size, cfg.encoder_hidden_size, cfg.encoder_layers,
                               cfg.bidirectional, cfg.cell, cfg.dropout)
        output_size = cfg.embedding_size if cfg.tie_embeddings else cfg.hidden_size
        tgt_embed = nn.Embedding(tgt_vocab, cfg.embedding_size, padding_idx=PAD)
        self.decoder = Decoder(tgt_embed, cfg.cell, cfg.hidden_size, cfg.decoder_layers, self.encoder.output_size,
                               mode_of(cfg.context, cfg.attention, cfg.input_feeding), output_size, cfg.dropout,
                               cfg.c_form)
        self.output = nn.Linear(output_size, tgt_vocab)
        # Copying writes attention mass onto source ids as target ids: one shared vocabulary.
        assert not cfg.copy_source or src_vocab == tgt_vocab, "model.copy_source needs a joint vocabulary"
        self.copy_gate = nn.Linear(output_size, 1) if cfg.copy_source else None
        if cfg.tie_embeddings:
            self.output.weight = tgt_embed.weight
        self._initialise(cfg)

    @torch.no_grad()
    def _initialise(self, cfg: ModelConfig) -> None:
        if cfg.init_scale > 0:
            # Torch starts embeddings at N(0, 1) and each layer at its own scale; one small uniform range (as
            # OpenNMT-py) learned much faster per step on Multi30k (docs/performance.md, "Initialisation").
            for p in self.parameters():
                p.uniform_(-cfg.init_scale, cfg.init_scale)
        elif cfg.tie_embeddings:
            # Shared with the output layer: nn.Embedding's N(0, 1) start would make the first logits about
            # sqrt(embedding_size) times too large (measured on AESLC: training loss above the uniform one).
            nn.init.normal_(self.decoder.embed.weight, std=cfg.embedding_size ** -0.5)
        for embed in (self.encoder.embed, self.decoder.embed):
            embed.weight[PAD].zero_()

    @property
    def device(self) -> torch.device:
        return self.decoder.embed.weight.device  # an embedding: quantized linear layers hold no .weight tensor

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor, vocab: Optional[torch.Tensor] = None) -> DecoderState:
        """Encoder states and the decoder's first state; with a shortlist `vocab` (sorted target ids holding
        every source id), copying writes onto the source ids' positions in it."""
        state = self.decoder.init_state(self.encoder(src, src_lens))
        if self.copy_gate is None:
            return state
        return replace(state, src=src if vocab is None else torch.searchsorted(vocab, src))

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor,
                tgt_out: Optional[torch.Tensor] = None, label_smoothing: float = 0.0) -> torch.Tensor:
        """Teacher-forced scores (B, T, V): logits, or log-probabilities with copy (cross-entropy treats
        both alike: log_softmax leaves log-probabilities unchanged). Given `tgt_out`, the summed token
        cross-entropy instead (padding ignored; softmax and sum in fp32 whatever the forward pass ran in)."""
        state = self.encode(src, src_lens)
        feats, weights = self.decoder(tgt_in, state)
        if tgt_out is not None and self.copy_gate is None and not torch.is_autocast_enabled(feats.device.type):
            real = tgt_out != PAD  # padding never reaches the output layer
            return linear_cross_entropy(feats[real], self.output.weight, self.output.bias, tgt_out[real],
                                        label_smoothing)
        if self.copy_gate is None:
            scores = self.output(feats)
        else:
            assert weights is not None and state.src is not None  # copy_source: context attention; encode kept src
            scores = self._copy_log_probs(feats, weights, state.src)
        if tgt_out is None:
            return scores
        return F.cross_entropy(scores.float().flatten(0, 1), tgt_out.flatten(), ignore_index=PAD,
                               label_smoothing=label_smoothing, reduction="sum")

    def step(self, prev: torch.Tensor, state: DecoderState, output: Optional[OutputLayer] = None
             ) -> tuple[torch.Tensor, DecoderState, Optional[torch.Tensor]]:
        """One decoding step: previous tokens (B,) -> (log-probabilities (B, V), state, attention weights);
        `output` replaces the output layer (a shortlist's, V = its size)."""
        feats, state, weights = self.decoder.step(prev, state)
        output = self.output if output is None else output
        if self.copy_gate is None:
            return torch.log_softmax(output(feats), dim=-1, dtype=torch.float32), state, weights  # fp32 scores
        assert weights is not None and state.src is not None  # copy_source: context attention; encode kept src
        return self._copy_log_probs(feats, weights, state.per_row(state.src), output), state, weights

    def _copy_log_probs(self, feats: torch.Tensor, weights: torch.Tensor, src: torch.Tensor,
                        output: Optional[OutputLayer] = None) -> torch.Tensor:
        """Pointer-generator (See et al., 2017): p = g * softmax(output) + (1 - g) * attention summed per
        source id, with the gate g = sigmoid(w . features); features (B, [T,] O), weights (B, [T,] S)."""
        assert self.copy_gate is not None  # called only for copy_source models
        gate = torch.sigmoid(self.copy_gate(feats).float())
        probs = gate * torch.softmax((self.output if output is None else output)(feats).float(), dim=-1)
        ids = src if weights.dim() == 2 else src.unsqueeze(1).expand(-1, weights.size(1), -1)
        probs = probs.scatter_add(-1, ids, (1.0 - gate) * weights.float())
        return torch.log(probs.clamp_min(1e-12))


def build_model(cfg: ModelConfig, src_vocab: int, tgt_vocab: int) -> Seq2Seq:
    """A model for a validated config (ModelConfig rejects impossible combinations when it is built)."""
    return Seq2Seq(cfg, src_vocab, tgt_vocab)

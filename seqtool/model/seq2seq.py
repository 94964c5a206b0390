"""Seq2Seq = embeddings -> encoder -> bridge -> decoder -> output layer; built from a ModelConfig."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from seqtool.config import ModelConfig
from seqtool.errors import ConfigError
from seqtool.model.decoder import Decoder, DecoderState
from seqtool.model.encoder import Encoder
from seqtool.tokenizer import PAD


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab: int, tgt_vocab: int):
        super().__init__()
        self.encoder = Encoder(src_vocab, cfg.embedding_size, cfg.encoder_hidden_size, cfg.encoder_layers,
                               cfg.bidirectional, cfg.cell, cfg.dropout)
        output_size = cfg.embedding_size if cfg.tie_embeddings else cfg.hidden_size
        tgt_embed = nn.Embedding(tgt_vocab, cfg.embedding_size, padding_idx=PAD)
        self.decoder = Decoder(tgt_embed, cfg.cell, cfg.hidden_size, cfg.decoder_layers, self.encoder.output_size,
                               cfg.context, cfg.attention, cfg.input_feeding, output_size, cfg.dropout)
        self.output = nn.Linear(output_size, tgt_vocab)
        if cfg.tie_embeddings:
            # Shared with the output layer: nn.Embedding's N(0, 1) start would make the first logits about
            # sqrt(embedding_size) times too large (measured on AESLC: training loss above the uniform one).
            nn.init.normal_(tgt_embed.weight, std=cfg.embedding_size ** -0.5)
            with torch.no_grad():
                tgt_embed.weight[PAD].zero_()
            self.output.weight = tgt_embed.weight

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> DecoderState:
        return self.decoder.init_state(self.encoder(src, src_lens))

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V)."""
        return self.output(self.decoder(tgt_in, self.encode(src, src_lens)))

    def step(self, prev: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState, Optional[torch.Tensor]]:
        """One decoding step: previous tokens (B,) -> (log-probabilities (B, V), state, attention weights)."""
        feats, state, weights = self.decoder.step(prev, state)
        return torch.log_softmax(self.output(feats), dim=-1), state, weights


def check_model_config(cfg: ModelConfig) -> None:
    """Combinations the schema alone cannot reject."""
    enc_size = cfg.encoder_hidden_size * (2 if cfg.bidirectional else 1)
    if cfg.context == "attention" and cfg.attention == "luong_dot" and enc_size != cfg.hidden_size:
        raise ConfigError(
            f"model.attention luong_dot needs model.hidden_size ({cfg.hidden_size}) equal to the encoder output "
            f"size ({enc_size} = encoder_hidden_size x directions); use luong_general or bahdanau"
        )
    if cfg.input_feeding and not (cfg.context == "attention" and cfg.attention != "bahdanau"):
        raise ConfigError("model.input_feeding applies to luong_dot / luong_general attention only")


def build_model(cfg: ModelConfig, src_vocab: int, tgt_vocab: int) -> Seq2Seq:
    check_model_config(cfg)
    return Seq2Seq(cfg, src_vocab, tgt_vocab)

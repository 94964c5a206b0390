"""The model: every context mode x cell trains the same way it decodes, and padding changes nothing."""

import itertools

import pytest
import torch

from seqtool.config import ModelConfig
from seqtool.data import make_batch
from seqtool.errors import ConfigError
from seqtool.model.seq2seq import build_model

MODES = [("init", "bahdanau", False), ("every_step", "bahdanau", False), ("attention", "bahdanau", False),
         ("attention", "luong_dot", False), ("attention", "luong_general", False), ("attention", "luong_general", True)]
CASES = list(itertools.product(["gru", "lstm", "rnn"], MODES))


def tiny(cell, context, attention, feed, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, context=context, attention=attention, input_feeding=feed, embedding_size=8,
                      encoder_hidden_size=8, hidden_size=16, dropout=0.0, encoder_layers=2, decoder_layers=2, **kw)
    return build_model(cfg, 30, 25).eval()


SRC, TGT = [[5, 6, 7, 8], [9, 10], [11, 12, 13]], [[4, 5], [6, 7, 8, 9], [10]]
BATCH = make_batch(SRC, TGT)


@pytest.mark.parametrize("cell,mode", CASES)
def test_teacher_forcing_equals_step_by_step(cell, mode):
    model = tiny(cell, *mode)
    logits = model(BATCH.src, BATCH.src_lens, BATCH.tgt_in)
    assert logits.shape == (3, BATCH.tgt_in.size(1), 25)
    state, steps = model.encode(BATCH.src, BATCH.src_lens), []
    for t in range(BATCH.tgt_in.size(1)):
        lp, state, _ = model.step(BATCH.tgt_in[:, t], state)
        steps.append(lp)
    torch.testing.assert_close(torch.stack(steps, 1), torch.log_softmax(logits, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell,mode", CASES)
def test_padding_is_masked(cell, mode):
    model = tiny(cell, *mode)
    batched = model(BATCH.src, BATCH.src_lens, BATCH.tgt_in)
    for i in range(3):
        one = make_batch([SRC[i]], [TGT[i]])
        alone = model(one.src, one.src_lens, one.tgt_in)
        torch.testing.assert_close(alone[0], batched[i, : one.tgt_in.size(1)], atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    model = tiny("lstm", "attention", "bahdanau", False).train()
    model(BATCH.src, BATCH.src_lens, BATCH.tgt_in).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "embed" not in n)


def test_tied_embeddings_share_one_tensor():
    model = tiny("gru", "attention", "bahdanau", False, tie_embeddings=True)
    assert model.output.weight is model.decoder.embed.weight


def test_invalid_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="luong_dot"):
        build_model(ModelConfig(attention="luong_dot", hidden_size=100, encoder_hidden_size=64), 10, 10)
    with pytest.raises(ConfigError, match="input_feeding"):
        build_model(ModelConfig(context="init", input_feeding=True), 10, 10)

"""The fused output layer + cross-entropy equals F.cross_entropy over the full logits, values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqtool.config import ModelConfig
from seqtool.data import make_batch
from seqtool.model.loss import ROWS, linear_cross_entropy
from seqtool.model.seq2seq import build_model
from seqtool.tokenizer import PAD


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), vocab=st.integers(2, 40), chunk=st.integers(1, 35),
       smoothing=st.sampled_from([0.0, 0.1, 0.4]), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_cross_entropy_of_the_full_logits(rows, vocab, chunk, smoothing, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    feats = (3 * torch.randn(rows, 6, generator=gen)).requires_grad_()
    weight = torch.randn(vocab, 6, generator=gen).requires_grad_()
    bias = torch.randn(vocab, generator=gen).requires_grad_() if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    inputs = [t for t in (feats, weight, bias) if t is not None]

    want = F.cross_entropy(F.linear(feats, weight, bias), targets, label_smoothing=smoothing, reduction="sum")
    want_grads = torch.autograd.grad(want * 0.5, inputs)
    got = linear_cross_entropy(feats, weight, bias, targets, smoothing, chunk)
    got_grads = torch.autograd.grad(got * 0.5, inputs)

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_without_gradients_gives_the_same_loss():
    feats, weight = torch.randn(9, 4), torch.randn(7, 4, requires_grad=True)
    targets = torch.randint(0, 7, (9,))
    with torch.no_grad():
        got = linear_cross_entropy(feats, weight, None, targets, 0.1, chunk=4)
    torch.testing.assert_close(got, F.cross_entropy(feats @ weight.t(), targets, label_smoothing=0.1, reduction="sum"))


@pytest.mark.parametrize("copy", [False, True])
def test_model_loss_ignores_padding_and_matches_its_logits(copy):
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=8, encoder_hidden_size=8, hidden_size=16, dropout=0.0, copy_source=copy)
    model = build_model(cfg, 30, 30).eval()
    batch = make_batch([[5, 6, 7, 8], [9, 10], [11, 12, 13]], [[4, 5], [6, 7, 8, 9], [10]])
    assert (batch.tgt_out == PAD).any()
    scores = model(batch.src, batch.src_lens, batch.tgt_in)
    want = F.cross_entropy(scores.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD, label_smoothing=0.1,
                           reduction="sum")
    got = model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_keep_the_statistics_in_fp32():
    """bf16 features and weights (bf16 training): the products in bf16, the loss in fp32, equal to the fp32 loss
    of the same bf16-rounded numbers to bf16's product rounding; gradients come back in the inputs' dtype. The last
    chunk (700 - 2 * 256 = 188 rows) is padded to a multiple of ROWS: the padding adds nothing to loss or gradients."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(700, 32, generator=gen).bfloat16().requires_grad_()
    weight = (0.3 * torch.randn(900, 32, generator=gen)).bfloat16().requires_grad_()
    bias = torch.randn(900, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, 900, (700,), generator=gen)
    assert 188 % ROWS
    got = linear_cross_entropy(feats, weight, bias, targets, 0.1, chunk=256)
    got.backward()
    assert got.dtype == torch.float32
    assert all(t.grad.dtype == torch.bfloat16 for t in (feats, weight, bias))
    exact = [t.detach().float().requires_grad_() for t in (feats, weight, bias)]
    want = F.cross_entropy(F.linear(*exact), targets, label_smoothing=0.1, reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0)
    for g, w in zip((feats.grad, weight.grad, bias.grad), exact):
        assert F.cosine_similarity(g.float().flatten(), w.grad.flatten(), dim=0) > 0.999

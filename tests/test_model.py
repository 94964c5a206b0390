"""The model: every context mode x cell trains the same way it decodes, and padding changes nothing."""

import itertools

import pytest
import torch

from seqtool.config import ModelConfig, validate
from seqtool.data import make_batch
from seqtool.errors import ConfigError
from seqtool.model import decoder as decoder_mod
from seqtool.model.attention import _AdditiveScores
from seqtool.model.decoder import pooled
from seqtool.model.dropout import Dropout
from seqtool.model.encoder import RNN_CELLS
from seqtool.model.seq2seq import build_model
from seqtool.tokenizer import PAD

MODES = [("init", "bahdanau", False), ("every_step", "bahdanau", False), ("attention", "bahdanau", False),
         ("attention", "luong_dot", False), ("attention", "luong_general", False), ("attention", "luong_general", True),
         ("attention", "luong_concat", True)]
CASES = list(itertools.product(RNN_CELLS, MODES))  # a new cell is tested in every mode by being in the table
VECTORS = ["last", "last_transform", "mean", "max"]
# Every way of forming the context vector c with each use of it (and attention's first state), every cell.
VECTOR_CASES = list(itertools.product(RNN_CELLS, ["init", "every_step", "attention"], VECTORS))


def tiny(cell, context, attention, feed, **kw):
    torch.manual_seed(0)
    shape = {"encoder_hidden_size": 8, "encoder_layers": 2, "decoder_layers": 2, **kw}
    cfg = ModelConfig(cell=cell, context=context, attention=attention, input_feeding=feed, embedding_size=8,
                      hidden_size=16, dropout=0.0, **shape)
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


@pytest.mark.parametrize("shape", ["2 layers, bidirectional", "1 layer, unidirectional"])
@pytest.mark.parametrize("cell,context,vector", VECTOR_CASES)
def test_every_context_vector_decodes_as_it_trains_and_ignores_padding(cell, context, vector, shape):
    if shape.startswith("1"):  # the encoder's output (8) narrower than the decoder (16), where c need not fit it
        starts_at_c = context == "init" and vector != "last_transform"
        kw = {"bidirectional": False, "encoder_hidden_size": 16 if starts_at_c else 8, "encoder_layers": 1,
              "decoder_layers": 1}
    else:
        kw = {}
    model = tiny(cell, context, "bahdanau", False, context_vector=vector, **kw)
    logits = model(BATCH.src, BATCH.src_lens, BATCH.tgt_in)
    state, steps = model.encode(BATCH.src, BATCH.src_lens), []
    for t in range(BATCH.tgt_in.size(1)):
        lp, state, _ = model.step(BATCH.tgt_in[:, t], state)
        steps.append(lp)
    torch.testing.assert_close(torch.stack(steps, 1), torch.log_softmax(logits, -1), atol=1e-5, rtol=1e-5)
    for i in range(3):
        one = make_batch([SRC[i]], [TGT[i]])
        alone = model(one.src, one.src_lens, one.tgt_in)
        torch.testing.assert_close(alone[0], logits[i, : one.tgt_in.size(1)], atol=1e-5, rtol=1e-5)


def test_mean_and_max_pool_the_real_states_only():
    model = tiny("gru", "every_step", "bahdanau", False, context_vector="mean")
    enc = model.encoder(BATCH.src, BATCH.src_lens)
    with torch.no_grad():
        enc.states[~enc.mask] = 1e6  # whatever padding holds, it never counts
    for i, n in enumerate(BATCH.src_lens.tolist()):
        real = enc.states[i, :n]
        torch.testing.assert_close(pooled(enc, "mean")[i], real.mean(0))
        torch.testing.assert_close(pooled(enc, "max")[i], real.max(0).values)
    assert torch.equal(pooled(enc, "last"), enc.final)
    by_hand = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [9.0, 9.0]]])  # the third position is padding
    enc.states, enc.mask, enc.final = by_hand, torch.tensor([[True, True, False]]), by_hand[:, 1]
    assert pooled(enc, "mean").tolist() == [[2.0, -1.0]] and pooled(enc, "max").tolist() == [[3.0, 0.0]]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_init_starts_every_decoder_layer_at_c(cell):
    for vector in ("last", "mean", "max"):
        model = tiny(cell, "init", "bahdanau", False, context_vector=vector)
        assert model.decoder.bridge is None and model.decoder.transform is None  # c itself, nothing learned
        enc = model.encoder(BATCH.src, BATCH.src_lens)
        state = model.decoder.init_state(enc)
        c = pooled(enc, vector)  # type: ignore[arg-type]
        for layer in state.hidden:
            torch.testing.assert_close(layer, c)
        if cell == "lstm":  # the memory cell: h_T's own with last, empty for a pooled c
            want = enc.final_cell if vector == "last" else torch.zeros_like(c)
            for layer in state.cell:
                torch.testing.assert_close(layer, want)


def test_every_step_reads_c_at_every_step_and_starts_at_its_bridge():
    model = tiny("gru", "every_step", "bahdanau", False, context_vector="last_transform")
    enc = model.encoder(BATCH.src, BATCH.src_lens)
    state = model.decoder.init_state(enc)
    c = torch.tanh(model.decoder.transform(enc.final))  # c = tanh(W h_T), Cho et al.'s
    torch.testing.assert_close(state.context, c)
    first = torch.tanh(model.decoder.bridge(c)).view(3, 2, 16).transpose(0, 1)  # s_0 = tanh(V c), 2 layers
    torch.testing.assert_close(state.hidden, first)


def test_unset_context_vector_is_each_mode_s_classic_one_with_the_parameters_model_files_had():
    assert ModelConfig(context="init").c_form == "last_transform"
    assert ModelConfig(context="every_step").c_form == "last"
    assert ModelConfig().c_form == "last"  # attention
    reused = ModelConfig(context="init").model_copy(update={"context": "attention"})  # a saved config, reused
    assert reused.context_vector is None and reused.c_form == "last"
    for context in ("init", "every_step", "attention"):
        names = {n.split(".")[1] for n, _ in tiny("lstm", context, "bahdanau", False).named_parameters()
                 if n.startswith("decoder.")}
        assert {"bridge", "cell_bridge"} <= names and "transform" not in names, context


def test_init_with_c_itself_needs_the_decoder_size():
    with pytest.raises(ConfigError, match="model.context_vector mean with context init.*model.hidden_size \\(100\\)"):
        validate({"model": {"context": "init", "context_vector": "mean", "hidden_size": 100}})
    with pytest.raises(ConfigError, match="model.context_vector"):
        validate({"model": {"context_vector": "first"}})
    validate({"model": {"context": "every_step", "context_vector": "mean", "hidden_size": 100}})


def test_gradients_reach_every_parameter():
    model = tiny("lstm", "attention", "bahdanau", False).train()
    model(BATCH.src, BATCH.src_lens, BATCH.tgt_in).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "embed" not in n)


def test_tied_embeddings_share_one_tensor():
    model = tiny("gru", "attention", "bahdanau", False, tie_embeddings=True)
    assert model.output.weight is model.decoder.embed.weight


@pytest.mark.parametrize("tie", [False, True])
def test_init_scale_draws_every_weight_from_one_range(tie):
    default = tiny("lstm", "attention", "luong_concat", True, tie_embeddings=tie)
    model = tiny("lstm", "attention", "luong_concat", True, tie_embeddings=tie, init_scale=0.05)
    for (name, p), (_, q) in zip(model.named_parameters(), default.named_parameters()):
        assert p.abs().max() <= 0.05, name
        assert p.abs().max() > 0.04 and not torch.equal(p, q), name  # spread over the range, all redrawn
    for embed in (model.encoder.embed, model.decoder.embed):
        assert embed.weight[PAD].abs().sum() == 0 and embed.weight[PAD + 1:].abs().min() > 0
    assert default.encoder.embed.weight.std() > 0.5  # torch's N(0, 1) without init_scale


ATTENTION_MODES = [m for m in MODES if m[0] == "attention"]


def tiny_copy(cell, mode, vocab=25):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, context=mode[0], attention=mode[1], input_feeding=mode[2], embedding_size=8,
                      encoder_hidden_size=8, hidden_size=16, dropout=0.0, copy_source=True)
    return build_model(cfg, vocab, vocab).eval()


@pytest.mark.parametrize("cell,mode", list(itertools.product(["gru", "lstm"], ATTENTION_MODES)))
def test_copy_teacher_forcing_equals_step_by_step_and_is_a_distribution(cell, mode):
    model = tiny_copy(cell, mode)
    scores = model(BATCH.src, BATCH.src_lens, BATCH.tgt_in)
    torch.testing.assert_close(scores.exp().sum(-1), torch.ones(scores.shape[:2]), atol=1e-5, rtol=1e-5)
    state, steps = model.encode(BATCH.src, BATCH.src_lens), []
    for t in range(BATCH.tgt_in.size(1)):
        lp, state, _ = model.step(BATCH.tgt_in[:, t], state)
        steps.append(lp)
    torch.testing.assert_close(torch.stack(steps, 1), scores, atol=1e-5, rtol=1e-5)
    # Cross-entropy sees log-probabilities as logits: log_softmax of them is the identity.
    torch.testing.assert_close(torch.log_softmax(scores, -1), scores, atol=1e-5, rtol=1e-5)


def test_copy_puts_the_gate_s_remaining_mass_on_source_ids_only():
    model = tiny_copy("gru", ("attention", "bahdanau", False))
    with torch.no_grad():
        model.copy_gate.bias.fill_(-50.0)  # gate ~ 0: all mass copied
        lp = model(BATCH.src, BATCH.src_lens, BATCH.tgt_in)
    for i, src in enumerate(SRC):
        outside = torch.ones(25, dtype=torch.bool)
        outside[src] = False
        assert lp[i].exp()[:, ~outside].sum(-1).min() > 0.999
        assert lp[i].exp()[:, outside].max() < 1e-6


def test_copy_learns_to_copy_tokens_it_never_saw_as_targets():
    """Targets are the source's one rare token; half the rare tokens never appear in a training target.
    A copy model still outputs them; the same model without copy cannot (it never learned their ids)."""
    rng = __import__("random").Random(0)
    common, rare = list(range(4, 14)), list(range(14, 64))
    seen, unseen = rare[:25], rare[25:]

    def pairs(pool, n):
        out = []
        for _ in range(n):
            src = rng.sample(common, 4)
            tok = rng.choice(pool)
            src.insert(rng.randrange(5), tok)
            out.append((src, [tok]))
        return out

    train, test = pairs(seen, 512), pairs(unseen, 100)

    def accuracy(copy):
        torch.manual_seed(0)
        cfg = ModelConfig(embedding_size=16, encoder_hidden_size=16, hidden_size=32, dropout=0.0, copy_source=copy)
        model = build_model(cfg, 64, 64)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _epoch in range(6):
            for k in range(0, len(train), 32):
                b = make_batch(*zip(*train[k:k + 32]))
                loss = torch.nn.functional.cross_entropy(model(b.src, b.src_lens, b.tgt_in).flatten(0, 1),
                                                         b.tgt_out.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        b = make_batch(*zip(*test))
        with torch.no_grad():
            lp, _, _ = model.step(b.tgt_in[:, 0], model.encode(b.src, b.src_lens))
        return (lp.argmax(-1) == b.tgt_out[:, 0]).float().mean().item()

    assert accuracy(copy=True) > 0.8
    assert accuracy(copy=False) < 0.1


def test_dropout_zeroes_a_fraction_p_scales_the_rest_and_passes_through_in_eval():
    torch.manual_seed(0)
    drop, x = Dropout(0.3), (torch.rand(400, 500) + 0.5).requires_grad_(True)  # no zeros of its own
    y = drop(x)
    kept = y != 0
    assert abs(1.0 - kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    y.sum().backward()  # the gradient flows through the kept values only, with the same scale
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    assert drop.eval()(x) is x and Dropout(0.0)(x) is x


def test_recomputed_additive_scores_have_the_exact_gradients():
    keys, q = torch.randn(3, 1, 5, 4, dtype=torch.double), torch.randn(3, 2, 1, 4, dtype=torch.double)
    v = torch.randn(1, 4, dtype=torch.double)
    inputs = tuple(x.requires_grad_() for x in (keys, q, v))
    assert torch.autograd.gradcheck(_AdditiveScores.apply, inputs)
    for k in (keys, keys.expand(-1, 2, -1, -1)):  # one key row for all T queries, and one each
        expected = 2.0 * torch.nn.functional.linear(torch.sigmoid(k + 2.0 * q), v).squeeze(-1)
        torch.testing.assert_close(_AdditiveScores.apply(k, q, v), expected)


def _saved_bytes(model, batch) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes the forward pass keeps for the backward pass (each stored tensor once), and the gradients."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out)
    loss.backward()
    return sum(saved.values()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", [("attention", "bahdanau", False), ("attention", "luong_concat", True)])
def test_long_batches_recompute_attention_instead_of_keeping_it_and_learn_the_same(mode, monkeypatch):
    model = tiny("gru", *mode).train()
    batch = make_batch([list(range(4, 24))] * 8, [list(range(4, 20))] * 8)  # 8 x 17 steps x 20 keys
    kept, grads = _saved_bytes(model, batch)
    monkeypatch.setattr(decoder_mod, "KEPT_FOR_BACKWARD", 0)  # every batch is "long"
    recomputed, regrads = _saved_bytes(model, batch)
    # The (B, T, S, Q) sigmoid over all 17 steps, in fp32, is no longer kept; the keys (B, S, Q) and the
    # queries (B, T, Q) are, instead.
    hidden, keys, queries = (4 * 8 * n * 16 for n in (17 * 20, 20, 17))
    assert kept - recomputed == hidden - keys - queries
    assert regrads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(regrads[name], grad, rtol=1e-5, atol=1e-6, msg=name)

"""Model files: round trip, and every kind of bad file is one clear ModelFileError, never code execution."""

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from seqtool.checkpoint import ModelBundle, atomic_write, load_model, save_model
from seqtool.config import validate
from seqtool.errors import ModelFileError
from seqtool.model.seq2seq import build_model
from seqtool.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def bundle():
    cfg = validate({"model": {"embedding_size": 8, "encoder_hidden_size": 8, "hidden_size": 16, "tie_embeddings": True,
                              "cell": "lstm"}, "tokenizer": {"vocab_size": 400}})
    tok = train_tokenizer([f"word{i} other{i % 7} thing" for i in range(200)], cfg.tokenizer)
    torch.manual_seed(0)
    return ModelBundle(build_model(cfg.model, tok.vocab_size, tok.vocab_size), cfg, tok, tok, {"step": 3})


def test_round_trip_gives_identical_outputs(bundle, tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, bundle)
    loaded = load_model(path)
    assert loaded.config == bundle.config and loaded.info == {"step": 3}
    assert loaded.src_tok.model_bytes == bundle.src_tok.model_bytes
    src = torch.tensor([[5, 6, 7]])
    lens = torch.tensor([3])
    bundle.model.eval()
    torch.testing.assert_close(loaded.model(src, lens, src), bundle.model(src, lens, src), rtol=0, atol=0)
    assert loaded.model.output.weight is loaded.model.decoder.embed.weight  # still tied after loading


def test_model_dir_resolves_to_its_model_file(bundle, tmp_path):
    save_model(tmp_path / "model.safetensors", bundle)
    assert load_model(tmp_path).info == {"step": 3}


def _expect_error(path, match):
    with pytest.raises(ModelFileError, match=match):
        load_model(path)


def test_missing_truncated_random(bundle, tmp_path):
    _expect_error(tmp_path / "none.safetensors", "not found")
    _expect_error(tmp_path, "directory")
    good = tmp_path / "good.safetensors"
    save_model(good, bundle)
    data = good.read_bytes()
    (tmp_path / "trunc").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "trunc", "truncated|damaged")
    (tmp_path / "rand").write_bytes(os.urandom(5000))
    _expect_error(tmp_path / "rand", "not a seqtool model")
    (tmp_path / "tiny").write_bytes(b"abc")
    _expect_error(tmp_path / "tiny", "too short")


def test_foreign_safetensors_and_other_version(tmp_path):
    (tmp_path / "foreign").write_bytes(st_save({"w": torch.zeros(2)}))
    _expect_error(tmp_path / "foreign", "not a seqtool model")
    (tmp_path / "v99").write_bytes(st_save({"w": torch.zeros(2)},
                                           metadata={"format": "seqtool-model", "format_version": "99"}))
    _expect_error(tmp_path / "v99", "format version 99")
    (tmp_path / "badcfg").write_bytes(st_save({"w": torch.zeros(2)}, metadata={
        "format": "seqtool-model", "format_version": "1", "config": json.dumps({"model": {"cell": "x"}})}))
    _expect_error(tmp_path / "badcfg", "config is not valid")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Payload(str(marker))))
    _expect_error(evil, "not a seqtool model")
    torch.save({"x": _Payload(str(marker))}, tmp_path / "evil2.safetensors")
    _expect_error(tmp_path / "evil2.safetensors", "not a seqtool model")
    assert not marker.exists()


def test_header_claiming_more_than_the_file(tmp_path):
    (tmp_path / "h").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    _expect_error(tmp_path / "h", "truncated")


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]


def test_separate_vocabularies_travel_in_the_file(tmp_path):
    cfg = validate({"model": {"embedding_size": 8, "encoder_hidden_size": 8, "hidden_size": 16},
                    "tokenizer": {"vocab_size": 400, "joint": False}})
    src_tok = train_tokenizer([f"quelle {i} wort" for i in range(100)], cfg.tokenizer)
    tgt_tok = train_tokenizer([f"target {i} word other" for i in range(100)], cfg.tokenizer)
    bundle = ModelBundle(build_model(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size), cfg, src_tok, tgt_tok, {})
    save_model(tmp_path / "m.safetensors", bundle)
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.src_tok.model_bytes == src_tok.model_bytes and loaded.tgt_tok.model_bytes == tgt_tok.model_bytes
    assert loaded.src_tok is not loaded.tgt_tok


def _resaved(path, edit_meta=None, rename=None):
    """The safetensors file at `path` saved again with its metadata or tensor names edited."""
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    data = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = st_load(data)
    if edit_meta:
        edit_meta(meta)
    for old, new in (rename or {}).items():
        tensors[new] = tensors.pop(old)
    path.write_bytes(st_save(tensors, metadata=meta))


def test_a_model_saved_with_nbest_above_its_beam_still_loads_as_before(bundle, tmp_path):
    """Older files may hold decoding.nbest above beam_size, which decoding then capped: they load, capped."""
    path = tmp_path / "old.safetensors"
    save_model(path, bundle)

    def old_decoding(meta):
        config = json.loads(meta["config"])
        config["decoding"].update(beam_size=1, nbest=4)
        meta["config"] = json.dumps(config)

    _resaved(path, old_decoding)
    assert load_model(path).config.decoding.nbest == 1


@pytest.mark.parametrize("context", ["init", "every_step", "attention"])
def test_model_files_from_before_context_vector_load_and_decode_as_they_did(bundle, tmp_path, context):
    """A file whose config has no model.context_vector (seqtool before 2026-12-04) loads with its mode's classic c
    and gives the outputs it gave."""
    cfg = bundle.config.model_copy(update={"model": bundle.config.model.model_copy(update={"context": context})})
    torch.manual_seed(0)
    model = build_model(cfg.model, bundle.src_tok.vocab_size, bundle.tgt_tok.vocab_size).eval()
    old = ModelBundle(model, cfg, bundle.src_tok, bundle.tgt_tok, {"step": 3})
    path = tmp_path / "old.safetensors"
    save_model(path, old)

    def without_key(meta):
        config = json.loads(meta["config"])
        del config["model"]["context_vector"]
        meta["config"] = json.dumps(config)

    _resaved(path, without_key)
    loaded = load_model(path).model.eval()
    src, lens = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]]), torch.tensor([4, 3])
    tgt = torch.tensor([[1, 5, 6], [1, 7, 0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, lens, tgt), model(src, lens, tgt), rtol=0, atol=0)


def test_damaged_training_states_are_one_error(tmp_path):
    """Names, scaler states and generator states a damaged file may hold, each refused by load_state."""
    from conftest import tiny_config
    from seqtool.checkpoint import STATE_FILE, load_state
    from seqtool.train import run_training

    run_training(validate(tiny_config(tmp_path / "m", training={"max_steps": 2, "valid_every": 2,
                                                                 "valid_max_sentences": 5})), quiet=True)
    good = (tmp_path / "m" / STATE_FILE).read_bytes()
    slot = next(n for n in __import__("safetensors.torch", fromlist=["load"]).load(good) if n.startswith("optim."))
    cases = [({}, {slot: "optim.5"}), ({}, {slot: "optim.\u00b2.exp_avg"}),
             ({"scaler": json.dumps({"scale": 2.0})}, {}), ({"progress": json.dumps({"step": -3})}, {})]
    for meta_update, rename in cases:
        path = tmp_path / "state.safetensors"
        path.write_bytes(good)
        _resaved(path, lambda meta, meta_update=meta_update: meta.update(meta_update), rename)
        with pytest.raises(ModelFileError, match="damaged training state"):
            state = load_state(path)
            from seqtool.train import Progress

            Progress.restored(state.progress, path)

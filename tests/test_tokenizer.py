import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from seqtool.config import TokenizerConfig
from seqtool.errors import ModelFileError
from seqtool.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, train_tokenizer

CORPUS = [f"the {w} sat on the {v} mat number {i}" for i, (w, v) in
          enumerate(zip(["cat", "dog", "bird", "fish"] * 50, ["red", "blue", "green", "big", "small"] * 40))]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(CORPUS, TokenizerConfig(type="bpe", vocab_size=300))


def test_special_ids(bpe):
    assert (bpe.sp.pad_id(), bpe.sp.unk_id(), bpe.sp.bos_id(), bpe.sp.eos_id()) == (PAD, UNK, BOS, EOS)
    assert Tokenizer.from_bytes(bpe.model_bytes).encode("the cat") == bpe.encode("the cat")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"))
               | st.sampled_from(" \u2581\ue000\ue001\ue002"), max_size=40))
@example("\u2581")  # sentencepiece's own word marker, found by this test in CI
@example("a\u2581b \ue000\ue002 \ue000\ue001\u2581")
def test_round_trip_any_text(text):
    """decode(encode(x)) == x up to whitespace runs, even for characters never seen in training."""
    tok = _BPE
    assert tok.decode(tok.encode(text)) == " ".join(text.split())


_BPE = train_tokenizer(CORPUS, TokenizerConfig(type="bpe", vocab_size=300))


def test_word_type_keeps_presegmented_tokens():
    lines = ["指 点 江 山 ， 书 生 意 气", "风 吹 雨 打 ， 花 开 花 落"]
    tok = train_tokenizer(lines, TokenizerConfig(type="word", vocab_size=100))
    assert tok.pieces(lines[0]) == ["▁" + c for c in lines[0].split()]
    assert tok.decode(tok.encode(lines[1])) == lines[1]


def test_word_type_gives_one_id_per_word_even_for_unknown_neighbours():
    """sentencepiece alone merges adjacent unknown words into one <unk>; a couplet's length would be lost."""
    tok = train_tokenizer(["指 点 江 山 ， 书 生 意 气"] * 3, TokenizerConfig(type="word", vocab_size=100))
    ids = tok.encode("跄 跄 江 肸 蚃 ，")
    assert ids == tok.encode_batch(["跄 跄 江 肸 蚃 ，"])[0] and len(ids) == 6
    assert ids[0] == ids[1] == ids[3] == ids[4] == UNK and ids[2] != UNK
    assert tok.pieces("江 山") == ["▁江", "▁山"]


def test_word_type_reads_unspaced_chinese_as_its_characters():
    """People type 上联 without spaces; a token the vocabulary lacks that is all CJK is read as its characters."""
    tok = train_tokenizer(["指 点 江 山 ， 书 生 意 气", "江山 如 画"] * 3,
                          TokenizerConfig(type="word", vocab_size=100))
    assert tok.words("指点江山，书生意气") == list("指点江山，书生意气")
    assert tok.encode("指点江山，书生意气") == tok.encode("指 点 江 山 ， 书 生 意 气")
    assert tok.words("江山 跄跄 hello") == ["江山", "跄", "跄", "hello"]  # known words stay; Latin is not split
    assert tok.words("江山如画…") == list("江山如画…")  # any unknown token holding a CJK character
    assert tok.encode("hello")[0] == UNK


def test_char_type_and_fullwidth_punctuation_kept():
    lines = ["上联：春风，化雨。", "下联：秋月，流光。"]
    tok = train_tokenizer(lines, TokenizerConfig(type="char", vocab_size=100))
    assert tok.decode(tok.encode(lines[0])) == lines[0]  # no NFKC: '，' stays full width


def test_damaged_tokenizer_bytes():
    with pytest.raises(ModelFileError):
        Tokenizer.from_bytes(b"not a model")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 299), max_size=30))
def test_any_ids_or_pieces_decode_to_one_printable_line(ids):
    """Whatever ids a model emits (byte pieces of line feeds, escapes and U+2028 included) or pieces a user
    hands `tokenizer decode`, the text has no control character and no line separator."""
    ids = ids + [_BPE.sp.piece_to_id(f"<0x{b:02X}>") for b in (0x0A, 0x0D, 0x1B, 0xE2, 0x80, 0xA8, 0xC2, 0x85)]
    for text in (_BPE.decode(ids), _BPE.decode_pieces([_BPE.sp.id_to_piece(i) for i in ids])):
        assert len(text.splitlines()) <= 1 and not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)
    assert set(_BPE.unsafe_ids) == {_BPE.sp.piece_to_id(f"<0x{b:02X}>") for b in [*range(0x20), 0x7F]}


def test_spellings_decode_to_the_phrase_canonical_first_and_glue_continues_words():
    tok = train_tokenizer([f"the cat sat on the mat {i} times, ruged rugs" for i in range(200)],
                          TokenizerConfig(type="bpe", vocab_size=320))
    spellings = tok.spellings("the mat", limit=50)
    assert spellings[0] == tok.encode("the mat") and len(spellings) > 1
    assert len({tuple(s) for s in spellings}) == len(spellings)
    assert all(tok.decode(s) == "the mat" for s in spellings)
    glue = set(tok.glue_ids)
    assert glue and all(not tok.sp.id_to_piece(i).startswith("\u2581") for i in glue)
    assert tok.encode("the")[0] not in glue


def test_own_tokenizer_models_train_and_travel_inside_the_model_file(tmp_path):
    """tokenizer.model: one file for both sides, or [source, target]; the model file then holds those bytes, and
    translates with the tokenizer files gone."""
    from conftest import SAMPLE, run_cli, tiny_config, write_config
    from seqtool.checkpoint import load_model

    spm = {side: tmp_path / f"{side}.spm" for side in ("joint", "src", "tgt")}
    run_cli("tokenizer", "train", str(SAMPLE / "train.src"), str(SAMPLE / "train.tgt"), "-o", str(spm["joint"]),
            "--vocab-size", "500", check=True)
    for side in ("src", "tgt"):
        run_cli("tokenizer", "train", str(SAMPLE / f"train.{side}"), "-o", str(spm[side]), "--vocab-size", "300",
                check=True)
    runs = {"joint": {"model": str(spm["joint"])}, "separate": {"model": [str(spm["src"]), str(spm["tgt"])],
                                                                 "joint": False}}
    for name, tokenizer in runs.items():
        cfg = tiny_config(tmp_path / name, tokenizer=tokenizer, training={"max_steps": 20, "valid_every": 20})
        proc = run_cli("train", "-c", str(write_config(tmp_path / f"{name}.yaml", cfg)), check=True)
        said = str(spm["joint"]) if name == "joint" else f"{spm['src']} and {spm['tgt']}"
        assert f"tokenizer from {said}" in proc.stderr
    joint, separate = load_model(tmp_path / "joint"), load_model(tmp_path / "separate")
    assert joint.src_tok is joint.tgt_tok and joint.src_tok.model_bytes == spm["joint"].read_bytes()
    assert (separate.src_tok.model_bytes, separate.tgt_tok.model_bytes) == (spm["src"].read_bytes(),
                                                                          spm["tgt"].read_bytes())
    assert joint.model.output.out_features == 500 and separate.model.output.out_features == 300
    for path in spm.values():
        path.unlink()
    out = run_cli("translate", "-m", str(tmp_path / "joint"), input="a\n\nb\n", check=True).stdout
    assert len(out.split("\n")) == 4  # one line per line, the tokenizer from inside the model file


def test_an_own_tokenizer_that_seqtool_cannot_use_is_one_line(tmp_path):
    import sentencepiece as spm

    from conftest import SAMPLE, run_cli, tiny_config, write_config
    from test_cli_errors import assert_one_line_error

    foreign = tmp_path / "foreign"  # spm_train's own special ids: unk 0, bos 1, eos 2, no pad
    spm.SentencePieceTrainer.train(input=str(SAMPLE / "train.src"), model_prefix=str(foreign), vocab_size=150,
                                   minloglevel=2)
    cases = {
        str(foreign) + ".model": "special ids are pad=-1 unk=0 bos=1 eos=2; seqtool needs pad=0 unk=1 bos=2 eos=3",
        str(tmp_path / "missing.spm"): "tokenizer.model: file not found",
        str(SAMPLE / "train.src"): "is not a sentencepiece model",
    }
    for path, match in cases.items():
        cfg = tiny_config(tmp_path / "m", tokenizer={"model": path})
        assert_one_line_error(run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg))), match)
    cfg = tiny_config(tmp_path / "m", tokenizer={"model": [path, path]})  # a list means two sides: joint false
    assert_one_line_error(run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg))), "[source, target]")


def test_learning_a_tokenizer_from_no_text_says_so(tmp_path):
    from conftest import run_cli
    from test_cli_errors import assert_one_line_error

    (tmp_path / "blank.txt").write_text("\n  \n\n")
    proc = run_cli("tokenizer", "train", str(tmp_path / "blank.txt"), "-o", str(tmp_path / "t.model"))
    assert_one_line_error(proc, "no text to learn the tokenizer from: the input is empty or only blank lines")
    assert not (tmp_path / "t.model").exists()

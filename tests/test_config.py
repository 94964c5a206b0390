from pathlib import Path

import pytest

from seqtool.config import ConfigError, load_config, parse_override, validate


def test_defaults_are_valid():
    cfg = validate({})
    assert cfg.model.cell == "gru" and cfg.decoding.beam_size == 5


def test_unknown_key_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key model\.hiden_size; did you mean hidden_size\?"):
        validate({"model": {"hiden_size": 3}})


def test_unknown_section_and_several_errors_reported_together():
    with pytest.raises(ConfigError) as exc:
        validate({"modle": {}, "model": {"dropout": 1.5}, "decoding": {"beam_size": 0},
                  "tokenizer": {"vocab_size": -1}})
    msg = str(exc.value)
    for part in ("unknown key modle; did you mean model?", "model.dropout", "decoding.beam_size",
                 "tokenizer.vocab_size"):
        assert part in msg


def test_wrong_type_and_choice():
    with pytest.raises(ConfigError, match="model.hidden_size"):
        validate({"model": {"hidden_size": "big"}})
    with pytest.raises(ConfigError, match="model.cell"):
        validate({"model": {"cell": "transformer"}})


def test_out_of_range_seeds_and_threads_and_huge_values_are_short_errors(tmp_path):
    """Seeds past 64 bits and absurd thread counts are config errors (they were internal OverflowErrors); a wrong
    value is shown by its start; YAML aliases that expand to a billion values are refused before validation."""
    with pytest.raises(ConfigError) as exc:
        validate({"training": {"seed": 2**64, "threads": 10**9}, "decoding": {"seed": -1},
                  "model": {"hidden_size": list(range(10**4))}})
    msg = str(exc.value)
    for part in ("training.seed", "training.threads", "decoding.seed", "model.hidden_size"):
        assert part in msg
    assert "(got [0, 1, 2, 3, 4, ...])" in msg and len(msg) < 600
    assert validate({"training": {"seed": 2**63 - 1}}).training.seed == 2**63 - 1
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)) +
        "training: {seed: *i}\n")
    with pytest.raises(ConfigError, match="more than 100,000 values"):
        load_config(bomb)
    long = tmp_path / "long.yaml"
    long.write_text(f"training: {{seed: {'9' * 5000}}}\n")
    with pytest.raises(ConfigError, match="a number in it is too long"):
        load_config(long)
    with pytest.raises(ConfigError, match="--set training.seed: cannot parse value '99999"):
        load_config(None, [f"training.seed={'9' * 5000}"])


def test_metric_names_checked_at_load():
    with pytest.raises(ConfigError) as exc:
        validate({"training": {"valid_metrics": ["bleu", "meteor", "ter"], "keep_best_by": "couplet"}})
    msg = str(exc.value)
    # every unknown name at once, in the words `seqtool evaluate --metrics` uses (metrics.unknown_names)
    assert ("training.valid_metrics: unknown metrics 'meteor', 'ter'; choose from bleu, chrf, bleu_char, rouge, "
            "couplet") in msg
    # the couplet checks mix directions (echo_rate is better lower): they cannot pick a model
    assert "training.keep_best_by 'couplet': choose from loss, bleu, chrf, bleu_char, rouge" in msg
    cfg = validate({"training": {"valid_metrics": ["couplet"], "keep_best_by": "chrf"}})
    assert cfg.training.keep_best_by == "chrf"


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  cell: lstm\n")
    cfg = load_config(path, ["model.hidden_size=64", "training.lr=1e-4", "data.train_src=x.txt"])
    assert (cfg.model.cell, cfg.model.hidden_size, cfg.training.lr, cfg.data.train_src) == ("lstm", 64, 1e-4, "x.txt")


def test_settings_are_taken_as_given_and_win_over_set_strings():
    """A command's own flags ({"section.key": value}) come after --set, are never parsed as YAML, and are
    validated with the rest."""
    cfg = load_config(None, ["data.train_src=a.txt", "training.lr=0.5"], {"data.train_src": "[not, a, list]"})
    assert (cfg.data.train_src, cfg.training.lr) == ("[not, a, list]", 0.5)
    with pytest.raises(ConfigError, match="training.device"):
        load_config(None, [], {"training.device": "tpu"})


@pytest.mark.parametrize("expr", ["model.hidden_size", "hidden_size=3", "a.b.c=1", "=3", "model.=1"])
def test_malformed_override(expr):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(expr)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid_and_point_at_data(path):
    cfg = load_config(path)
    root = path.parents[1]
    paths = [cfg.data.train_src, cfg.data.train_tgt, cfg.data.valid_src, cfg.data.valid_tgt]
    if any(p.startswith("../shared") for p in paths) and not (root.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is not here")
    derived = [p for p in paths if p.startswith("data/")]  # made from ../shared by the commands in the config's header
    if derived:
        header = path.read_text(encoding="utf-8").split("\ndata:")[0]
        assert all(str(Path(p).parent) in header for p in derived), "the header must say how to make its data"
        if not all((root / p).is_file() for p in derived):
            pytest.skip(f"{path.name}: its data/ is made by the commands in its header")
    for p in paths:
        assert (root / p).is_file(), p


def test_copy_source_needs_a_joint_tokenizer_and_attention():
    with pytest.raises(ConfigError, match="model.copy_source needs tokenizer.joint"):
        validate({"model": {"copy_source": True}, "tokenizer": {"joint": False}})
    assert validate({"model": {"copy_source": True}}).model.copy_source


def test_model_combinations_rejected_at_load_all_at_once():
    """Luong sizes, input feeding with Bahdanau and copy without attention: found by validate, together."""
    with pytest.raises(ConfigError) as exc:
        validate({"model": {"attention": "luong_dot", "hidden_size": 100, "encoder_hidden_size": 64,
                            "context": "attention", "copy_source": True}, "decoding": {"copy_punctuation": True}})
    assert "luong_dot needs model.hidden_size (100)" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        validate({"model": {"context": "init", "input_feeding": True, "copy_source": True}})
    assert "input_feeding applies to luong_* attention only" in str(exc.value)
    assert "copy_source copies by attention" in str(exc.value)
    with pytest.raises(ConfigError) as exc:  # two cross-section problems at once
        validate({"decoding": {"copy_punctuation": True, "exact_length": True}, "tokenizer": {"joint": False},
                  "model": {"copy_source": True}})
    assert ("exact_length needs tokenizer.type word" in str(exc.value)
            and "copy_source needs tokenizer.joint" in str(exc.value))

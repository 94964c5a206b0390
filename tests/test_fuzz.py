"""Fuzzing the CLI entry points in-process: random bytes and random configs never give a traceback.

Each example runs `seqtool.cli.main` as the console script would. Anything but a clean exit (code
0, 1 or 2, and for errors one `seqtool: error:` line on stderr) fails the test.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqtool.cli import main
from seqtool.config import Config

SECTIONS = list(Config.model_fields)
KEYS = [f"{s}.{k}" for s in SECTIONS for k in Config.model_fields[s].annotation.model_fields]
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_main(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit code, stdout, stderr). Any other exception propagates."""
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["seqtool", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, err: str) -> None:
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 1:  # a usage error (2) is Typer's own box; our errors are one line
        assert err.endswith("\n") and err.splitlines()[-1].startswith("seqtool: error: "), err


def _write(folder: str, name: str, data: bytes) -> str:
    path = Path(folder) / name
    path.write_bytes(data)
    return str(path)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=6)
key_names = st.sampled_from(KEYS) | st.text(min_size=1, max_size=12).map(lambda k: f"model.{k}")
configs = st.dictionaries(key_names, values, max_size=6).map(
    lambda flat: {s: {k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == s} for s in SECTIONS})
config_texts = st.one_of(configs.map(lambda c: yaml.safe_dump(c).encode()), st.binary(max_size=200),
                         st.dictionaries(st.text(max_size=8), values, max_size=4).map(lambda c: yaml.safe_dump(c).encode()))
set_exprs = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=12)),
                               st.text(max_size=20)).filter(lambda e: "\x00" not in e), max_size=3)


@FUZZ
@given(config_texts, set_exprs)
def test_train_with_random_configs(text, exprs):
    with tempfile.TemporaryDirectory() as tmp:
        config = _write(tmp, "c.yaml", text)
        # A missing training file guarantees that no example starts a real training run.
        args = ["train", "-c", config, *[a for e in exprs for a in ("--set", e)],
                "--set", f"data.train_src={tmp}/missing.src", "--set", f"training.model_dir={tmp}/run"]
        code, _, err = run_main(*args)
        assert code != 0
        assert_clean(code, err)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["1", "3"]), st.sampled_from(["text", "json"]))
def test_translate_random_bytes(trained_model, data, beam, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        code, out, err = run_main("translate", "-m", str(trained_model), _write(tmp, "in.txt", data), "-b", beam,
                                  "--format", fmt, "-q")
        assert_clean(code, err)
        if code == 0:  # whatever it accepted, one output line per input line (lines end at \n only)
            assert out.count("\n") == data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


@FUZZ
@given(st.binary(max_size=200), st.lists(st.binary(max_size=200), min_size=1, max_size=3),
       st.lists(st.sampled_from(["bleu", "chrf", "bleu_char", "rouge", "couplet", "nope", ""]), min_size=1, max_size=3))
def test_evaluate_random_files(hyp, refs, metrics):
    with tempfile.TemporaryDirectory() as tmp:
        ref_args = [a for i, r in enumerate(refs) for a in ("--ref", _write(tmp, f"r{i}", r))]
        code, _, err = run_main("evaluate", "--hyp", _write(tmp, "h", hyp), "--src", _write(tmp, "s", hyp), *ref_args,
                                "--metrics", ",".join(metrics))
        assert_clean(code, err)


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(["info", "translate", "tokenizer encode", "average"]))
def test_random_model_files(data, command):
    with tempfile.TemporaryDirectory() as tmp:
        model = _write(tmp, "model.safetensors", data)
        args = {"info": ["info", model], "translate": ["translate", "-m", model, _write(tmp, "in", b"a\n")],
                "tokenizer encode": ["tokenizer", "encode", "-m", model, _write(tmp, "in", b"a\n")],
                "average": ["average", tmp, "-o", f"{tmp}/avg.safetensors"]}[command]
        code, _, err = run_main(*args)
        assert code != 0
        assert_clean(code, err)

"""Fuzzing the CLI entry points in-process: random bytes and random configs never give a traceback.

Each example runs `seqtool.cli.main` as the console script would. Anything but a clean exit (code
0, 1 or 2, and for errors one `seqtool: error:` line on stderr) fails the test.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from seqtool.checkpoint import load_state
from seqtool.config import Config
from seqtool.data import make_batch
from seqtool.errors import ModelFileError
from seqtool.train import Progress, make_optimizer, restore_rng

SECTIONS = list(Config.model_fields)
KEYS = [f"{s}.{k}" for s in SECTIONS for k in Config.model_fields[s].annotation.model_fields]
# CI draws 25 examples per entry point; FUZZ_EXAMPLES=2000 (with HYPOTHESIS_PROFILE=explore) hunts for more.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_main(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit code, stdout, stderr)."""
    proc = run_cli(*args)
    return proc.returncode, proc.stdout, proc.stderr


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
values = st.recursive(scalars, lambda inner: (st.lists(inner, max_size=3)
                                              | st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
key_names = st.sampled_from(KEYS) | st.text(min_size=1, max_size=12).map(lambda k: f"model.{k}")
configs = st.dictionaries(key_names, values, max_size=6).map(
    lambda flat: {s: {k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == s} for s in SECTIONS})
config_texts = st.one_of(configs.map(lambda c: yaml.safe_dump(c).encode()), st.binary(max_size=200),
                         st.dictionaries(st.text(max_size=8), values,
                                         max_size=4).map(lambda c: yaml.safe_dump(c).encode()))
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
@given(st.binary(max_size=300), st.binary(max_size=300), st.sampled_from([[], ["--json"]]))
def test_score_random_bytes(trained_model, src, tgt, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        code, out, err = run_main("score", "-m", str(trained_model), "--src", _write(tmp, "s", src), "--tgt",
                                  _write(tmp, "t", tgt), *fmt, "-q")
        assert_clean(code, err)
        if code == 0:  # line-aligned files it could read: one line out per pair
            assert out.count("\n") == src.count(b"\n") + (0 if src.endswith(b"\n") or not src else 1)


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
@given(st.binary(max_size=2000), st.sampled_from(["info", "translate", "tokenizer encode", "average", "score"]))
def test_random_model_files(data, command):
    with tempfile.TemporaryDirectory() as tmp:
        model = _write(tmp, "model.safetensors", data)
        args = {"info": ["info", model], "translate": ["translate", "-m", model, _write(tmp, "in", b"a\n")],
                "tokenizer encode": ["tokenizer", "encode", "-m", model, _write(tmp, "in", b"a\n")],
                "average": ["average", tmp, "-o", f"{tmp}/avg.safetensors"],
                "score": ["score", "-m", model, "-s", _write(tmp, "in", b"a\n"), "-t", f"{tmp}/in"]}[command]
        code, _, err = run_main(*args)
        assert code != 0
        assert_clean(code, err)


# -- the safetensors header itself --------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X", ""]
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats(allow_nan=False) |
                           st.text(max_size=12), lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=5)
header_edits = st.lists(st.one_of(
    st.tuples(st.just("metadata"), json_values),  # __metadata__ of any JSON shape
    st.tuples(st.just("meta_key"), st.sampled_from(["format", "format_version", "config", "info", "param_groups",
                                                     "progress", "extra"]),
              json_values.map(lambda v: json.dumps(v)) | st.text(max_size=12) | json_values),
    st.tuples(st.just("dtype"), st.integers(0, 10**6), st.sampled_from(DTYPES) | json_values),
    st.tuples(st.just("shape"), st.integers(0, 10**6), st.lists(st.integers(-2, 2**40), max_size=3) | json_values),
    st.tuples(st.just("offsets"), st.integers(0, 10**6), st.tuples(st.integers(-8, 2**33), st.integers(-8, 2**33))),
    st.tuples(st.just("overlap"), st.integers(0, 10**6), st.integers(0, 10**6)),  # one tensor's bytes given to another
    st.tuples(st.just("drop"), st.integers(0, 10**6)),
    st.tuples(st.just("rename"), st.integers(0, 10**6), st.text(max_size=20)),
    st.tuples(st.just("whole"), json_values),  # the header replaced by any JSON
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("header_len"), st.integers(0, 2**64 - 1)),
), min_size=1, max_size=4)


def edited(data: bytes, edits) -> bytes:
    """A safetensors file with its header edited as `edits` say."""
    (n,) = struct.unpack("<Q", data[:8])
    header, payload = json.loads(data[8:8 + n]), data[8 + n:]
    length = None
    for edit in edits:
        kind, *args = edit
        names = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
        if kind == "whole":
            header = args[0]
        elif kind == "truncate":
            payload = payload[: args[0] % (len(payload) + 1)]
        elif kind == "header_len":
            length = args[0]
        elif not isinstance(header, dict):
            continue
        elif kind == "metadata":
            header["__metadata__"] = args[0]
        elif kind == "meta_key":
            if not isinstance(header.get("__metadata__"), dict):
                header["__metadata__"] = {}
            header["__metadata__"][args[0]] = args[1]
        elif names:
            name = names[args[0] % len(names)]
            entry = header[name]
            if kind == "drop":
                del header[name]
            elif kind == "rename":
                header[args[1]] = header.pop(name)
            elif not isinstance(entry, dict):
                continue
            elif kind == "dtype":
                entry["dtype"] = args[1]
            elif kind == "shape":
                entry["shape"] = args[1]
            elif kind == "offsets":
                entry["data_offsets"] = list(args[1])
            elif kind == "overlap":
                other = header[names[args[1] % len(names)]]
                if isinstance(other, dict):
                    entry["data_offsets"] = other.get("data_offsets")
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + payload


@FUZZ
@given(header_edits, st.sampled_from(["info", "translate"]))
def test_edited_safetensors_headers(trained_model, edits, command):
    """Headers of every JSON shape, offsets past the end, overlapping tensors, wrong dtypes and shapes:
    a clean exit every time, and one output line per input line when the file is accepted."""
    data = edited((trained_model / "model.safetensors").read_bytes(), edits)
    with tempfile.TemporaryDirectory() as tmp:
        model = _write(tmp, "model.safetensors", data)
        args = (["info", model] if command == "info"
                else ["translate", "-m", model, _write(tmp, "in", b"zuza\n\nzobo.\n"), "-q"])
        code, out, err = run_main(*args)
        assert_clean(code, err)
        if code == 0 and command == "translate":
            assert out.count("\n") == 3


@FUZZ
@given(header_edits)
def test_edited_training_states(trained_model, edits):
    """A damaged train_state file is one ModelFileError, or a state the trainer can really restore."""
    data = edited((trained_model / "train_state.safetensors").read_bytes(), edits)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(_write(tmp, "train_state.safetensors", data))
        try:
            state = load_state(path)
            progress = Progress.restored(state.progress, path)
        except ModelFileError:
            return
        optimizer = make_optimizer(state.bundle.model, 1e-3)  # restored as prepare() does, then one real step
        optimizer.load_state_dict({"state": state.optimizer, "param_groups": optimizer.state_dict()["param_groups"]})
        restore_rng(state.rng, torch.device("cpu"))
        state.bundle.model.train()
        batch = make_batch([[5, 6, 7]], [[5, 6]])
        state.bundle.model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out).backward()
        optimizer.step()
        assert min(progress.step, progress.epoch, progress.batch_in_epoch) >= 0


# -- the server's request body ----------------------------------------------------------------
_TRANSLATORS: dict = {}


def _server_app(model_dir):
    """A fresh app (its own batcher) over one translator per model, loaded once."""
    from seqtool.checkpoint import load_model
    from seqtool.serve import make_app
    from seqtool.translate import Translator

    if model_dir not in _TRANSLATORS:
        b = load_model(model_dir)
        decoding = b.config.decoding.model_copy(update={"beam_size": 2})
        _TRANSLATORS[model_dir] = Translator(b.model, b.src_tok, b.tgt_tok, decoding, with_pieces=True,
                                             shortlist=b.shortlist)
    return make_app(_TRANSLATORS[model_dir], {}, max_lines=20, max_body=4096)


request_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["lines", "beam", "text"]),
                    json_values | st.lists(st.text(max_size=30), max_size=25),
                    max_size=2).map(lambda v: json.dumps(v).encode()),
    st.lists(st.text(max_size=40), max_size=25).map(lambda lines: json.dumps({"lines": lines}).encode()),
)


@FUZZ
@given(request_bodies, st.sampled_from(["application/json", "text/plain", ""]))
def test_server_random_request_bodies(trained_model, body, content_type):
    """POST /translate with any body: a JSON answer with a 200 (one translation per line, each one line)
    or a 4xx and a one-line error; never a 500."""
    import asyncio

    import httpx

    app = _server_app(trained_model)

    async def post():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://seqtool") as client:
                return await asyncio.wait_for(client.post("/translate", content=body,
                                                          headers={"content-type": content_type}), 60)

    reply = asyncio.run(post())
    data = reply.json()
    if reply.status_code == 200:
        lines = json.loads(body)["lines"]
        assert len(data["translations"]) == len(lines)
        for line, t in zip(lines, data["translations"]):
            assert len(t["text"].splitlines()) <= 1 and (t["text"] == "" or line.strip())
    else:
        assert reply.status_code in (400, 413), (reply.status_code, data)
        assert isinstance(data["error"], str) and "\n" not in data["error"]

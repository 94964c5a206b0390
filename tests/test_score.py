"""`seqtool score`: the model's log-probability of given outputs, per line, through the real CLI."""

from __future__ import annotations

import json
import math
import re

import pytest

from conftest import SAMPLE, run_cli
from seqtool.checkpoint import load_model
from seqtool.data import encode_pairs
from seqtool.train import validation_loss
from test_cli_errors import assert_one_line_error


def _pairs(tmp_path, n=60):
    src = (SAMPLE / "test.src").read_text().splitlines()[:n]
    tgt = (SAMPLE / "test.tgt").read_text().splitlines()[:n]
    return src, tgt


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_scores_are_the_models_log_probabilities_line_by_line(trained_model, tmp_path):
    src, tgt = _pairs(tmp_path)
    proc = run_cli("score", "-m", str(trained_model), "--src", _write(tmp_path, "s", src), "--tgt",
                   _write(tmp_path, "t", tgt), "--batch-size", "7", check=True)
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert len(rows) == len(src)
    logprob = [float(r[0]) for r in rows]
    tokens = [int(r[2]) for r in rows]
    bundle = load_model(trained_model)
    assert tokens == [len(bundle.tgt_tok.encode(t)) + 1 for t in tgt]  # EOS counts
    assert all(abs(float(r[1]) - lp / n) < 1e-4 for r, lp, n in zip(rows, logprob, tokens))
    # The file's figure is minus the validation loss on the same pairs, as training computes it.
    loss, ppl = validation_loss(bundle.model.eval(), encode_pairs(src, tgt, bundle.src_tok, bundle.tgt_tok,
                                                                   1 << 30, 1 << 30), 10_000)
    assert sum(logprob) / sum(tokens) == pytest.approx(-loss, abs=1e-4)
    said = re.search(r"(\d+) of (\d+) lines scored, (\d+) target tokens: .* perplexity ([\d.]+)", proc.stderr)
    assert said and said.group(1) == said.group(2) == str(len(src)) and int(said.group(3)) == sum(tokens)
    assert float(said.group(4)) == pytest.approx(ppl, rel=1e-3)
    # A model that learned the task (test BLEU 100) prefers each reference to another line's reference.
    shuffled = tgt[1:] + tgt[:1]
    other = run_cli("score", "-m", str(trained_model), "-s", _write(tmp_path, "s", src), "-t",
                    _write(tmp_path, "o", shuffled), check=True)
    worse = [float(line.split("\t")[1]) for line in other.stdout.splitlines()]
    assert all(w < float(r[1]) for w, r in zip(worse, rows))


def test_a_line_scores_the_same_in_any_batch_and_json_gives_the_fields(trained_model, tmp_path):
    src, tgt = _pairs(tmp_path, 30)
    src[5] = ""  # an empty source: not scored, its line kept
    tgt[9] = ""  # an empty target: EOS alone
    s, t = _write(tmp_path, "s", src), _write(tmp_path, "t", tgt)
    one = run_cli("score", "-m", str(trained_model), "-s", s, "-t", t, "--batch-size", "1", "--json", "-q",
                  check=True)
    many = run_cli("score", "-m", str(trained_model), "-s", s, "-t", t, "--json", check=True)
    a = [json.loads(line) for line in one.stdout.splitlines()]
    b = [json.loads(line) for line in many.stdout.splitlines()]
    assert len(a) == len(b) == len(src) and one.stderr == ""
    assert a[5] == b[5] == {"logprob": None, "per_token": None, "tokens": None, "ppl": None}
    assert "1 with an empty source not scored" in many.stderr
    assert a[9]["tokens"] == 1
    for x, y in zip(a, b):
        if x["tokens"]:
            assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-3) and x["tokens"] == y["tokens"]
            assert x["ppl"] == pytest.approx(math.exp(-x["per_token"]), rel=1e-3)


def test_misaligned_or_undecodable_files_are_one_line_and_the_lines_before_are_kept(trained_model, tmp_path):
    src, tgt = _pairs(tmp_path, 10)
    good = run_cli("score", "-m", str(trained_model), "-s", _write(tmp_path, "s", src), "-t",
                   _write(tmp_path, "t", tgt), check=True)
    proc = run_cli("score", "-m", str(trained_model), "-s", _write(tmp_path, "s", src), "-t",
                   _write(tmp_path, "t", tgt[:8]))
    assert_one_line_error(proc, "t ends at line 8 but the other file goes on")
    assert proc.stdout.splitlines() == good.stdout.splitlines()[:8]  # the lines before it are scored and kept
    bad = tmp_path / "bad"
    bad.write_bytes(("\n".join(tgt[:3]) + "\n\xff\n").encode("latin-1"))
    proc = run_cli("score", "-m", str(trained_model), "-s", _write(tmp_path, "s", src), "-t", str(bad))
    assert_one_line_error(proc, "bad:4: invalid UTF-8")
    assert proc.stdout.splitlines() == good.stdout.splitlines()[:3]
    assert_one_line_error(run_cli("score", "-m", str(tmp_path / "nope"), "-s", "x", "-t", "y"), "not found")

"""Shared fixtures: paths, a CLI runner, and one tiny model trained for real on sample_data/."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

from seqtool.plot import read_metrics  # noqa: F401  (tests read runs' metrics.jsonl with it)

# Property tests draw the same examples on every run, so a red CI always reproduces;
# HYPOTHESIS_PROFILE=explore draws fresh random ones to hunt for new failures.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args: str, input: str | bytes | None = None, cwd: Path | None = None, timeout: float = 600,
            check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `seqtool ARGS` as a user would; text in/out unless bytes are given.

    In this process by default (`seqtool.cli.main` with its own argv, stdin, stdout, stderr, working
    directory and exit code): importing torch once instead of for every call saves minutes of the suite.
    A fresh interpreter (`python -m seqtool`) where `env` adds variables (read at start-up: colours, locale,
    SEQTOOL_TRACEBACK) and for --nproc (its worker processes write to the process's own stderr, and torch's
    launcher keeps signal handlers)."""
    if env or "--nproc" in args:
        text = not isinstance(input, bytes)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}  # env may set it back to "" (buffered)
        proc = subprocess.run([sys.executable, "-m", "seqtool", *args], input=input, capture_output=True, text=text,
                              cwd=cwd or ROOT, timeout=timeout, env=env)
    else:
        proc = _in_process(list(args), input, cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"seqtool {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _in_process(args: list[str], input: str | bytes | None, cwd: Path) -> subprocess.CompletedProcess:
    from seqtool import cli

    binary = isinstance(input, bytes)
    data = input if binary else (input or "").encode("utf-8")
    streams = {name: io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="") for name in ("stdout", "stderr")}
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    saved = sys.argv, sys.stdin, sys.stdout, sys.stderr, os.getcwd()
    environ = dict(os.environ)  # a command may set variables for the processes it starts
    code = 0
    try:
        sys.argv, sys.stdin, sys.stdout, sys.stderr = ["seqtool", *args], stdin, streams["stdout"], streams["stderr"]
        os.chdir(cwd)
        os.environ.pop("WORLD_SIZE", None)  # inherited from a torchrun job, main() would end this very process
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, sys.stdin, sys.stdout, sys.stderr, cwd_before = saved
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(environ)
    out = {}
    for name, stream in streams.items():
        stream.flush()
        raw = stream.buffer.getvalue()
        out[name] = raw if binary else raw.decode("utf-8", errors="replace")
    return subprocess.CompletedProcess(["seqtool", *args], code, out["stdout"], out["stderr"])


# A model that learns the sample task, not just runs: test BLEU 100 (beam 5) after 400 steps, about 30 s on 2
# cores. The hidden-32 default of tiny_config plateaus near 89 (it drops sentence-final words), which would
# let a broken decoding mode pass a threshold set below it.
LEARNS = {"model": {"embedding_size": 64, "encoder_hidden_size": 64, "hidden_size": 128},
          "training": {"max_steps": 400, "valid_every": 200}}


def readline_within(stream, timeout: float) -> bytes:
    """One line from an unbuffered binary pipe (Popen bufsize=0), or fail after `timeout` s: never hang."""
    line, deadline = b"", time.monotonic() + timeout
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no line within {timeout} s (got {line!r})"
        byte = stream.read(1)
        assert byte, f"the pipe closed (got {line!r})"
        line += byte
    return line


def tiny_config(model_dir: Path, **sections) -> dict:
    """A config for a tiny model (hidden 32) on the sample task, for tests of the mechanics; keyword args
    update sections (pass **LEARNS for a model that must learn the task)."""
    cfg = {
        "data": {"train_src": str(SAMPLE / "train.src"), "train_tgt": str(SAMPLE / "train.tgt"),
                 "valid_src": str(SAMPLE / "valid.src"), "valid_tgt": str(SAMPLE / "valid.tgt")},
        "tokenizer": {"type": "bpe", "vocab_size": 600},
        "model": {"embedding_size": 32, "encoder_hidden_size": 32, "hidden_size": 32, "dropout": 0.1},
        "training": {"model_dir": str(model_dir), "batch_tokens": 1500, "lr": 0.003, "max_steps": 700,
                     "valid_every": 350, "valid_max_sentences": 200,
                     "precision": "fp32"},  # the same arithmetic on every CPU; test_device checks what auto picks
        "decoding": {"beam_size": 5, "shortlist": 5},  # the shortlist path runs in every end-to-end test
    }
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def bleu_per_flags(model_dir: Path, tmp_path: Path, variants: list[list[str]], n: int = 100) -> dict[str, float]:
    """Translate the first n sample test lines, with an empty line in the middle, once per list of
    decoding flags; check every line is answered in place and return test BLEU per variant."""
    import re

    half = n // 2
    src, ref = tmp_path / "in.src", tmp_path / "ref"
    for path, name in ((src, "test.src"), (ref, "test.tgt")):
        lines = (SAMPLE / name).read_text().splitlines()[:n]
        path.write_text("\n".join(lines[:half] + [""] + lines[half:]) + "\n")
    bleus = {}
    for flags in variants:
        out = run_cli("translate", "-m", str(model_dir), str(src), *flags, check=True).stdout.split("\n")
        assert len(out) == n + 2 and out[half] == "" and out[-1] == "" and all(out[:half])
        proc = run_cli("evaluate", "-m", str(model_dir), "--src", str(src), "--ref", str(ref), *flags, check=True)
        bleus[" ".join(flags)] = float(re.search(r"bleu = ([\d.]+)", proc.stdout).group(1))
    return bleus


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """Train the sample model once through the real CLI (it reaches test BLEU 100); returns its model dir."""
    work = tmp_path_factory.mktemp("trained")
    model_dir = work / "model"
    config = write_config(work / "tiny.yaml", tiny_config(model_dir, **LEARNS))
    run_cli("train", "-c", str(config), "-q", check=True)
    return model_dir

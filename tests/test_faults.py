"""Faults during training: kill -9 at random moments, a full disk, a model dir that cannot be written."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli, tiny_config, write_config
from seqtool.checkpoint import MODEL_FILE, STATE_FILE, load_model, load_state
from seqtool.config import validate
from seqtool.errors import SeqtoolError
from seqtool.train import run_training

FAST = {"max_steps": 100000, "valid_every": 5, "valid_max_sentences": 10, "batch_tokens": 400, "keep_last": 2}


def _check_run_dir(model_dir) -> int:
    """Every file under its real name is whole; returns the step of the resumable state."""
    load_model(model_dir / MODEL_FILE)
    for step_file in model_dir.glob("step*.safetensors"):
        load_model(step_file)
    for line in (model_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    return load_state(model_dir / STATE_FILE).progress["step"]


def _wait_stopped(pid: int) -> None:
    """Until the process is really stopped (state T in /proc), so that what it has written can be looked at."""
    for _ in range(10000):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.0005)
    raise AssertionError("the process did not stop")


def _kill_mid_write(proc: subprocess.Popen, model_dir, prefix: str, deadline: float) -> str:
    """SIGKILL `proc` while it writes a file whose temporary name starts with `prefix`: stop it (SIGSTOP) as
    soon as such a temporary file appears, and kill it only if the file is still there, i.e. the write (or its
    fsync, or the rename) has not finished; else let it go on and wait for the next write. Returns the name."""
    while time.time() < deadline:
        for entry in os.scandir(model_dir) if model_dir.exists() else ():
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
                proc.send_signal(signal.SIGSTOP)
                _wait_stopped(proc.pid)
                if os.path.exists(entry.path):
                    proc.send_signal(signal.SIGKILL)
                    return entry.name
                proc.send_signal(signal.SIGCONT)
        if proc.poll() is not None:
            raise AssertionError(f"training ended before a write was caught: {proc.stderr.read()}")
    raise AssertionError("no write caught in time")


def test_kill_9_at_random_moments_never_leaves_a_damaged_file(tmp_path):
    """Four kills: two land inside a checkpoint write (the training state, then any file; proven by its
    temporary file still being there), two at random moments. Every file stays whole, --resume goes on."""
    model_dir = tmp_path / "m"
    config = write_config(tmp_path / "c.yaml", tiny_config(model_dir, training=FAST))
    rng = random.Random(20261123)
    resumed_at, caught = [], []
    for round_, how in enumerate([".train_state.safetensors.", "random", ".", "random"]):
        args = [sys.executable, "-m", "seqtool", "train", "-c", str(config), "-q"] + (["--resume"] if round_ else [])
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        state = model_dir / STATE_FILE
        before = state.stat().st_mtime_ns if state.exists() else 0
        deadline = time.time() + 120
        while not (state.exists() and state.stat().st_mtime_ns != before) and time.time() < deadline:
            time.sleep(0.02)
        if how == "random":
            time.sleep(rng.uniform(0.0, 1.0))  # anywhere in the next few checkpoint intervals
            proc.send_signal(signal.SIGKILL)
        else:
            name = _kill_mid_write(proc, model_dir, how, deadline)
            caught.append(name)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        if how != "random":
            assert (model_dir / name).exists()  # the killed writer's temporary file: the kill landed mid-write
        metrics_before = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
        step = _check_run_dir(model_dir)
        assert step >= metrics_before[-1] - FAST["valid_every"]  # at most one checkpoint interval lost
        resumed_at.append(step)
    assert caught[0].startswith(".train_state.safetensors.") and len(caught) == 2
    done = run_cli("train", "-c", str(config), "--resume", "--set", f"training.max_steps={resumed_at[-1] + 5}")
    assert done.returncode == 0, done.stderr
    assert f"resuming at step {resumed_at[-1]}" in done.stderr
    assert not list(model_dir.glob(".*.tmp"))  # what the killed writers left is cleaned up
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice after the redo
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] > resumed_at[0]


def test_disk_full_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = validate(tiny_config(tmp_path / "m", training={**FAST, "max_steps": 40}))
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync_until_full(fd):
        calls["n"] += 1
        if calls["n"] > 12:  # the first few checkpoints fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    with pytest.raises(SeqtoolError, match=r"cannot write .*: No space left on device"):
        run_training(cfg, quiet=True)
    monkeypatch.undo()
    step = _check_run_dir(tmp_path / "m")
    assert 5 <= step < 40
    assert not list((tmp_path / "m").glob(".*.tmp"))  # the failed write's temporary file is gone


def test_model_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path / "c.yaml", tiny_config(blocker / "run", training={**FAST, "max_steps": 5}))
    proc = run_cli("train", "-c", str(config))
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == (
        f"seqtool: error: cannot create the model dir {blocker / 'run'}: Not a directory")
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_model_dir_that_cannot_be_written(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    config = write_config(tmp_path / "d.yaml", tiny_config(locked, training={**FAST, "max_steps": 5}))
    proc = run_cli("train", "-c", str(config))
    assert proc.returncode == 1 and "Permission denied" in proc.stderr.splitlines()[-1]

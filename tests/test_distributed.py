"""Data-parallel training with torch.distributed (gloo): 2 CPU processes against 1, through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_metrics, run_cli, tiny_config, write_config
from seqtool.checkpoint import STATE_FILE, load_state
from seqtool.distributed import Ranks, my_share

# No dropout: then 2 processes sharing each global batch compute the same gradients as 1 process
# (up to the order of float additions), and the runs can be compared step for step. The dev BLEU of 60 steps
# stalls, so the plateau schedule, which rank 0 steps, halves the rate from step 30 on: every rank must follow.
SETUP = {"training": {"max_steps": 60, "valid_every": 15, "valid_max_sentences": 50, "batch_tokens": 800, "lr": 0.003,
                      "schedule": "plateau", "plateau_patience": 0},
         "model": {"embedding_size": 32, "encoder_hidden_size": 32, "hidden_size": 32, "dropout": 0.0}}


def _config(tmp_path, name: str, **training) -> str:
    cfg = tiny_config(tmp_path / name, training={**SETUP["training"], **training}, model=SETUP["model"])
    return str(write_config(tmp_path / f"{name}.yaml", cfg))


def test_two_processes_follow_one_process_and_resume(tmp_path):
    one = run_cli("train", "-c", _config(tmp_path, "one"), check=True)
    # The workers train the config as the command resolved it: -o and --set reach them.
    two_half = run_cli("train", "-c", _config(tmp_path, "elsewhere", max_steps=30), "-o", str(tmp_path / "two"),
                       "--nproc", "2", check=True)
    assert "data-parallel training on 2 processes" in two_half.stderr and not (tmp_path / "elsewhere").exists()
    two = run_cli("train", "-c", _config(tmp_path, "two", max_steps=30), "--set", "training.max_steps=60",
                  "--nproc", "2", "--resume", check=True)
    assert "resuming at step 30" in two.stderr
    # Rank 0 alone logs: each validation once.
    assert one.stderr.count("validation at step 30") == two_half.stderr.count("validation at step 30") == 1
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [15, 30, 45, 60]
    assert [r["lr"] for r in a] == [r["lr"] for r in b] == [0.003, 0.003, 0.0015, 0.00075]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "valid_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-3), (key, ra, rb)
    assert b[-1]["valid_loss"] < 0.8 * a[0]["train_loss"]  # it learned
    wa = load_state(tmp_path / "one" / STATE_FILE).bundle.model.state_dict()
    wb = load_state(tmp_path / "two" / STATE_FILE).bundle.model.state_dict()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-4, msg=name)  # measured: 2.4e-6
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == ["config.yaml", "metrics.jsonl", "model.safetensors", "train_state.safetensors"]


def test_nproc_reports_user_errors_once(tmp_path):
    cfg = json.loads(json.dumps(tiny_config(tmp_path / "m")))
    cfg["data"]["train_src"] = str(tmp_path / "missing.src")
    proc = run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), "--nproc", "2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "file not found" in proc.stderr


@pytest.mark.parametrize("n, world", [(5, 2), (1, 2), (7, 3), (4, 4)])
def test_shares_cover_the_batch_once(n, world):
    idx = list(range(100, 100 + n))
    shares = [my_share(idx, Ranks(r, world)) for r in range(world)]
    real = [i for share, ok in shares if ok for i in share]
    assert sorted(real) == idx and all(share for share, _ in shares)

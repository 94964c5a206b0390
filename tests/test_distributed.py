"""Data-parallel training with torch.distributed (gloo): 2 CPU processes against 1, through the CLI; two
"nodes" on one host through torchrun's rendezvous; a worker killed mid-training; a rank that fails alone."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, SAMPLE, read_metrics, run_cli, tiny_config, write_config
from seqtool.checkpoint import MODEL_FILE, STATE_FILE, load_model, load_state
from seqtool.config import validate
from seqtool.distributed import Ranks, my_share
from seqtool.errors import SeqtoolError
from seqtool.train import restarted_job_resumes

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


def test_a_rank_leaves_with_its_output_and_exit_code(trained_model, tmp_path):
    """A rank of a torchrun job ends without the interpreter's teardown (gloo's threads outlive the process group
    and now and then abort it there): what it printed still arrives, flushed, and its exit code is kept."""
    # An exit handler that leaves a mark: the interpreter's teardown ran.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import atexit, os\natexit.register(lambda: open(os.environ['TEARDOWN_MARK'], 'w').close())\n")
    mark = tmp_path / "teardown"
    alone = {"PYTHONPATH": str(tmp_path / "site"), "TEARDOWN_MARK": str(mark), "PYTHONUNBUFFERED": ""}  # buffered
    rank = {**alone, "WORLD_SIZE": "2", "RANK": "1"}
    plain = run_cli("info", str(trained_model), "--json", env=alone)
    assert plain.returncode == 0 and mark.exists()
    mark.unlink()
    ranked = run_cli("info", str(trained_model), "--json", env=rank)
    assert ranked.returncode == 0 and ranked.stdout == plain.stdout and json.loads(ranked.stdout)
    assert not mark.exists()
    missing = run_cli("info", str(tmp_path / "none"), env=rank)
    plain = run_cli("info", str(tmp_path / "none"))
    assert missing.returncode == plain.returncode == 1 and missing.stdout == ""
    assert missing.stderr == plain.stderr.replace("error:", "error (rank 1):", 1) and missing.stderr.count("\n") == 1
    usage = run_cli("info", "--bogus", env=rank)
    assert usage.returncode == 2 and "No such option" in usage.stderr


@pytest.mark.parametrize("n, world", [(5, 2), (1, 2), (7, 3), (4, 4)])
def test_shares_cover_the_batch_once(n, world):
    idx = list(range(100, 100 + n))
    shares = [my_share(idx, Ranks(r, world)) for r in range(world)]
    real = [i for share, ok in shares if ok for i in share]
    assert sorted(real) == idx and all(share for share, _ in shares)



# torchrun itself, as a user starts it; one thread per worker, unbuffered so that the log can be followed.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(config: Path, cwds: list[Path], timeout: float = 300) -> list[tuple[int, str]]:
    """Two one-process torchrun "nodes" on this host, each in its own working directory, meeting at a c10d
    rendezvous on 127.0.0.1 -> each one's (exit code, stderr). Started in order: the rendezvous ranks the nodes
    by (host, agent pid), so the first is rank 0. A hang fails the test after `timeout`, never the suite."""
    port, procs = _free_port(), []
    for cwd in cwds:
        cwd.mkdir(exist_ok=True)
        procs.append(subprocess.Popen(
            [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "-m", "seqtool", "train", "-c", str(config)],
            cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    finally:
        for p in procs:
            p.kill()


def test_two_nodes_on_one_host_train_as_two_processes_do(tmp_path):
    run_cli("train", "-c", _config(tmp_path, "one_node"), "--nproc", "2", check=True)
    cfg = tiny_config(Path("run"), training=SETUP["training"], model=SETUP["model"])  # relative: in each node's cwd
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    ended = _two_nodes(write_config(tmp_path / "nodes.yaml", cfg), nodes)
    assert [code for code, _ in ended] == [0, 0], ended
    written = [n / "run" for n in nodes if (n / "run").exists()]
    assert written == [nodes[0] / "run"], ended  # rank 0 alone writes
    a, b = read_metrics(tmp_path / "one_node"), read_metrics(written[0])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [15, 30, 45, 60]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "valid_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-3), (key, ra, rb)
    wa = load_state(tmp_path / "one_node" / STATE_FILE).bundle.model.state_dict()
    wb = load_state(written[0] / STATE_FILE).bundle.model.state_dict()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-4, msg=name)


def test_a_rank_that_fails_on_its_own_bad_data_stops_every_rank_with_that_error(tmp_path):
    """Each node reads data/ in its own working directory; node 1's training source has a line that is not
    UTF-8. Both ranks stop, quickly, each with one line giving that error; no traceback from seqtool."""
    cfg = tiny_config(Path("run"), training=SETUP["training"], model=SETUP["model"])
    cfg["data"].update(train_src="data/train.src", train_tgt="data/train.tgt")
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        (node / "data").mkdir(parents=True)
        for side in ("src", "tgt"):
            (node / "data" / f"train.{side}").write_bytes((SAMPLE / f"train.{side}").read_bytes())
    lines = (SAMPLE / "train.src").read_bytes().split(b"\n")
    lines[700] = b"ein \xff\xfe kaputt"
    (nodes[1] / "data" / "train.src").write_bytes(b"\n".join(lines))
    start = time.monotonic()
    ended = _two_nodes(write_config(tmp_path / "nodes.yaml", cfg), nodes)
    assert time.monotonic() - start < 120  # not a hang until gloo's timeout
    assert all(code != 0 for code, _ in ended), ended
    errors = [[line for line in err.splitlines() if line.startswith("seqtool: error")] for _, err in ended]
    assert [len(e) for e in errors] == [1, 1], ended
    messages = {re.sub(r"^seqtool: error( \(rank \d\))?: ", "", e[0]) for e in errors}
    assert messages == {"data/train.src:701: invalid UTF-8 at byte 5"}, errors
    assert not any("seqtool/" in err and "Traceback" in err.split("seqtool: error")[0] for _, err in ended)
    assert not (nodes[1] / "run").exists()


def _worker(launcher_pid: int, rank: int) -> int:
    """The pid of the worker process of `rank` among the launcher's children."""
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(pid)
    raise AssertionError(f"no worker of rank {rank}")


def _kill_a_worker_at(cmd: list[str], step: int, rank: int, timeout: float = 300) -> tuple[int, str]:
    """Start `cmd` (a launcher of 2 workers, run with -v: a log line every 10 steps), SIGKILL the worker of
    `rank` once rank 0 has logged `step`, and let the launcher finish -> (exit code, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(f"step {step} "):
                os.kill(_worker(proc.pid, rank), signal.SIGKILL)
                break
        else:
            raise AssertionError("training ended before the step to kill at: " + "".join(seen))
        rest = proc.communicate(timeout=timeout)[1]
        return proc.returncode, "".join(seen) + rest
    finally:
        proc.kill()


def _steps_lost(log: str) -> tuple[int, int]:
    """(the step a rank lost contact after, the step the restarted or resumed run went on from)."""
    lost = int(re.search(r"lost contact with another rank of this job after step (\d+)", log).group(1))
    resumed = int(re.search(r"resuming at step (\d+)", log).group(1))
    return lost, resumed


KILL = {"max_steps": 120, "valid_every": 20}  # a checkpoint at every validation


def test_a_killed_worker_is_restarted_by_torchrun_and_the_job_resumes_its_checkpoint(tmp_path):
    rng = random.Random(24)
    step, rank = 10 * rng.randint(3, 9), rng.randint(0, 1)  # after the first checkpoint (step 20)
    cfg = _config(tmp_path, "m", **KILL)
    code, log = _kill_a_worker_at([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                                   "-m", "seqtool", "train", "-c", cfg, "-v"], step, rank)
    assert code == 0, log
    assert log.count("the launcher restarted the workers (restart 1 of 1)") == 1 and "Traceback" not in log, log
    lost, resumed = _steps_lost(log)
    assert lost >= step and resumed % 20 == 0 and 0 <= lost - resumed <= 20, (step, lost, resumed)  # one interval
    assert [r["step"] for r in read_metrics(tmp_path / "m")] == [20, 40, 60, 80, 100, 120]
    load_model(tmp_path / "m" / MODEL_FILE)


def test_with_no_restarts_left_the_job_ends_with_one_line_and_resume_continues(tmp_path):
    rng = random.Random(25)
    step, rank = 10 * rng.randint(3, 9), rng.randint(0, 1)
    cfg = _config(tmp_path, "m", **KILL)
    code, log = _kill_a_worker_at([sys.executable, "-m", "seqtool", "train", "-c", cfg, "--nproc", "2", "-v"],
                                  step, rank)
    errors = [line for line in log.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code == 1 and len(errors) == 1 and "`seqtool train --resume` continues from the checkpoint" in errors[0]
    resumed = run_cli("train", "-c", cfg, "--resume", check=True)
    lost, at = _steps_lost(log + resumed.stderr)
    assert 0 <= lost - at <= 20 and at >= 20, (step, lost, at)
    assert [r["step"] for r in read_metrics(tmp_path / "m")] == [20, 40, 60, 80, 100, 120]


def test_restarted_workers_resume_only_their_own_jobs_checkpoint(tmp_path, monkeypatch):
    cfg = validate(tiny_config(tmp_path / "m"))
    (tmp_path / "m").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "m" / STATE_FILE, metadata={"progress": json.dumps({"job": "j1"})})
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "j1")
    assert not restarted_job_resumes(cfg)  # the first attempt: as the flags say
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restarted_job_resumes(cfg)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "j2")  # an earlier job's run: refused as usual (no --resume)
    assert not restarted_job_resumes(cfg)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default: every job's, so it cannot tell
    with pytest.raises(SeqtoolError, match="its own --rdzv-id"):
        restarted_job_resumes(cfg)

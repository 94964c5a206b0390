"""Training runs of a benchmark, one at a time or several side by side, each pinned to its own cores.

A run is a `seqtool train` with config overrides. Side by side (`parallel` > 1) each run gets
`cores // parallel` cores (taskset) and as many torch threads, so every run of the benchmark has the same
share of the machine and their budgets in minutes stay comparable; one at a time, a run has every core.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from seqtool.checkpoint import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    name: str
    sets: tuple[str, ...]  # KEY=VALUE config overrides


def parser(doc: str, name: str, minutes: float) -> argparse.ArgumentParser:
    """The options every benchmark of training runs takes: budget, runs side by side, output folder, picture."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=minutes, help="training budget of each run")
    ap.add_argument("--parallel", type=int, default=1, help="runs side by side, each on its own cores")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / f"bench_{name}" / time.strftime("%Y%m%d-%H%M%S"))
    ap.add_argument("--plot", type=Path, help=f"the PNG to draw (default OUT/{name}.png)")
    return ap


def cores_of(slot: int, parallel: int) -> list[int]:
    """The cores a run in `slot` (0 .. parallel-1) may use."""
    cores = sorted(os.sched_getaffinity(0))
    if parallel > len(cores):
        raise SystemExit(f"--parallel {parallel}: this machine has {len(cores)} cores for the runs")
    per = max(1, len(cores) // parallel)
    return cores[slot * per:(slot + 1) * per]


def pinned(cmd: Sequence[str], cores: list[int]) -> tuple[list[str], dict[str, str]]:
    """`cmd` restricted to `cores`, with torch's thread count to match."""
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cores))}
    return ["taskset", "-c", ",".join(map(str, cores)), *cmd], env


def seqtool(args: Sequence[str], cores: list[int], log: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m seqtool ARGS` on `cores`; stderr to `log` when given. Raises on failure."""
    cmd, env = pinned([sys.executable, "-m", "seqtool", *args], cores)
    with open(log, "w") if log else open(os.devnull, "w") as err:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, check=True)


def train_all(runs: Sequence[Run], config: str, out: Path, minutes: float, parallel: int,
              then: Callable[[Run, Path, list[int]], None] | None = None) -> None:
    """Train every run for `minutes` into OUT/NAME, `parallel` at a time, each on its own cores; `then(run,
    model_dir, cores)` follows each run's training on the same cores (decoding, scoring). Run again with the same
    OUT, a finished run is kept and a stopped one resumed (its budget counts what it had trained). The first
    failure stops the runs not yet started and is raised."""
    free: queue.Queue[list[int]] = queue.Queue()  # core sets not in use: a run takes one and gives it back
    for slot in range(parallel):
        free.put(cores_of(slot, parallel))
    failed = threading.Event()

    def one(run: Run) -> None:
        if failed.is_set():
            return
        cores = free.get()
        try:
            model_dir = out / run.name
            if not (model_dir / "done").exists():
                sets = [*run.sets, f"training.model_dir={model_dir}", f"training.max_minutes={minutes}",
                        f"training.threads={len(cores)}"]
                resume = ["--resume"] if (model_dir / STATE_FILE).exists() else []
                seqtool(["train", "-c", config, "-q", *resume, *(a for kv in sets for a in ("--set", kv))], cores,
                        out / f"{run.name}.log")
                (model_dir / "done").touch()
            if then is not None:
                then(run, model_dir, cores)
            print(f"{run.name} done", file=sys.stderr, flush=True)
        except BaseException:
            failed.set()
            raise
        finally:
            free.put(cores)

    with ThreadPoolExecutor(parallel) as pool:
        for future in [pool.submit(one, run) for run in runs]:
            future.result()

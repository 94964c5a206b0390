"""Data-parallel speed-up on this machine: the Multi30k de-en model trained by 1 process and by N.

Each run trains configs/multi30k_deen.yaml for the same number of steps with the same global batch
(`training.batch_tokens`), so the runs do the same work; 1 process uses torch's default threads
(one per core), N processes one thread each (as torchrun sets). Target tokens/s come from the
run's metrics.jsonl (training steps only: validation and start-up excluded); the table gives the
ratio against 1 process measured in the same session.

    python bench/scaling.py                   # 1 and 2 processes, 300 steps each, about 6 minutes
    python bench/scaling.py --nproc 1,2,4 --steps 500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(nproc: int, steps: int, out: Path) -> dict:
    model_dir = out / f"nproc{nproc}"
    cmd = [sys.executable, "-m", "seqtool", "train", "-c", "configs/multi30k_deen.yaml", "-q", "--nproc", str(nproc),
           "--set", f"training.model_dir={model_dir}", "--set", f"training.max_steps={steps}",
           "--set", f"training.valid_every={steps}", "--set", "training.valid_max_sentences=100",
           "--set", "training.max_minutes=0"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ))
    wall = time.perf_counter() - start
    last = json.loads((model_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"nproc": nproc, "steps": last["step"], "tgt_tok_per_s": last["train_tgt_tok_per_s"],
            "sent_per_s": last["train_sent_per_s"], "wall_s": round(wall, 1), "valid_loss": last["valid_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_scaling")
    args = ap.parse_args()
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    print(f"{os.cpu_count()} CPUs\n\n| processes | steps | sentences/s | target tok/s | wall s | valid loss | "
          "speed-up |\n"
          "|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    base = None
    for n in (int(x) for x in args.nproc.split(",")):
        r = train(n, args.steps, out)
        base = base or r
        print(f"| {n} | {r['steps']} | {r['sent_per_s']} | {r['tgt_tok_per_s']:,.0f} | {r['wall_s']} "
              f"| {r['valid_loss']} | {r['tgt_tok_per_s'] / base['tgt_tok_per_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

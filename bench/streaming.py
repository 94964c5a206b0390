"""Training memory and speed as the corpus grows, in memory vs streamed from shards (data.stream).

Trains configs/couplets.yaml for a fixed number of steps on three corpus sizes made of the real
shards in ../shared/data/couplets: the couplets (75k pairs), couplets + poetry (316k), and that list
four times over (1.26M pairs, as four epochs' worth of shards). Each run is a fresh process; its
peak RSS comes from wait4, its target tokens/s from metrics.jsonl. Prints a markdown table with
the ratios against the smallest in-memory run of the same session.

    python bench/streaming.py                 # 6 runs of 200 steps, about 15 minutes on 2 cores
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
DATA = ROOT.parent / "shared" / "data" / "couplets"
SHARDS = {"couplets": [DATA / "train"], "couplets+poetry": [DATA / "train", DATA / "poetry" / "train"]}
SHARDS["(couplets+poetry) x4"] = SHARDS["couplets+poetry"] * 4


def train(name: str, stream: bool, steps: int, out: Path) -> dict:
    model_dir = out / f"{name.replace(' ', '').replace('+', '_')}-{'stream' if stream else 'memory'}"
    src = json.dumps([f"{p}.src" for p in SHARDS[name]])
    tgt = json.dumps([f"{p}.tgt" for p in SHARDS[name]])
    cmd = [sys.executable, "-m", "seqtool", "train", "-c", "configs/couplets.yaml", "-q",
           "--set", f"training.model_dir={model_dir}", "--set", f"data.train_src={src}",
           "--set", f"data.train_tgt={tgt}",
           "--set", f"data.stream={str(stream).lower()}", "--set", f"training.max_steps={steps}",
           "--set", f"training.valid_every={steps}", "--set", "training.max_minutes=0",
           # the same tokenizer sample for every size, so the runs differ only in how the pairs are held
           "--set", "tokenizer.max_sentences=200000"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed")
    metrics = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    pairs = sum(sum(1 for _ in open(f"{p}.src", "rb")) for p in SHARDS[name])
    return {"corpus": name, "pairs": pairs, "mode": "stream" if stream else "memory", "steps": metrics[-1]["step"],
            "tgt_tok_per_s": metrics[-1]["train_tgt_tok_per_s"], "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_streaming")
    args = ap.parse_args()
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    print("| corpus | pairs | mode | steps | target tok/s | wall s (incl. start-up) | peak RSS MB | tok/s vs base | "
          "RSS vs base |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|---:|", flush=True)
    base = None
    with open(out / "results.jsonl", "w") as log:
        for name in SHARDS:
            for stream in (False, True):
                r = train(name, stream, args.steps, out)
                base = base or r
                log.write(json.dumps(r) + "\n")
                print(f"| {name} | {r['pairs']:,} | {r['mode']} | {r['steps']} | {r['tgt_tok_per_s']:,.0f} "
                      f"| {r['wall_s']} | {r['peak_rss_mb']} | {r['tgt_tok_per_s'] / base['tgt_tok_per_s']:.2f} "
                      f"| {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

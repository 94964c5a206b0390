"""Does decoding stay linear in the input? Time and peak memory for 1k, 10k and 100k lines, one run.

Translates the first N lines of Multi30k train.de (29k lines, repeated as needed; nothing is cached,
so a repeat costs what a new line does) with a trained Multi30k de-en model, one command per size,
timed and measured as bench/compare_peers.py does. Linear means lines/s and peak RSS stay flat as N grows:
the translator streams through a bounded read-ahead buffer.

    python bench/decode_scaling.py runs/multi30k_deen                    # greedy, fast flags, 1k/10k/100k
    python bench/decode_scaling.py runs/multi30k_deen --beam 5 --sizes 1000,10000
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

from compare_peers import DATA, ROOT, VARIANTS, measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--variant", default="fast", choices=sorted(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_decode_scaling" / time.strftime("%Y%m%d-%H%M%S"))
    args = ap.parse_args()
    args.out.mkdir(parents=True)
    source = (DATA / "train.de").read_text(encoding="utf-8").splitlines()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        src = args.out / f"in.{n}.de"
        src.write_text("\n".join(itertools.islice(itertools.cycle(source), n)) + "\n", encoding="utf-8")
        cmd = [sys.executable, "-m", "seqtool", "translate", "-m", args.model_dir, str(src),
               "-o", str(args.out / f"out.{n}.en"), "--beam", str(args.beam), "--batch-size", "64",
               *VARIANTS[args.variant]]
        rep = measure(cmd, args.out / f"measure.{n}.json", stderr=args.out / f"log.{n}.txt")
        tool_s = float(re.findall(r"translated \d+ lines in ([\d.]+) s", (args.out / f"log.{n}.txt").read_text())[-1])
        outputs = (args.out / f"out.{n}.en").read_text(encoding="utf-8").count("\n")
        row = {"lines": n, "outputs": outputs, "tool_s": tool_s, "wall_s": rep["wall_s"],
               "peak_rss_mb": rep["peak_rss_mb"]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    base = rows[0]
    print(f"beam {args.beam}, {args.variant}, batch 64; ratios against {base['lines']:,} lines\n")
    print("| lines | outputs | decode s (tool) | lines/s (tool) | lines/s vs smallest | whole command s | "
          "peak RSS MB |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rate, base_rate = r["lines"] / r["tool_s"], base["lines"] / base["tool_s"]
        print(f"| {r['lines']:,} | {r['outputs']:,} | {r['tool_s']} | {rate:.1f} | {rate / base_rate:.2f}x | "
              f"{r['wall_s']} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()

"""Decoding speed and BLEU of a trained Multi30k de-en model: fp32 against int8 and bf16 (`--quantize`,
decoding.quantize_kind; bf16 only on a CPU with native bf16), a vocabulary shortlist (`--shortlist 10`) and
both, one run.

Decodes test2016 (1,000 sentences, batch 64) greedy and at beam 5 in each variant, one command at a
time, timed as bench/compare_peers.py times them (the tool's own decode time and the whole command,
start-up included, with peak RSS); ratios are against fp32 at the same beam.

    python bench/decode.py runs/multi30k_deen          # a model dir trained with configs/multi30k_deen.yaml
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from compare_peers import ROOT, VARIANTS, runnable, seqtool_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_decode" / time.strftime("%Y%m%d-%H%M%S"))
    args = ap.parse_args()
    args.out.mkdir(parents=True)
    rows = []
    for beam in (1, 5):
        for label, flags in VARIANTS.items():
            if not runnable(label):
                continue
            row = {"variant": label, **seqtool_decode(args.out, args.model_dir, beam, flags, f".{label}")}
            rows.append(row)
            with open(args.out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    print("| beam | variant | BLEU | chrF | decode s (tool) | whole command s | speed-up (tool / command) | "
          "peak RSS MB |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if b["beam"] == r["beam"] and b["variant"] == "fp32")
        print(f"| {r['beam']} | {r['variant']} | {r['bleu']} | {r['chrf']} | {r['tool_s']} | {r['wall_s']} | "
              f"{base['tool_s'] / r['tool_s']:.2f}x / {base['wall_s'] / r['wall_s']:.2f}x | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()

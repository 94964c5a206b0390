"""Ensembles and checkpoint averaging on Multi30k de-en, one run: each model alone, their averaged weights
(`seqtool average`, for the kept checkpoints of one run) and their ensemble (`translate -m A -m B -m C`),
decoded at beam 5 over the whole vocabulary (test2016, batch 64); and `seqtool score` of the references
(perplexity of test2016 under each, with its lines/s).

    seqtool train -c configs/multi30k_deen.yaml --set training.keep_last=3 --set training.valid_every=300 \
        --set training.max_minutes=12 -o runs/m30k_ens
    python bench/ensemble.py runs/m30k_ens                      # its last three kept checkpoints
    python bench/ensemble.py --models runs/seed1 runs/seed2 runs/seed3   # three seeds (no weight averaging)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from compare_peers import DATA, ROOT, seqtool_decode

from seqtool.checkpoint import step_models

WHOLE = ("--shortlist", "0")


def score(model: str) -> dict:
    """`seqtool score` of test2016's references: the file's perplexity and lines/s (whole command)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "seqtool", "score", "-m", model, "--src", str(DATA / "test2016.de"),
                           "--tgt", str(DATA / "test2016.en")], cwd=ROOT, capture_output=True, text=True, check=True)
    seconds = time.monotonic() - start
    ppl = float(re.search(r"perplexity ([\d.]+)", proc.stderr).group(1))
    return {"ppl": ppl, "score_lines_per_s": round(len(proc.stdout.splitlines()) / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="a run dir trained with training.keep_last >= 3")
    ap.add_argument("--models", nargs="+", help="model dirs or files instead (other seeds, say)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_ensemble" / time.strftime("%Y%m%d-%H%M%S"))
    args = ap.parse_args()
    if bool(args.run) == bool(args.models):
        ap.error("give a run dir, or --models")
    members = [str(Path(m).resolve()) for m in args.models] if args.models else \
        [str(p.resolve()) for p in step_models(Path(args.run))[-3:]]
    if len(members) < 2:
        ap.error(f"an ensemble needs at least 2 models; {args.run} keeps {len(members)} (training.keep_last)")
    args.out.mkdir(parents=True)
    rows = []
    for m in members:
        rows.append({"model": Path(m).name, **seqtool_decode(args.out, m, 5, WHOLE, ".alone"), **score(m)})
    if args.run:
        averaged = str(args.out / "averaged.safetensors")
        subprocess.run([sys.executable, "-m", "seqtool", "average", args.run, "--last", str(len(members)), "-o",
                        averaged], cwd=ROOT, check=True)
        rows.append({"model": f"averaged weights of the {len(members)}", **seqtool_decode(args.out, averaged, 5, WHOLE),
                     **score(averaged)})
    others = tuple(a for m in members[1:] for a in ("-m", m))
    rows.append({"model": f"ensemble of the {len(members)}",
                 **seqtool_decode(args.out, members[0], 5, (*WHOLE, *others), ".ensemble")})
    with open(args.out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    what = args.run or ", ".join(args.models)
    print(f"{what}, {time.strftime('%Y-%m-%d %H:%M')}: test2016, beam 5, whole vocabulary\n")
    print("| model | BLEU | chrF | decode s (tool) | test2016 perplexity (`seqtool score`) | score lines/s |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['bleu']} | {r['chrf']} | {r['tool_s']} | {r.get('ppl', '')} | "
              f"{r.get('score_lines_per_s', '')} |")


if __name__ == "__main__":
    main()

"""Does every context mode train? One short Multi30k de-en run per (init, every_step, attention) x (GRU, LSTM).

Each run trains configs/multi30k_deen.yaml with the mode and cell swapped in for MINUTES, then
scores test2016 greedy and beam 5. Prints a markdown table (the one in docs/context_modes.md).

    python bench/context_modes.py --minutes 2.5      # about 20 minutes for the six runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import sacrebleu

from seqtool.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k"
MODES = [("init", "bahdanau"), ("every_step", "bahdanau"), ("attention", "bahdanau")]


def seqtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seqtool", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True)


def bleu_of(model_dir: Path, beam: int) -> float:
    hyps = seqtool("translate", "-m", str(model_dir), str(DATA / "test2016.de"), "--beam", str(beam),
                   "-q").stdout.splitlines()
    refs = (DATA / "test2016.en").read_text(encoding="utf-8").splitlines()
    return round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_context_modes")
    ap.add_argument("--cells", default="gru,lstm")
    args = ap.parse_args()
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    rows = ["| cell | context | attention | params | steps | valid BLEU (greedy) | test2016 BLEU greedy | beam 5 |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for cell in args.cells.split(","):
        for context, attention in MODES:
            model_dir = out / f"{cell}-{context}-{attention}"
            seqtool("train", "-c", "configs/multi30k_deen.yaml", "-q", "--set", f"training.model_dir={model_dir}",
                    "--set", f"training.max_minutes={args.minutes}", "--set", f"model.cell={cell}",
                    "--set", f"model.context={context}", "--set", f"model.attention={attention}",
                    "--set", "training.valid_every=100000")
            metrics = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
            info = metrics[-1]
            params = f"{load_model(model_dir).info['params']:,}"
            row = (f"| {cell} | {context} | {attention if context == 'attention' else '-'} | {params} | "
                   f"{info['step']} | {info.get('valid_bleu')} | {bleu_of(model_dir, 1)} | {bleu_of(model_dir, 5)} |")
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    print(f"Multi30k de-en, {args.minutes:g} min training per run; {out}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Decoding speed and BLEU of a trained Multi30k de-en model: fp32 against int8 and bf16 (`--quantize`,
decoding.quantize_kind; bf16 only on a CPU with native bf16), a vocabulary shortlist (`--shortlist 10`) and
both, one run.

Decodes test2016 (1,000 sentences, batch 64) greedy and at beam 5 in each variant, one command at a
time, timed as bench/compare_peers.py times them (the tool's own decode time and the whole command,
start-up included, with peak RSS); ratios are against fp32 at the same beam.

With `--rev REV` it is an A/B of two seqtools instead: the same model decoded by this tree and by REV
(a worktree), alternating (each side first in every other round), `--rounds` times each; the table gives
median decode times and this / REV.

    python bench/decode.py runs/multi30k_deen          # a model dir trained with configs/multi30k_deen.yaml
    python bench/decode.py runs/multi30k_deen --rev 1cf0f22 --rounds 3 --variants fp32 shortlist
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from compare_peers import ROOT, VARIANTS, runnable, seqtool_decode
from worktree import checked_out, in_turn, short


def variants(args: argparse.Namespace) -> list[str]:
    return [v for v in args.variants if runnable(v)]


def compare_variants(args: argparse.Namespace) -> None:
    rows = []
    for beam in (1, 5):
        for label in variants(args):
            row = {"variant": label, **seqtool_decode(args.out, args.model_dir, beam, VARIANTS[label], f".{label}")}
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


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def compare_trees(args: argparse.Namespace) -> None:
    runs: dict[tuple[int, str, str], list[dict]] = {}
    with checked_out(args.rev) as base_tree:
        for i in range(args.rounds):
            for beam in (1, 5):
                for label in variants(args):
                    for tree, name in in_turn(((base_tree, "base"), (ROOT, "this")), i):
                        row = {"variant": label, "tree": name, "round": i,
                               **seqtool_decode(args.out, args.model_dir, beam, VARIANTS[label],
                                                f".{label}.{name}{i}", tree)}
                        runs.setdefault((beam, label, name), []).append(row)
                        with open(args.out / "results.jsonl", "a") as f:
                            f.write(json.dumps(row) + "\n")
    print(f"{args.model_dir}: {args.rev} ({short(args.rev)}) against this tree, {args.rounds} rounds, "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    print(f"| beam | variant | BLEU {args.rev} / this | decode s {args.rev} (median) | decode s this (median) | "
          "speed this / rev (tool / command) |\n|---:|---|---:|---:|---:|---:|")
    for beam in (1, 5):
        for label in variants(args):
            base, this = runs[(beam, label, "base")], runs[(beam, label, "this")]
            print(f"| {beam} | {label} | {base[0]['bleu']} / {this[0]['bleu']} | {med(base, 'tool_s'):.2f} | "
                  f"{med(this, 'tool_s'):.2f} | {med(base, 'tool_s') / med(this, 'tool_s'):.2f}x / "
                  f"{med(base, 'wall_s') / med(this, 'wall_s'):.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_decode" / time.strftime("%Y%m%d-%H%M%S"))
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="decoding variants (those this CPU cannot run are left out)")
    ap.add_argument("--rev", help="A/B: decode with this tree and with this git revision instead")
    ap.add_argument("--rounds", type=int, default=3, help="with --rev: alternations; medians are reported")
    args = ap.parse_args()
    args.model_dir, args.out = str(Path(args.model_dir).resolve()), args.out.resolve()  # A/B runs elsewhere
    args.out.mkdir(parents=True)
    if args.rev:
        compare_trees(args)
    else:
        compare_variants(args)


if __name__ == "__main__":
    main()

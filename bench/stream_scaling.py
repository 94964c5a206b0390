"""Translation under load: 1k to 1M lines through stdin, every line back in order, memory bounded.

Pipes N lines (test sentences repeated, every 10th line empty) into `seqtool translate` through
stdin and checks that exactly N lines come back and that line i carries the translation of input
line i; reports wall time, lines/s and peak RSS of the translate process, each as a ratio to the
1k-line run measured in the same invocation.

    python bench/stream_scaling.py                         # trains the tiny test model first (1 min)
    python bench/stream_scaling.py --model runs/sample --sizes 1000,10000,100000 --beam 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
TINY = ["--set", "model.embedding_size=32", "--set", "model.encoder_hidden_size=32", "--set", "model.hidden_size=32",
        "--set", "tokenizer.vocab_size=600", "--set", "training.max_steps=700", "--set", "training.max_minutes=0"]


def source_lines(n: int) -> list[str]:
    base = (SAMPLE / "test.src").read_text(encoding="utf-8").splitlines()
    return ["" if i % 10 == 9 else base[i % len(base)] for i in range(n)]


def translate(model: str, n: int, beam: int) -> dict:
    """Feed n lines on stdin from a thread; read stdout as it comes; peak RSS from wait4."""
    proc = subprocess.Popen([sys.executable, "-m", "seqtool", "translate", "-m", model, "-b", str(beam), "-q"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8")
    lines = source_lines(n)

    def feed() -> None:
        for line in lines:
            proc.stdin.write(line + "\n")
        proc.stdin.close()

    start = time.perf_counter()
    threading.Thread(target=feed, daemon=True).start()
    out = proc.stdout.read().split("\n")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = out[:-1] if out and out[-1] == "" else out
    # In order: empty lines come back empty exactly where they were, and a repeated sentence gets the
    # translation it got the first time (batch-independent decoding), so a shift would show.
    first: dict[str, str] = {}
    same = sum(first.setdefault(src, hyp) == hyp for src, hyp in zip(lines, out) if src)
    empties_in_place = len(out) == n and all((src == "") == (hyp == "") for src, hyp in zip(lines, out))
    return {"lines": n, "rc": proc.returncode, "out_lines": len(out), "in_order": empties_in_place,
            "same_as_first_pct": round(100 * same / max(1, sum(1 for s in lines if s)), 3), "wall_s": round(wall, 1),
            "lines_per_s": round(n / wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model file or dir (default: train the tiny test model into a temp dir)")
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--beam", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = f"{tmp}/tiny"
            subprocess.run([sys.executable, "-m", "seqtool", "train", "-c", "configs/sample.yaml", "-q",
                            "--set", f"training.model_dir={model}", *TINY], cwd=ROOT, check=True)
        print(f"model {args.model or 'tiny (hidden 32)'}, beam {args.beam}, {os.cpu_count()} cores")
        print("| lines | exit | lines out | empty lines in place | repeats identical % | wall s | lines/s "
              "| peak RSS MB | time / first | RSS / first |")
        print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|", flush=True)
        rows = []
        for n in args.sizes.split(","):  # each row as soon as it is measured
            r = translate(model, int(n), args.beam)
            rows.append(r)
            base = rows[0]
            print(f"| {r['lines']:,} | {r['rc']} | {r['out_lines']:,} | {r['in_order']} | {r['same_as_first_pct']} "
                  f"| {r['wall_s']} | {r['lines_per_s']} | {r['peak_rss_mb']} | {r['wall_s'] / base['wall_s']:.2f} "
                  f"| {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |", flush=True)
    if not all(r["rc"] == 0 and r["in_order"] for r in rows):
        sys.exit("some run lost, reordered or mistranslated lines")


if __name__ == "__main__":
    main()

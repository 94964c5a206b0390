"""The three shipped task configs trained and scored from the CLI on ../shared/data, one after another.

For each task: `seqtool train -c configs/TASK.yaml` under a time budget, `seqtool translate` of the
test set, `seqtool evaluate --hyp` with the task's metrics; prints one markdown table per task
(the figures in docs/results.md) with the published or peer numbers beside ours.

    python bench/tasks.py                                    # couplets 30, aeslc 30, ende 20 minutes
    python bench/tasks.py --tasks couplets --minutes 5       # one task, a shorter budget
JSON lines of every measurement go to OUT/results.jsonl (default runs/bench_tasks/<stamp>).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
COUPLETS, AESLC, M30K = DATA / "couplets", DATA / "summarization", DATA / "multi30k"
UNCONSTRAINED = [a for key in ("exact_length", "copy_punctuation", "final_tone", "mirror_repeats", "no_echo")
                 for a in ("--set", f"decoding.{key}=false")]

# (name, config, default minutes, source, references, metrics, decoding variants: label -> extra flags)
TASKS = {
    "couplets": ("configs/couplets.yaml", 30, COUPLETS / "test.src", {"test.tgt": [COUPLETS / "test.tgt"]},
                 "couplet", {"constrained": [], "unconstrained": UNCONSTRAINED}),
    "aeslc": ("configs/aeslc.yaml", 30, AESLC / "test.src",
              {"test.tgt": [AESLC / "test.tgt"], "test.ann0-2": [AESLC / f"test.ann{i}" for i in range(3)]},
              "rouge", {"beam 5": []}),
    "multi30k_ende": ("configs/multi30k_ende.yaml", 20, M30K / "test2016.en", {"test2016.de": [M30K / "test2016.de"]},
                      "bleu,chrf", {"beam 5": [], "greedy": ["--beam", "1"]}),
}

# Published or peer figures to print beside ours.
REFERENCE = {
    "aeslc": "Transformer from scratch 15.04 / 7.39 / 14.93; AESLC paper's best 23.67 / 10.29 / 23.44 "
             "(R-1/2/L, test.tgt)",
    "multi30k_ende": "no peer run for en-de in ../shared/peers (de-en figures: docs/performance.md)",
    "couplets": "no published figure on this split",
}


def seqtool(*args: str, log: Path, stdout: Path | None = None) -> float:
    """Run the CLI, stderr to `log`; returns wall seconds; stops the bench on failure."""
    t0 = time.perf_counter()
    with open(log, "ab") as err, open(stdout, "wb") if stdout else open(os.devnull, "wb") as out:
        rc = subprocess.run([sys.executable, "-m", "seqtool", *args], cwd=ROOT, stdout=out, stderr=err).returncode
    if rc != 0:
        sys.exit(f"seqtool {' '.join(args)} failed ({rc}); see {log}")
    return time.perf_counter() - t0


def run_task(name: str, minutes: float, out: Path) -> list[dict]:
    config, _, src, refsets, metrics, variants = TASKS[name]
    model_dir = out / name
    train_s = seqtool("train", "-c", config, "-q", "--set", f"training.model_dir={model_dir}",
                      "--set", f"training.max_minutes={minutes}", log=out / f"{name}.train.log")
    history = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for label, flags in variants.items():
        hyp = out / f"{name}.{label.replace(' ', '')}.hyp"
        decode_s = seqtool("translate", "-m", str(model_dir), str(src), "-o", str(hyp), *flags,
                           log=out / f"{name}.decode.log")
        for refname, refs in refsets.items():
            scored = out / f"{name}.{label.replace(' ', '')}.{refname}.json"
            seqtool("evaluate", "--hyp", str(hyp), "--src", str(src), *[a for r in refs for a in ("--ref", str(r))],
                    "--metrics", metrics, "--json", log=out / f"{name}.eval.log", stdout=scored)
            rows.append({"task": name, "decoding": label, "references": refname, "minutes": minutes,
                         "steps": history[-1]["step"], "train_wall_s": round(train_s, 1),
                         "decode_wall_s": round(decode_s, 1), **json.loads(scored.read_text())["scores"]})
    return rows


def table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "task"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    ap.add_argument("--minutes", type=float, help="training budget for every task (default: each config's)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_tasks" / time.strftime("%Y%m%d-%H%M%S"))
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"needs the shared corpora in {DATA}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; out: {args.out}")
    for name in args.tasks.split(","):
        rows = run_task(name, args.minutes or TASKS[name][1], args.out)
        with open(args.out / "results.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"\n## {name}  ({REFERENCE[name]})\n{table(rows)}", flush=True)


if __name__ == "__main__":
    main()

"""seqtool next to Joey NMT and OpenNMT-py on Multi30k de-en, in one run on this machine.

Trains configs/multi30k_deen.yaml for MINUTES, decodes test2016 greedy and beam 5 (batch 64) with the
whole vocabulary in fp32 and fast (int8 weights + vocabulary shortlist; also in bf16 where the CPU has
native bf16), then trains and decodes both peers with ../shared/peers' scripts and the same budget, and
prints a table of throughput, BLEU and memory with ratios (seqtool / peer). Jobs run one at a time.
`--seqtool NAME:KEY=VALUE,...` trains one seqtool model per option with those config overrides (default:
one, "fp32", training.precision=fp32), each for MINUTES and decoded the same way.

    python bench/compare_peers.py --minutes 20            # about 70 minutes in all
    python bench/compare_peers.py --minutes 3 --skip-peers
    python bench/compare_peers.py --minutes 10 --seqtool fp32:training.precision=fp32 \
        --seqtool bf16:training.precision=bf16 --seqtool bf16-b4800:training.precision=bf16,training.batch_tokens=4800
JSON lines of every measurement go to OUT/results.jsonl (default runs/bench_peers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import sacrebleu

from seqtool.device import cpu_bf16_flag

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers"
DATA = ROOT.parent / "shared" / "data" / "multi30k"
MEASURE = PEERS / "lib" / "measure.py"


def measure(cmd: list[str], report: Path, budget: float = 0, stdout: Path | None = None,
            stderr: Path | None = None, cwd: Path = ROOT, grace: float = 120) -> dict:
    """Run through the peers' own measure.py, so both sides are timed the same way (in `cwd`: `python -m
    seqtool` there runs that tree's seqtool). After `budget` seconds (0: none) the command gets SIGINT, and
    SIGKILL `grace` seconds later."""
    m = [sys.executable, str(MEASURE), "--report", str(report), "--budget", str(budget), "--grace", str(grace)]
    if stdout:
        m += ["--stdout", str(stdout)]
    if stderr:
        m += ["--stderr", str(stderr)]
    subprocess.run(m + ["--"] + cmd, cwd=cwd, check=False)
    return json.loads(report.read_text())


def seqtool_train(out: Path, minutes: float, run: str = "fp32", sets: tuple[str, ...] = (), tree: Path = ROOT,
                  limit_s: float = 0) -> dict:
    """Train the Multi30k config with `sets` (KEY=VALUE overrides) into OUT/seqtool-RUN, with the seqtool of `tree`;
    `limit_s`: SIGINT (seqtool saves and stops) after that many seconds, SIGKILL 20 s later (default: MINUTES
    and 10 more, 2 minutes' grace)."""
    model_dir = out / f"seqtool-{run}"
    cmd = [sys.executable, "-m", "seqtool", "train", "-c", "configs/multi30k_deen.yaml",
           "--set", f"training.model_dir={model_dir}", "--set", f"training.max_minutes={minutes}"]
    cmd += [arg for kv in sets for arg in ("--set", kv)]
    load0 = os.getloadavg()[0]
    rep = measure(cmd, out / f"train_{run}_measure.json", budget=limit_s or minutes * 60 + 600,
                  stderr=out / f"train_{run}.log", cwd=tree, grace=20 if limit_s else 120)
    metrics = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    # Steady state: the windows between validations after the first (warm-up), weighted by their
    # length; a short last window (the final validation right after the time limit) is left out.
    steps = [m["step"] - prev["step"] for prev, m in zip([{"step": 0}] + metrics, metrics)]
    steady = [(n, m) for n, m in zip(steps[1:], metrics[1:]) if n >= 50] or list(zip(steps, metrics))
    weight = sum(n for n, _ in steady)
    return {"tool": "seqtool", "run": run, "sets": list(sets), "kind": "train", "wall_s": rep["wall_s"],
            "rc": rep["rc"],
            "steps": metrics[-1]["step"], "train_time_s": metrics[-1]["time_s"],
            "train_sent_per_s": round(sum(n * m["train_sent_per_s"] for n, m in steady) / weight, 1),
            "train_tgt_tok_per_s": round(sum(n * m["train_tgt_tok_per_s"] for n, m in steady) / weight, 1),
            "best_valid_bleu": max(m.get("valid_bleu", 0) for m in metrics),
            "peak_rss_mb": rep["peak_rss_mb"], "cpu_s": round(rep["cpu_user_s"] + rep["cpu_sys_s"], 1),
            "load1_start": round(load0, 2), "load1_end": round(os.getloadavg()[0], 2), "model_dir": str(model_dir)}


# Decoding variants: translate flags. "fast" is what a user who wants speed runs (docs/performance.md): the
# shortlist and int8; the bf16 ones need a CPU with native bf16.
BF16 = ("--quantize", "--set", "decoding.quantize_kind=bf16")
VARIANTS = {"fp32": ("--shortlist", "0", "--no-quantize"), "int8": ("--shortlist", "0", "--quantize"),
            "bf16": ("--shortlist", "0", *BF16), "shortlist": ("--shortlist", "10", "--no-quantize"),
            "fast": ("--shortlist", "10", "--quantize"), "fast-bf16": ("--shortlist", "10", *BF16)}


def runnable(variant: str) -> bool:
    """Whether this CPU runs the decoding variant: bf16 is refused without native bf16 (20-50x slower there)."""
    return "bf16" not in variant or cpu_bf16_flag() is not None


# What the comparison decodes each model with: fp32, fast, and fast in bf16 where the CPU has native bf16.
DECODED = tuple(filter(runnable, ("fp32", "fast", "fast-bf16")))


def seqtool_decode(out: Path, model_dir: str, beam: int, extra: tuple[str, ...] = (), label: str = "",
                   tree: Path = ROOT, limit_s: float = 0) -> dict:
    """Decode test2016 at batch 64 (`extra`: more translate flags, `label` names their files) with the seqtool
    of `tree` (this one, or a worktree of another revision); `limit_s`: stopped after that many seconds."""
    name = f"{Path(model_dir).name}.b{beam}{label}"
    hyp = out / f"test2016.{name}.en"
    cmd = [sys.executable, "-m", "seqtool", "translate", "-m", model_dir, str(DATA / "test2016.de"),
           "-o", str(hyp), "--beam", str(beam), "--batch-size", "64", *extra]
    rep = measure(cmd, out / f"decode_{name}.json", budget=limit_s, stderr=out / f"decode_{name}.log", cwd=tree,
                  grace=10 if limit_s else 120)
    log = (out / f"decode_{name}.log").read_text()
    tool_s = float(re.findall(r"translated \d+ lines in ([\d.]+) s", log)[-1])
    hyps = hyp.read_text(encoding="utf-8").splitlines()
    refs = (DATA / "test2016.en").read_text(encoding="utf-8").splitlines()
    return {"tool": "seqtool", "kind": "decode", "beam": beam, "batch": 64, "n_src": len(hyps),
            "wall_s": rep["wall_s"], "tool_s": tool_s, "sent_per_s_wall": round(len(hyps) / rep["wall_s"], 1),
            "sent_per_s_tool": round(len(hyps) / tool_s, 1),
            "bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2), "peak_rss_mb": rep["peak_rss_mb"]}


def peers(minutes: float, skip_joey: bool = False) -> list[dict]:
    """The peers' own scripts (as verify.sh runs them), one job at a time: train, then decode greedy and beam 5.
    A step that fails is reported on stderr and left out: the table still comes with what the others gave."""
    if subprocess.run(["bash", str(PEERS / "setup.sh")], stdout=sys.stderr).returncode:
        print("peers: setup.sh failed; no peer rows", file=sys.stderr)
        return []

    def one(cmd: list[str]) -> Optional[dict]:
        proc = subprocess.run(["bash", *cmd], capture_output=True, text=True)
        row = next((json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith("{")), None)
        if row is None:
            print(f"peers: {' '.join(cmd)} printed no result: {proc.stderr[-2000:]}", file=sys.stderr)
            return None
        row["kind"] = "decode" if "beam" in row else "train"
        return row

    rows = []
    for tool in ("onmt",) if skip_joey else ("joey", "onmt"):
        train = one([str(PEERS / "train.sh"), tool, str(int(minutes * 60)), "gru"])
        if train is None:
            continue
        rows.append(train)
        if train.get("checkpoint"):
            decodes = (one([str(PEERS / "decode.sh"), tool, train["checkpoint"], str(beam), "64"]) for beam in (1, 5))
            rows += [row for row in decodes if row is not None]
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one row per tool (seqtool once per decoding variant), then seqtool / peer ratios."""
    def find(tool: str, kind: str, beam: int | None = None, variant: str | None = None, run: str | None = None) -> dict:
        return next((r for r in rows if r["tool"] == tool and r["kind"] == kind and r.get("beam") == beam
                     and r.get("variant") == variant and r.get("run") == run), {})

    def cells(decode: dict) -> str:
        return f"{decode.get('bleu')} | {decode.get('tool_s')} / {decode.get('wall_s')} | {decode.get('peak_rss_mb')}"

    head = ("| tool | train sent/s | tgt tok/s | train peak RSS MB | BLEU greedy | greedy decode s (tool / wall) | "
            "greedy RSS MB | BLEU beam 5 | beam-5 decode s (tool / wall) | beam-5 RSS MB |")
    lines = [head, "|---" + "|---:" * 9 + "|"]
    runs = list(dict.fromkeys(r["run"] for r in rows if r["tool"] == "seqtool" and r["kind"] == "train"))
    ours = [(f"seqtool {run}" + ("" if v == "fp32" else f" + {v} decoding"), v, run)
            for run in runs for v in DECODED]
    for name, variant, run in ours + [("joey", None, None), ("onmt", None, None)]:
        tool = "seqtool" if variant else name
        tr = find(tool, "train", run=run)
        if not tr:
            continue
        lines.append(f"| {name} | {tr['train_sent_per_s']} | {tr['train_tgt_tok_per_s']} | {tr['peak_rss_mb']} | "
                     f"{cells(find(tool, 'decode', 1, variant, run))} | "
                     f"{cells(find(tool, 'decode', 5, variant, run))} |")
    ratios = ["", "| seqtool / peer | train sent/s | greedy BLEU diff | greedy sent/s (tool / wall) | "
              "beam-5 BLEU diff | beam-5 sent/s (tool / wall) |", "|---" + "|---:" * 5 + "|"]
    for peer in ("joey", "onmt"):
        tr = find(peer, "train")
        for name, variant, run in ours:
            mine, speed = find("seqtool", "train", run=run), []
            for beam in (1, 5):
                o, p = find("seqtool", "decode", beam, variant, run), find(peer, "decode", beam)
                speed.append(f"{o['bleu'] - p['bleu']:+.2f} | {o['sent_per_s_tool'] / p['sent_per_s_tool']:.2f}x / "
                             f"{o['sent_per_s_wall'] / p['sent_per_s_wall']:.2f}x" if o and p else "- | -")
            if tr and mine:
                ratios.append(f"| {name} vs {peer} | {mine['train_sent_per_s'] / tr['train_sent_per_s']:.2f}x | "
                              f"{speed[0]} | {speed[1]} |")
    return "\n".join(lines + (ratios if len(ratios) > 3 else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_peers")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-joey", action="store_true", help="train and decode OpenNMT-py only")
    ap.add_argument("--seqtool", action="append", metavar="NAME:KEY=VALUE,...",
                    help="a seqtool model to train, with config overrides (repeatable)")
    args = ap.parse_args()
    runs = [(name, tuple(filter(None, sets.split(",")))) for name, _, sets in
            (opt.partition(":") for opt in args.seqtool or ["fp32:training.precision=fp32"])]
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    rows = []

    def keep(row: dict) -> None:
        rows.append(row)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)

    for run, sets in runs:
        train = seqtool_train(out, args.minutes, run, sets)
        keep(train)
        for beam in (1, 5):
            for variant in DECODED:
                keep({**seqtool_decode(out, train["model_dir"], beam, VARIANTS[variant], f".{variant}"),
                      "variant": variant, "run": run})
    if not args.skip_peers:
        for row in peers(args.minutes, args.skip_joey):
            keep(row)
    print(f"Multi30k de-en, {args.minutes:g} min training each, {os.cpu_count()} cores; results in {out}\n")
    print(table(rows))


if __name__ == "__main__":
    main()

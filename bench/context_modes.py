"""The seeds' lessons on real data: how the context vector is formed and used, the cells, depth and direction.

Trains configs/multi30k_deen.yaml (de->en) at an equal budget of MINUTES a run, each with one thing changed:

- the three uses of the source with a GRU: init (Sutskever et al.), every_step (Cho et al.), attention;
- init and every_step with each way of forming c: last (h_T), last_transform (tanh(W h_T)), mean, max;
- the three cells (Elman, GRU, LSTM) with attention and with every_step;
- the attention GRU with 2 layers, and with a unidirectional encoder.

Then decodes test2016 with beam 5 and scores it with sacreBLEU, cased and lowercased (the closer match to the
tutorials' lowercased tokenized BLEU), and draws dev BLEU against minutes. Prints the markdown tables of
docs/context_modes.md. `--parallel 2` trains two runs side by side, each on one core with one thread
(bench/jobs.py), so each run has the same share of the machine at half the wall time.

    python bench/context_modes.py --minutes 10 --parallel 2 --plot docs/img/context_modes.png   # ~90 minutes
"""

from __future__ import annotations

import json
from pathlib import Path

import sacrebleu
from jobs import ROOT, Run, parser, seqtool, train_all

from seqtool.checkpoint import load_model

DATA = ROOT.parent / "shared" / "data" / "multi30k"
CELLS = {"rnn": "Elman", "gru": "GRU", "lstm": "LSTM"}


def run(name: str, **model: object) -> Run:
    return Run(name, tuple(f"model.{key}={value}" for key, value in model.items()))


def runs() -> dict[str, tuple[Run, ...]]:
    """The tables, each a tuple of runs; a run in several tables is trained once. A run without a context_vector
    has its mode's classic one: last_transform for init, last otherwise."""
    gru = {ctx: run(f"gru-{ctx}", cell="gru", context=ctx) for ctx in ("init", "every_step", "attention")}
    return {
        "How the source reaches the decoder (GRU; each mode's classic c)": tuple(gru.values()),
        "How c is formed (GRU)": tuple(
            gru[ctx] if vector == classic else run(f"gru-{ctx}-{vector}", cell="gru", context=ctx,
                                                   context_vector=vector)
            for ctx, classic in (("init", "last_transform"), ("every_step", "last"))
            for vector in ("last", "last_transform", "mean", "max")),
        "The cells": tuple(gru[ctx] if cell == "gru" else run(f"{cell}-{ctx}", cell=cell, context=ctx)
                           for cell in CELLS for ctx in ("every_step", "attention")),
        "Depth and direction (GRU, attention)": (
            gru["attention"],
            run("gru-attention-2layers", cell="gru", context="attention", encoder_layers=2, decoder_layers=2),
            run("gru-attention-unidirectional", cell="gru", context="attention", bidirectional="false")),
    }


def score(run: Run, model_dir: Path, cores: list[int]) -> None:
    """test2016 at beam 5: sacreBLEU cased and lowercased."""
    if (model_dir / "test.json").exists():
        return
    hyps = seqtool(["translate", "-m", str(model_dir), str(DATA / "test2016.de"), "--beam", "5", "-q"],
                   cores).stdout.splitlines()
    refs = [(DATA / "test2016.en").read_text(encoding="utf-8").splitlines()]
    result = {"bleu": round(sacrebleu.corpus_bleu(hyps, refs).score, 2),
              "bleu_lc": round(sacrebleu.corpus_bleu(hyps, refs, lowercase=True).score, 2)}
    (model_dir / "test.json").write_text(json.dumps(result))


def row(run: Run, out: Path) -> str:
    model_dir = out / run.name
    records = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    test = json.loads((model_dir / "test.json").read_text())
    bundle = load_model(model_dir)
    m = bundle.config.model
    what = (f"{CELLS[m.cell]} {m.context}" + (f" ({m.attention})" if m.context == "attention" else f", c = "
            f"{m.context_vector}") + f", {m.encoder_layers}+{m.decoder_layers} layers"
            + ("" if m.bidirectional else ", unidirectional encoder"))
    best = max(r.get("valid_bleu", 0.0) for r in records)
    params = sum(p.numel() for p in bundle.model.parameters())
    return (f"| {what} | {params / 1e6:.1f}M | {records[-1]['step']:,} | {best:.2f} | {test['bleu']:.2f} | "
            f"{test['bleu_lc']:.2f} |")


def draw(out: Path, tables: dict[str, tuple[Run, ...]], run_dir: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True, sharey=True)
    for ax, (title, table) in zip(axes.flat, tables.items()):
        for index, run in enumerate(table):
            records = [json.loads(x) for x in (run_dir / run.name / "metrics.jsonl").read_text().splitlines()]
            points = [(r["time_s"] / 60, r["valid_bleu"]) for r in records if "valid_bleu" in r]
            ax.plot(*zip(*points), marker="o", markersize=3, color=f"C{index}", label=run.name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("minutes of training")
        ax.set_ylabel("dev BLEU (greedy)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(tables):]:
        ax.set_visible(False)
    fig.suptitle(f"Multi30k de-en, {minutes:g} minutes a run")
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = parser(__doc__, "context_modes", 10)
    ap.add_argument("--valid-every", type=int, default=150, help="steps between dev BLEU points of the plot")
    ap.add_argument("--only", help="comma-separated run names: those runs and the tables holding them (a check)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tables = runs()
    if args.only:
        keep = set(args.only.split(","))
        tables = {title: kept for title, table in tables.items() if (kept := tuple(r for r in table if r.name in keep))}
    unique = list({run.name: run for table in tables.values() for run in table}.values())
    # Dev BLEU on 500 lines every --valid-every steps for the curves; the same for every run.
    common = ("training.valid_max_sentences=500", f"training.valid_every={args.valid_every}")
    unique = [Run(run.name, run.sets + common) for run in unique]
    train_all(unique, "configs/multi30k_deen.yaml", args.out, args.minutes, args.parallel, then=score)
    draw(args.plot or args.out / "context_modes.png", tables, args.out, args.minutes)
    print(f"Multi30k de-en, {args.minutes:g} min a run, {args.parallel} side by side; {args.out}")
    for title, table in tables.items():
        print(f"\n### {title}\n\n| model | params | steps | best dev BLEU (greedy) | test2016 BLEU (beam 5) | "
              "lowercased |\n|---|---:|---:|---:|---:|---:|")
        print("\n".join(row(run, args.out) for run in table))


if __name__ == "__main__":
    main()

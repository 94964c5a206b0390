"""Gradients you can watch: an Elman RNN, a GRU and an LSTM on the long-dependency task, with and without clipping.

Trains configs/long_reverse.yaml (reverse a line of up to 100 symbols, no attention: sample_data/long/) with
each cell, clipping off (training.clip_grad_norm 0) and at 1.0, for MINUTES each; decodes the test lines;
prints a markdown table (steps, dev loss, test BLEU, how many leading symbols come out right, the gradient
norm before clipping: median and largest, the share of steps clipped, and how much gradient reaches the first
source symbol against the last) and draws to a PNG the gradient norms and dev losses against steps and, for
each trained model, the gradient of the loss at each source position of 80-symbol lines: BPTT's vanishing
gradient, as the tutorials draw it.

    python bench/gradients.py --minutes 3 --parallel 2 --plot docs/img/long_gradients.png   # about 10 minutes
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import sacrebleu
from jobs import ROOT, Run, parser, seqtool, train_all

from seqtool.checkpoint import load_model
from seqtool.data import make_batch

DATA = ROOT / "sample_data" / "long"
CELLS = {"rnn": "Elman", "gru": "GRU", "lstm": "LSTM"}
CLIPS = (0.0, 1.0)
REACH_LENGTH = 80


def leading_right(hyp: str, ref: str) -> int:
    """How many symbols from the start of the output are right."""
    n = 0
    for h, r in zip(hyp.split(), ref.split()):
        if h != r:
            break
        n += 1
    return n


def reach(model_dir: Path, length: int = REACH_LENGTH) -> list[float]:
    """||dL/dx_t||, the gradient of the loss at each source position's embedding, averaged over the test lines
    of at least `length` symbols cut to that length. The first position is the farthest from the output symbol
    that copies it (about 2 * length recurrent steps), the last the nearest."""
    import torch

    bundle = load_model(model_dir)
    model = bundle.model.eval()
    lines = [x.split()[:length] for x in (DATA / "test.src").read_text(encoding="utf-8").splitlines()
             if len(x.split()) >= length]
    batch = make_batch([bundle.src_tok.encode(" ".join(x)) for x in lines],
                       [bundle.tgt_tok.encode(" ".join(reversed(x))) for x in lines])
    embedded: list[torch.Tensor] = []

    def keep(_module, _inputs, output: torch.Tensor) -> None:
        output.retain_grad()
        embedded.append(output)

    hook = model.encoder.embed.register_forward_hook(keep)
    model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out).backward()
    hook.remove()
    grad = embedded[0].grad
    assert grad is not None  # retained above
    return grad.norm(dim=-1).mean(0).tolist()


def score(run: Run, model_dir: Path, cores: list[int]) -> None:
    hyps = seqtool(["translate", "-m", str(model_dir), str(DATA / "test.src"), "-q"], cores).stdout.splitlines()
    refs = (DATA / "test.tgt").read_text(encoding="utf-8").splitlines()
    result = {"bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
              "leading_right": round(statistics.mean(leading_right(h, r) for h, r in zip(hyps, refs)), 2),
              "ref_len": round(statistics.mean(len(r.split()) for r in refs), 1)}
    (model_dir / "test.json").write_text(json.dumps(result))


def draw(out: Path, runs: dict[str, list[dict]], reaches: dict[str, list[float]], minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 7), constrained_layout=True)
    for row, clip in enumerate(CLIPS):
        for index, (cell, title) in enumerate(CELLS.items()):
            records = runs[f"{cell}-clip{clip:g}"]
            steps = [r["step"] for r in records]
            axes[row, 0].plot(steps, [r["train_grad_norm"] for r in records], color=f"C{index}", label=f"{title} mean")
            axes[row, 0].plot(steps, [r["train_grad_norm_max"] for r in records], color=f"C{index}", linestyle="--",
                              label=f"{title} largest")
            axes[row, 1].plot(steps, [r["valid_loss"] for r in records], color=f"C{index}", label=title)
            profile = reaches[f"{cell}-clip{clip:g}"]
            axes[row, 2].plot(range(1, len(profile) + 1), profile, color=f"C{index}", label=title)
        clipping = "clipping off" if clip == 0 else f"clipped at {clip:g}"
        axes[row, 0].set_title(f"gradient norm before clipping, {clipping}")
        axes[row, 0].set_yscale("log")
        axes[row, 1].set_title(f"dev loss (per token), {clipping}")
        axes[row, 2].set_title(f"gradient at each source position, trained, {clipping}")
        axes[row, 2].set_yscale("log")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    for ax in (*axes[:, 0], *axes[:, 1]):
        ax.set_xlabel("step")
    for ax in axes[:, 2]:
        ax.set_xlabel(f"source position of {REACH_LENGTH} (1: farthest from its output)")
    fig.suptitle(f"Reversing up to 100 symbols without attention, {minutes:g} minutes a run")
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = parser(__doc__, "gradients", 3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [Run(f"{cell}-clip{clip:g}", (f"model.cell={cell}", f"training.clip_grad_norm={clip:g}"))
            for cell in CELLS for clip in CLIPS]
    train_all(runs, "configs/long_reverse.yaml", args.out, args.minutes, args.parallel, then=score)
    rows = ["| cell | clipping | steps | dev loss at the end | test BLEU | leading symbols right | grad norm (median "
            f"of the validations' means) | grad norm largest | steps clipped | gradient at position 1 / "
            f"{REACH_LENGTH} |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    histories, reaches = {}, {}
    for run in runs:
        records = [json.loads(x) for x in (args.out / run.name / "metrics.jsonl").read_text().splitlines()]
        histories[run.name] = records
        test = json.loads((args.out / run.name / "test.json").read_text())
        # After training, not beside it: this process is not pinned to a core.
        reaches[run.name] = profile = reach(args.out / run.name)
        cell, clip = run.name.split("-clip")
        clipped = statistics.mean(r["train_clipped"] for r in records)
        rows.append(f"| {CELLS[cell]} | {'off' if clip == '0' else clip} | {records[-1]['step']:,} | "
                    f"{records[-1]['valid_loss']:.3f} | {test['bleu']} | {test['leading_right']} of "
                    f"{test['ref_len']} | {statistics.median(r['train_grad_norm'] for r in records):.2f} | "
                    f"{max(r['train_grad_norm_max'] for r in records):,.1f} | {clipped:.0%} | "
                    f"{profile[0] / profile[-1]:.1e} |")
    draw(args.plot or args.out / "gradients.png", histories, reaches, args.minutes)
    print(f"configs/long_reverse.yaml, {args.minutes:g} min a run, {args.parallel} side by side; {args.out}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

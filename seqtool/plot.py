"""Pictures: training curves from metrics.jsonl, and attention heatmaps, as PNG files (no display needed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from seqtool.checkpoint import atomic_write
from seqtool.errors import DataError, SeqtoolError
from seqtool.metrics import METRICS

# (panel title, metrics.jsonl keys drawn in it); a panel per dev-set metric the runs logged follows
PANELS = [
    ("loss", ("train_loss", "valid_loss")),
    ("validation perplexity", ("valid_ppl",)),
    ("learning rate", ("lr",)),
]
# Drawn when the runs logged it (seqtool before 2026-12-04 did not); on a log scale: exploding and vanishing
# gradients differ by orders of magnitude.
GRADIENTS = ("gradient norm before clipping (log)", ("train_grad_norm", "train_grad_norm_max"))
X_AXES = {"step": ("step", "step"), "time": ("time_s", "minutes")}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SeqtoolError("pictures need matplotlib: pip install 'seqtool[plot]'") from None
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    # Chinese, Japanese or Korean pieces need a CJK font; use one if the machine has it (as a fallback).
    cjk = sorted({f.name for f in font_manager.fontManager.ttflist if "CJK" in f.name})
    plt.rcParams["font.family"] = ["DejaVu Sans", *cjk[:1]]
    return plt


def read_metrics(model_dir: Path) -> list[dict]:
    """The validation records of a run, in order."""
    path = model_dir / "metrics.jsonl" if model_dir.is_dir() else model_dir
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path} not found: is {model_dir} a training run?") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n < len(lines):  # a run killed mid-write may leave a partial last line: skip only that
                raise DataError(f"{path}:{n}: not a JSON line") from None
            continue
        if not isinstance(record, dict) or not all(type(v) in (int, float) for v in record.values()):
            raise DataError(f"{path}:{n}: not a metrics record (an object whose values are numbers)")
        records.append(record)
    if not records:
        raise DataError(f"{path} has no validation records yet")
    return records


def _save(fig, out: Path) -> None:
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():  # without a CJK font, such glyphs show as boxes: no need to warn per glyph
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(buf, format="png", dpi=110)
    try:
        atomic_write(out, buf.getvalue())
    except OSError as exc:
        raise SeqtoolError(f"cannot write {out}: {exc.strerror}") from None


def plot_curves(runs: Sequence[Path], out: Path, x: str = "step") -> None:
    """One figure of loss, perplexity, learning rate and each dev-set metric logged (BLEU, ...) against steps or
    minutes; one colour per run."""
    plt = _pyplot()
    key, label = X_AXES[x]
    histories = [(run.name or str(run), read_metrics(run)) for run in runs]
    logged = {k for _, records in histories for r in records for k in r}
    panels = PANELS + ([GRADIENTS] if "train_grad_norm" in logged else []) + [
        (f"validation {m.title} (greedy)", (f"valid_{name}",))
        for name, m in METRICS.items() if f"valid_{name}" in logged]
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(10, 3.5 * rows), constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for run_index, (name, records) in enumerate(histories):
            for key_index, metric in enumerate(keys):
                points = [(r[key] / (60 if x == "time" else 1), r[metric]) for r in records if metric in r and key in r]
                if points:
                    xs, ys = zip(*points)
                    who = f"{name} " if len(histories) > 1 else ""
                    ax.plot(xs, ys, marker="o", markersize=3, color=f"C{run_index}",
                            linestyle=("-", "--")[key_index % 2], label=f"{who}{metric}")
        ax.set_title(title)
        if (title, keys) == GRADIENTS and ax.lines:
            ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(", ".join(name for name, _ in histories))
    _save(fig, out)
    plt.close(fig)


def plot_attention(src_pieces: list[str], tgt_pieces: list[str], weights: list[list[float]], out: Path) -> None:
    """A heatmap: one row per output piece, one column per source piece."""
    plt = _pyplot()
    size = (max(4.0, 0.35 * len(src_pieces) + 2), max(3.0, 0.35 * len(tgt_pieces) + 1.5))
    fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    ax.imshow(weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(src_pieces)), src_pieces, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tgt_pieces)), tgt_pieces, fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    _save(fig, out)
    plt.close(fig)

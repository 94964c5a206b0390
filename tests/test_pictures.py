"""seqtool plot (training curves) and attention weights / heatmaps from translate, through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from seqtool.config import validate
from seqtool.errors import SeqtoolError
from seqtool.model.seq2seq import build_model
from seqtool.plot import read_metrics
from seqtool.tokenizer import train_tokenizer
from seqtool.translate import Translator, attention_weights

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png_of_the_run(trained_model, tmp_path):
    out = tmp_path / "curves.png"
    proc = run_cli("plot", str(trained_model), "-o", str(out), check=True)
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000
    assert str(out) in proc.stderr and proc.stdout == ""


def test_plot_compares_runs_against_time(trained_model, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text((trained_model / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    out = tmp_path / "both.png"
    run_cli("plot", str(trained_model), str(other), "--x", "time", "-o", str(out), check=True)
    assert out.read_bytes().startswith(PNG)


def test_plot_draws_a_panel_per_logged_metric(tmp_path, monkeypatch):
    """Panels come from the metrics registry: a run that logged ROUGE and chrF gets those two as well."""
    from seqtool import plot

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "time_s": s, "lr": 1e-3, "train_loss": 3.0 / s, "valid_loss": 3.5 / s, "valid_ppl": 30.0 / s,
         "valid_rouge": 10.0 * s, "valid_rouge1": 12.0 * s, "valid_chrf": 9.0 * s}) + "\n" for s in (1, 2)))
    titles = []
    real = plot._save

    def spy(fig, out):
        titles.extend(ax.get_title() for ax in fig.axes if ax.get_visible())
        real(fig, out)
    monkeypatch.setattr(plot, "_save", spy)
    plot.plot_curves([tmp_path], tmp_path / "c.png")
    assert titles == ["loss", "validation perplexity", "learning rate", "validation chrF (greedy)",
                      "validation ROUGE-1/2/L mean (greedy)"]
    assert (tmp_path / "c.png").read_bytes().startswith(PNG)


def test_plot_errors_are_one_line(tmp_path):
    proc = run_cli("plot", str(tmp_path))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "metrics.jsonl not found" in proc.stderr
    proc = run_cli("plot", str(tmp_path), "--x", "epochs")
    assert proc.returncode == 1 and "--x must be one of step, time" in proc.stderr


def test_metrics_with_a_torn_last_line_still_plot(tmp_path):
    """A run killed while appending leaves a partial last line: the records before it are kept."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "valid_loss": 2.0}\n{"step": 20, "valid_')
    assert read_metrics(tmp_path) == [{"step": 10, "valid_loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text('garbage\n{"step": 20}\n')
    with pytest.raises(SeqtoolError, match=":1: not a JSON line"):
        read_metrics(tmp_path)
    for bad in ('{"step": "a", "valid_loss": 2.0}', '[1, 2]', '{"step": true}'):
        (tmp_path / "metrics.jsonl").write_text(f'{{"step": 10}}\n{bad}\n')
        with pytest.raises(SeqtoolError, match=":2: not a metrics record"):
            read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "valid_loss": 2.0}\n')  # no time_s: nothing on that axis
    proc = run_cli("plot", str(tmp_path), "--x", "time", "-o", str(tmp_path / "curves.png"))
    assert proc.returncode == 0 and (tmp_path / "curves.png").exists(), proc.stderr


def test_attention_in_json_and_heatmaps_per_line(trained_model, tmp_path):
    folder = tmp_path / "attn"
    lines = "seliti roma zefu\n\nfizafa la sa\n"
    proc = run_cli("translate", "-m", str(trained_model), "--format", "json", "--attention",
                   "--attention-plot", str(folder), input=lines, check=True)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 3 and "attention" not in records[1]
    for r in (records[0], records[2]):
        weights = r["attention"]
        assert len(weights) == len(r["pieces"]) + 1  # one row per output piece, and </s>
        assert all(len(row) == len(r["src_pieces"]) and abs(sum(row) - 1) < 1e-2 for row in weights)
    assert sorted(p.name for p in folder.iterdir()) == ["1.png", "3.png"]  # none for the empty line
    assert (folder / "3.png").read_bytes().startswith(PNG)


def test_attention_flag_needs_json(trained_model):
    proc = run_cli("translate", "-m", str(trained_model), "--attention", input="a\n")
    assert proc.returncode == 1 and "use it with --format json" in proc.stderr


def test_attention_weights_match_the_search_and_need_an_attention_model():
    cfg = validate({"model": {"embedding_size": 8, "encoder_hidden_size": 8, "hidden_size": 16, "context": "init"},
                    "tokenizer": {"vocab_size": 300}})
    tok = train_tokenizer([f"alpha beta {i}" for i in range(50)], cfg.tokenizer)
    model = build_model(cfg.model, tok.vocab_size, tok.vocab_size).eval()
    with pytest.raises(SeqtoolError, match="context 'attention'; this model's decoder does not attend"):
        Translator(model, tok, tok, cfg.decoding, with_attention=True)

    attn_cfg = cfg.model.model_copy(update={"context": "attention"})
    torch.manual_seed(0)
    model = build_model(attn_cfg, tok.vocab_size, tok.vocab_size).eval()
    with torch.inference_mode():
        weights = attention_weights(model, [5, 6, 7, 8], [9, 10])
    assert len(weights) == 3 and all(len(row) == 4 for row in weights)
    assert all(abs(sum(row) - 1) < 1e-3 for row in weights)


def test_plot_draws_the_gradient_norms_on_a_log_scale_when_logged(tmp_path, monkeypatch):
    from seqtool import plot

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "time_s": s, "lr": 1e-3, "train_loss": 3.0 / s, "train_grad_norm": 10.0 ** s,
         "train_grad_norm_max": 10.0 ** (s + 1)}) + "\n" for s in (1, 2, 3)))
    seen = {}
    real = plot._save

    def spy(fig, out):
        seen.update({ax.get_title(): ax for ax in fig.axes if ax.get_visible()})
        real(fig, out)
    monkeypatch.setattr(plot, "_save", spy)
    plot.plot_curves([tmp_path], tmp_path / "c.png")
    ax = seen["gradient norm before clipping (log)"]
    assert ax.get_yscale() == "log" and [line.get_ydata().tolist() for line in ax.lines] == [[10, 100, 1000],
                                                                                          [100, 1000, 10000]]

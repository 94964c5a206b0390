"""--device and training precision: chosen from what the machine has, clear errors otherwise, and the
mixed-precision training paths (autocast, fp16 loss scaling) run for real on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import seqtool.device as device_mod
from conftest import LEARNS, SAMPLE, bleu_per_flags, read_metrics, run_cli, tiny_config, write_config
from seqtool.config import validate
from seqtool.device import Precision, pick_device, pick_precision
from seqtool.errors import ConfigError
from seqtool.progress import Reporter
from seqtool.train import prepare

CPU = torch.device("cpu")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")


@no_gpu
def test_cuda_without_a_gpu_is_one_clear_line(tmp_path, trained_model):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "m"))
    for args in (["train", "-c", str(cfg), "--device", "cuda"],
                 ["translate", "-m", str(trained_model), "--device", "cuda:1", str(SAMPLE / "test.src")]):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "torch sees no CUDA GPU" in proc.stderr, proc.stderr
    assert not (tmp_path / "m").exists()  # refused before anything was written


def test_device_names_are_checked_and_cpu_gives_the_same_output(tmp_path, trained_model):
    proc = run_cli("translate", "-m", str(trained_model), "--device", "gpu", str(SAMPLE / "test.src"))
    assert proc.returncode == 2 and "decoding.device" in proc.stderr and proc.stderr.count("\n") == 1
    head = "\n".join((SAMPLE / "test.src").read_text().splitlines()[:20]) + "\n"
    default = run_cli("translate", "-m", str(trained_model), input=head, check=True).stdout
    on_cpu = run_cli("translate", "-m", str(trained_model), "--device", "cpu", input=head, check=True).stdout
    assert on_cpu == default and default.count("\n") == 20
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("flags,picked", [({"avx2"}, None), ({"avx2", "avx512f", "avx512_bf16"}, "avx512_bf16"),
                                          ({"avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}, "amx_bf16"),
                                          (set(), None)],
                         ids=["avx2-only", "zen4", "amx", "unreadable"])
def test_precision_is_chosen_from_the_cpu_flags(monkeypatch, flags, picked):
    monkeypatch.setattr(device_mod, "cpu_flags", lambda: frozenset(flags))
    auto = pick_precision(CPU, "auto")
    assert pick_precision(CPU, "fp32") == Precision(CPU)
    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        pick_precision(CPU, "fp16")
    if picked is None:  # never bf16 without native bf16: there it is 20-50x slower
        assert auto == Precision(CPU) and auto.why == "auto: this CPU has no native bf16 (no amx_bf16 or avx512_bf16)"
        with pytest.raises(ConfigError, match="no native bf16"):
            pick_precision(CPU, "bf16")
    else:
        assert auto == Precision(CPU, torch.bfloat16) and auto.why == f"auto: this CPU has {picked}"
        assert pick_precision(CPU, "bf16") == Precision(CPU, torch.bfloat16)


def test_cpu_flags_are_read_not_assumed():
    flags = device_mod.cpu_flags()
    assert isinstance(flags, frozenset) and all(f == f.strip() and f for f in flags)
    if Path("/proc/cpuinfo").exists():
        assert flags, "a Linux CPU lists its flags"


@pytest.mark.skipif(device_mod.cpu_bf16_flag() is None, reason="this CPU has no native bf16: auto trains in fp32, "
                    "as every other test does")
def test_the_precision_auto_picks_learns_the_sample_task(tmp_path):
    cfg = tiny_config(tmp_path / "m", **LEARNS)
    cfg["training"]["precision"] = "auto"
    proc = run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), check=True)
    assert f"in bf16 (auto: this CPU has {device_mod.cpu_bf16_flag()})" in proc.stderr
    assert "bf16" in run_cli("info", str(tmp_path / "m"), check=True).stdout
    assert bleu_per_flags(tmp_path / "m", tmp_path, [[]], n=200)[""] >= 95


@pytest.mark.parametrize("dtype,scaled", [(torch.bfloat16, False), (torch.float16, True)], ids=["bf16", "fp16-scaled"])
def test_mixed_precision_training_learns_and_keeps_fp32_weights(tmp_path, dtype, scaled):
    # The CUDA recipe (autocast; fp16 with a gradient scaler) run on the CPU, where torch supports both.
    cfg = validate(tiny_config(tmp_path / "m", training={"max_steps": 60, "valid_every": 30, "valid_max_sentences": 20,
                                                         "batch_tokens": 800}))
    trainer = prepare(cfg, Reporter(quiet=True), resume=False, precision=Precision(CPU, dtype, scaled))
    assert trainer.scaler.is_enabled() == scaled
    trainer.run()
    losses = [m["valid_loss"] for m in read_metrics(tmp_path / "m")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] < math.log(600)
    assert all(p.dtype == torch.float32 for p in trainer.bundle.model.parameters())


def test_quantized_decoding_keeps_lines_and_quality(tmp_path, trained_model):
    """--quantize: int8 linear and GRU layers; every line answered, BLEU within the few tenths --help promises
    (measured: 100.0 fp32, 99.8 int8 on 200 test lines)."""
    bleus = bleu_per_flags(trained_model, tmp_path, [["--no-quantize"], ["--quantize"]], n=200)
    assert bleus["--no-quantize"] >= 95 and abs(bleus["--quantize"] - bleus["--no-quantize"]) <= 0.5, bleus


def test_quantize_is_refused_off_the_cpu():
    from seqtool.device import quantized

    with pytest.raises(ConfigError, match="int8 inference on the CPU"):
        quantized(torch.nn.Linear(2, 2), torch.device("cuda"))


def test_int8_covers_the_recurrent_and_linear_layers_but_not_single_output_ones():
    from seqtool.config import ModelConfig
    from seqtool.device import int8_dynamic
    from seqtool.model.seq2seq import build_model

    dynamic = torch.ao.nn.quantized.dynamic
    q = int8_dynamic(build_model(ModelConfig(embedding_size=8, encoder_hidden_size=8, hidden_size=16, copy_source=True),
                                 20, 20))
    for layer in (q.encoder.rnn, q.decoder.rnn, q.decoder.bridge, q.decoder.attention.query_proj, q.output):
        assert isinstance(layer, (dynamic.Linear, dynamic.GRU)), layer
    for layer in (q.decoder.attention.v, q.copy_gate):  # a dot product: quantizing its input would cost more
        assert type(layer) is torch.nn.Linear, layer

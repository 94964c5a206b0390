"""--device and training precision: chosen from what the machine has, clear errors otherwise, and the
mixed-precision training paths (bf16 weight copies, autocast, fp16 loss scaling) run for real on the CPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqtool.device as device_mod
from conftest import LEARNS, SAMPLE, bleu_per_flags, read_metrics, run_cli, tiny_config, write_config
from seqtool.checkpoint import load_model
from seqtool.config import ModelConfig, validate
from seqtool.data import make_batch
from seqtool.device import Precision, pick_device, pick_precision
from seqtool.errors import ConfigError
from seqtool.model.seq2seq import build_model
from seqtool.progress import Reporter
from seqtool.train import batch_loss, prepare

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
        # on the CPU, bf16 runs the whole forward pass on bf16 weight copies, not autocast
        assert auto == Precision(CPU, torch.bfloat16, cast_weights=True) and auto.why == f"auto: this CPU has {picked}"
        assert pick_precision(CPU, "bf16") == Precision(CPU, torch.bfloat16, cast_weights=True)


def test_cpu_flags_are_read_not_assumed():
    flags = device_mod.cpu_flags()
    assert isinstance(flags, frozenset) and all(f == f.strip() and f for f in flags)
    if Path("/proc/cpuinfo").exists():
        assert flags, "a Linux CPU lists its flags"


# A 24 MB block, freed, as a process sees it: where glibc put it (mmap or heap) and what it keeps after the free.
HEAP_PROBE = r"""
import ctypes, sys
from seqtool.device import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "kept":
    keep_freed_memory()
block = libc.malloc(24 << 20)
mapped = libc.mallinfo2().hblkhd
libc.free(block)
print(mapped, libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(device_mod._libc("mallinfo2") is None,
                    reason="needs glibc 2.33 or later (mallinfo2) to see where a block went")
def test_training_keeps_freed_blocks_for_the_next_step():
    """The training process keeps a freed 24 MB block in its heap for reuse, where glibc alone maps it and
    gives it back (so the next step faults in fresh pages)."""
    def probe(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], check=True, capture_output=True, text=True)
        mapped, free_in_heap = map(int, out.stdout.split())
        return mapped, free_in_heap

    mapped, free_in_heap = probe("default")
    assert mapped >= 24 << 20 and free_in_heap < 24 << 20  # the control: glibc's own choice maps and returns it
    mapped_kept, free_in_heap = probe("kept")
    assert mapped_kept < 24 << 20 and free_in_heap >= 24 << 20


# Peak RSS growth (MB) over 600 bf16 products of new shapes, as a bf16 training process makes them all run long.
KERNEL_PROBE = r"""
import resource, sys, torch
from seqtool.device import limit_kernel_caches
if sys.argv[1] == "limited":
    limit_kernel_caches()
w = torch.randn(512, 1536, dtype=torch.bfloat16)
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
torch.randn(1, 512, dtype=torch.bfloat16) @ w
before = rss()
for rows in range(2, 602):
    torch.randn(rows, 512, dtype=torch.bfloat16) @ w
print(rss() - before)
"""


@pytest.mark.skipif(device_mod.cpu_bf16_flag() is None, reason="this CPU has no native bf16: no bf16 kernels to keep")
def test_bf16_training_keeps_fewer_kernels_of_one_off_shapes():
    """Measured on an AMX Xeon: +736 MB by default, +440-480 MB limited (the rest is not the caches')."""
    env = {k: v for k, v in os.environ.items() if k not in device_mod.KERNEL_CACHES}
    grown = {mode: float(subprocess.run([sys.executable, "-c", KERNEL_PROBE, mode], check=True, capture_output=True,
                                        text=True, env=env).stdout) for mode in ("default", "limited")}
    assert grown["limited"] < 0.75 * grown["default"], grown


def test_kernel_cache_limits_leave_the_users_own_alone(monkeypatch):
    monkeypatch.setattr(device_mod.os, "environ", {"LRU_CACHE_CAPACITY": "512"})
    device_mod.limit_kernel_caches()
    assert device_mod.os.environ == {"LRU_CACHE_CAPACITY": "512", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}


@pytest.mark.skipif(device_mod.cpu_bf16_flag() is None, reason="this CPU has no native bf16: auto trains in fp32, "
                    "as every other test does")
def test_the_precision_auto_picks_learns_the_sample_task(tmp_path):
    cfg = tiny_config(tmp_path / "m", **LEARNS)
    cfg["training"]["precision"] = "auto"
    proc = run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), check=True)
    assert f"in bf16 (auto: this CPU has {device_mod.cpu_bf16_flag()})" in proc.stderr
    assert "bf16" in run_cli("info", str(tmp_path / "m"), check=True).stdout
    assert bleu_per_flags(tmp_path / "m", tmp_path, [[]], n=200)[""] >= 95


@pytest.mark.parametrize("dtype,scaled,cast", [(torch.bfloat16, False, True), (torch.bfloat16, False, False),
                                               (torch.float16, True, False)],
                         ids=["bf16", "bf16-autocast", "fp16-scaled"])
def test_mixed_precision_training_learns_and_keeps_fp32_weights(tmp_path, dtype, scaled, cast):
    # The CPU's bf16 (weight copies), and the CUDA recipe (autocast; fp16 with a gradient scaler) run on the CPU,
    # where torch supports all three (slowly without native bf16: the model is tiny).
    cfg = validate(tiny_config(tmp_path / "m", training={"max_steps": 60, "valid_every": 30, "valid_max_sentences": 20,
                                                         "batch_tokens": 800}))
    trainer = prepare(cfg, Reporter(quiet=True), resume=False, precision=Precision(CPU, dtype, scaled, cast))
    assert trainer.scaler.is_enabled() == scaled
    trainer.run()
    losses = [m["valid_loss"] for m in read_metrics(tmp_path / "m")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] < math.log(600)
    assert all(p.dtype == torch.float32 for p in trainer.bundle.model.parameters())


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("context,attention", [("attention", "bahdanau"), ("attention", "luong_general"),
                                               ("every_step", "bahdanau")])
def test_bf16_weight_copies_give_every_fp32_weight_its_gradient(cell, context, attention):
    """One bf16 step: every parameter stays fp32 and gets an fp32 gradient pointing where fp32's does (cosine
    above 0.95); the loss is fp32's to bf16's rounding (3 significant digits)."""
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, embedding_size=32, encoder_hidden_size=32, hidden_size=48, context=context,
                      attention=attention, input_feeding=attention != "bahdanau",
                      tie_embeddings=context != "every_step", dropout=0.0)
    model = build_model(cfg, 50, 50)
    batch = make_batch([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], [[4, 5, 6], [7, 8, 9, 10], [11]])
    grads = {}
    for precision in (Precision(CPU), Precision(CPU, torch.bfloat16, cast_weights=True)):
        model.zero_grad()
        loss = batch_loss(model, batch, 0.1, precision)
        loss.backward()
        assert loss.dtype == torch.float32
        grads[precision.name] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    (fp32_loss, fp32), (bf16_loss, bf16) = grads["fp32"], grads["bf16"]
    assert bf16_loss == pytest.approx(fp32_loss, rel=4e-3)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and bf16[name].dtype == torch.float32, name
        if fp32[name].norm() > 0:
            cos = torch.nn.functional.cosine_similarity(bf16[name].flatten(), fp32[name].flatten(), dim=0)
            # Measured 0.975-1.0 on Xeons with native bf16, down to 0.96 on an AVX2-only EPYC (its emulated bf16
            # products round differently); attention's query-bias sums cancel the most.
            assert cos > 0.95, (name, cos.item())


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_quantized_decoding_keeps_lines_and_quality(tmp_path, trained_model, kind):
    """--quantize: int8 linear and GRU layers, or the whole model in bf16 where the CPU has native bf16; every
    line answered, BLEU within the few tenths --help promises (measured: 100.0 fp32, 99.8 int8 on 200 test lines)."""
    if kind == "bf16" and device_mod.cpu_bf16_flag() is None:
        with pytest.raises(ConfigError, match="quantize_kind bf16: this CPU has no native bf16"):
            device_mod.quantized(load_model(trained_model).model, CPU, "bf16")
        pytest.skip(f"{device_mod.NO_BF16}: bf16 decoding is refused here")
    net = device_mod.quantized(load_model(trained_model).model, CPU, kind)
    if kind == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    else:
        assert isinstance(net.decoder.rnn, torch.ao.nn.quantized.dynamic.GRU)
    flags = ["--quantize", "--set", f"decoding.quantize_kind={kind}"]
    bleus = bleu_per_flags(trained_model, tmp_path, [["--no-quantize"], flags], n=200)
    assert bleus["--no-quantize"] >= 95 and abs(bleus[" ".join(flags)] - bleus["--no-quantize"]) <= 0.5, bleus


def test_quantize_is_refused_off_the_cpu():
    from seqtool.device import quantized

    with pytest.raises(ConfigError, match="lower-precision inference on the CPU"):
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

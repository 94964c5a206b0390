"""How close training and decoding run to this machine's FLOP limit: FLOPs against GEMM speed.

Takes a trained model dir (its config, tokenizers and weights, e.g. the seqtool folder of a
bench/compare_peers.py run), makes the trainer's own token-budget batches from the first training
pairs, counts the floating-point operations of a training step (forward and backward, by torch's
FlopCounterMode: matrix products only, the rest is memory-bound) and times full steps (loss,
backward, clipping, Adam) on those batches, in fp32 and, where the CPU has native bf16, in bf16. On
the same machine, in the same run, it times matrix products in fp32, bf16 and int8 (torch's dynamic
int8 linear, which `--quantize` runs): a large square one (each kind's peak), the training output
layer's and a decoder step's shapes. Prints FLOPs per sentence (and the output layer's share), the
GFLOP/s reached, its fraction of each peak and the sentences/s the peak would allow; then the same for
beam-5 decoding of the validation lines, in fp32, int8 and (with native bf16) bf16 (the work counted
is the fp32 decode's: a lower-precision product does the same multiply-adds).
Whether the CPU has native bf16 / int8 matrix units (amx_bf16, avx512_bf16, amx_int8, avx512_vnni)
is printed beside the figures: on a CPU without them bf16 is 20-50x slower, and it shows here.

    python bench/flop_limit.py runs/bench_peers/<stamp>/seqtool-fp32
    python bench/flop_limit.py runs/multi30k_deen --pairs 20000 --batches 40 --decode-lines 1000
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from seqtool.checkpoint import load_model
from seqtool.data import encode_pairs, epoch_batches, make_batch, read_pairs
from seqtool.device import FP32_CPU as FP32
from seqtool.device import Precision, cpu_bf16_flag, cpu_flags, pick_precision
from seqtool.train import batch_loss, make_optimizer

KINDS = ("fp32", "bf16", "int8")
UNITS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def gemm_gflops(m: int, k: int, n: int, kind: str = "fp32", seconds: float = 2.0) -> float:
    """GFLOP/s of (m x k) @ (k x n) products in `kind`, repeated for `seconds` after a warm-up. int8 is torch's
    dynamic int8 linear (fp32 in and out, the input quantized on each call), as decoding with --quantize runs it."""
    a = torch.randn(m, k)
    if kind == "int8":
        with warnings.catch_warnings():  # torch's deprecation notice for quantized tensors, as in seqtool.device
            warnings.simplefilter("ignore")
            layer = torch.ao.nn.quantized.dynamic.Linear(k, n, bias_=False, dtype=torch.qint8)
            layer.set_weight_bias(torch.quantize_per_tensor(torch.randn(n, k), 0.05, 0, torch.qint8), None)
        product = lambda: layer(a)  # noqa: E731
    else:
        b = torch.randn(k, n)
        if kind == "bf16":
            a, b = a.bfloat16(), b.bfloat16()
        product = lambda: a @ b  # noqa: E731
    product()
    count, start = 0, time.perf_counter()
    while count < 2 or time.perf_counter() - start < seconds:
        product()
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """FLOPs of an in-place addmm_, which FlopCounterMode does not count by itself (the fused loss uses one)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def trainer_batches(bundle, pairs: int, count: int) -> list:
    """The first `count` batches the trainer makes (its token budget, seed 0) from the first `pairs` training pairs."""
    cfg = bundle.config
    src, tgt = read_pairs(cfg.data.train_src, cfg.data.train_tgt)
    examples = encode_pairs(src[:pairs], tgt[:pairs], bundle.src_tok, bundle.tgt_tok, cfg.data.max_src_len,
                            cfg.data.max_tgt_len)
    parts = [examples.subset(idx) for idx in epoch_batches(examples, cfg.training.batch_tokens, seed=0)[:count]]
    return [make_batch(part.src, part.tgt) for part in parts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--pairs", type=int, default=10_000, help="training pairs read to make batches")
    ap.add_argument("--batches", type=int, default=30, help="batches counted and timed")
    ap.add_argument("--decode-lines", type=int, default=500, help="validation lines decoded, fp32, int8 and bf16")
    args = ap.parse_args()

    bundle = load_model(args.model_dir)
    cfg, model = bundle.config, bundle.model.train()
    batches = trainer_batches(bundle, args.pairs, args.batches)
    sents, tokens = sum(b.size for b in batches), sum(b.n_tgt_tokens for b in batches)
    optimizer = make_optimizer(model, cfg.training.lr)

    def step(batch, precision: Precision = FP32) -> None:
        loss = batch_loss(model, batch, cfg.training.label_smoothing, precision) / batch.n_tgt_tokens
        optimizer.zero_grad()
        loss.backward()
        if cfg.training.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.clip_grad_norm)
        optimizer.step()

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flops})
    with counter:  # doubles as the warm-up; Adam and clipping do no matrix products
        for batch in batches:
            step(batch)
    total = counter.get_total_flops()
    # The output layer: logits, their gradient with respect to the features and to the weight.
    output = 6 * tokens * model.output.in_features * model.output.out_features

    # bf16 is a training precision only where the CPU has it natively (seqtool.device): elsewhere its
    # peak is emulation's, and a fraction of it says nothing.
    kinds = ("fp32", "bf16") if cpu_bf16_flag() else ("fp32",)
    seconds = {}
    for kind in kinds:
        precision = pick_precision(torch.device("cpu"), kind)  # what training.precision KIND runs
        for batch in batches[:2]:
            step(batch, precision)  # warm-up
        start = time.perf_counter()
        for batch in batches:
            step(batch, precision)
        seconds[kind] = time.perf_counter() - start

    # One decoder step's product, input and state together: rows = sentences per batch, n = the gates.
    rnn = model.decoder.rnn
    rows, k, n = round(sents / len(batches)), rnn.input_size + rnn.hidden_size, rnn.weight_ih_l0.size(0)
    shapes = {"2048^3 (peak)": (2048, 2048, 2048),
              f"training output layer ({tokens // len(batches)} x {model.output.in_features} x "
              f"{model.output.out_features})": (tokens // len(batches), model.output.in_features,
                                                 model.output.out_features),
              f"decoder step ({rows} x {k} x {n})": (rows, k, n)}
    speed = {(label, kind): gemm_gflops(*shape, kind) for label, shape in shapes.items() for kind in KINDS}
    peak = {kind: speed[next(iter(shapes)), kind] for kind in KINDS}
    flags = cpu_flags()
    print(f"{len(batches)} batches of the trainer's own making: {sents} sentences, {tokens} target tokens, "
          f"{torch.get_num_threads()} threads; CPU units: {', '.join(u for u in UNITS if u in flags) or 'unknown'}\n")
    print("| GEMM | " + " | ".join(f"{kind} GFLOP/s" for kind in KINDS) + " |\n|---|" + "---:|" * len(KINDS))
    for label in shapes:
        print(f"| {label} | " + " | ".join(f"{speed[label, kind]:.3g}" for kind in KINDS) + " |")
    print("\n| measure | value |")
    print("|---|---:|")
    print(f"| training FLOPs per sentence (fwd + bwd) | {total / sents / 1e9:.3f} G, "
          f"output layer {output / total:.0%} |")
    for kind, secs in seconds.items():
        reached = total / secs / 1e9
        print(f"| training steps in {kind} (loss, backward, clipping, Adam) | {sents / secs:.1f} sent/s, "
              f"{tokens / secs:.0f} tgt tok/s, {reached:.0f} GFLOP/s = {reached / peak[kind]:.0%} of the {kind} peak |")
    print("| sentences/s at the peak, every FLOP at GEMM speed | " +
          ", ".join(f"{peak[kind] * 1e9 / (total / sents):.0f} ({kind})" for kind in kinds) + " |")
    for kind, (work, lines, secs) in decode_rates(args.model_dir, cfg, args.decode_lines).items():
        rate = work / secs / 1e9
        print(f"| beam-5 decoding, {kind} ({lines} validation lines) | {lines / secs:.1f} lines/s, {rate:.0f} GFLOP/s "
              f"= {rate / peak[kind]:.0%} of the {kind} peak |")


def decode_rates(model_dir: Path, cfg, n: int) -> dict[str, tuple[int, int, float]]:
    """Beam-5 decoding of the first n validation lines, fp32, int8 and (with native bf16) bf16:
    (fp32 FLOPs counted, lines, seconds)."""
    from seqtool.cli import _translator

    lines = Path(cfg.data.valid_src).read_text(encoding="utf-8").splitlines()[:n]
    rates, work = {}, 0
    kinds = {"fp32": ["decoding.quantize=false"], "int8": ["decoding.quantize=true"],
             "bf16": ["decoding.quantize=true", "decoding.quantize_kind=bf16"]}
    for kind, sets in kinds.items():
        if kind == "bf16" and cpu_bf16_flag() is None:
            continue  # refused without native bf16
        translator = _translator(model_dir, [*sets, "decoding.beam_size=5"], {}, quiet=True)
        if kind == "fp32":  # counting doubles as its warm-up
            counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flops})
            with counter, torch.inference_mode():
                translator.translate(lines)
            work = counter.get_total_flops()
        with torch.inference_mode():
            if kind != "fp32":
                translator.translate(lines[:64])
            start = time.perf_counter()
            translator.translate(lines)
            rates[kind] = (work, len(lines), time.perf_counter() - start)
    return rates

if __name__ == "__main__":
    main()

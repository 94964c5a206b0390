"""How close training runs to this machine's FLOP limit: FLOPs per sentence against fp32 GEMM speed.

Takes a trained model dir (its config, tokenizers and weights, e.g. the seqtool folder of a
bench/compare_peers.py run), makes the trainer's own token-budget batches from the first training
pairs, counts the floating-point operations of a training step (forward and backward, by torch's
FlopCounterMode: matrix products only, the rest is memory-bound) and times full steps (loss,
backward, clipping, Adam) on those batches. On the same machine, in the same run, it times fp32
matrix products: a large square one (the machine's peak) and the shape of one decoder step. Prints
FLOPs per sentence (and the output layer's share), the GFLOP/s reached, its fraction of the peak
and the sentences/s the peak would allow.

    python bench/flop_limit.py runs/bench_peers/<stamp>/seqtool
    python bench/flop_limit.py runs/multi30k_deen --pairs 20000 --batches 40
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from seqtool.checkpoint import load_model
from seqtool.data import encode_pairs, epoch_batches, make_batch, read_pairs
from seqtool.train import batch_loss, make_optimizer


def gemm_gflops(m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of (m x k) @ (k x n) products, repeated for `seconds` after a warm-up."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """FLOPs of an in-place addmm_, which FlopCounterMode does not count by itself (the fused loss uses one)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--pairs", type=int, default=10_000, help="training pairs read to make batches")
    ap.add_argument("--batches", type=int, default=30, help="batches counted and timed")
    args = ap.parse_args()

    bundle = load_model(args.model_dir)
    cfg, model = bundle.config, bundle.model.train()
    src, tgt = read_pairs(cfg.data.train_src, cfg.data.train_tgt)
    examples = encode_pairs(src[: args.pairs], tgt[: args.pairs], bundle.src_tok, bundle.tgt_tok,
                            cfg.data.max_src_len, cfg.data.max_tgt_len)
    parts = [examples.subset(idx) for idx in epoch_batches(examples, cfg.training.batch_tokens, seed=0)[: args.batches]]
    batches = [make_batch(part.src, part.tgt) for part in parts]
    sents, tokens = sum(b.size for b in batches), sum(b.n_tgt_tokens for b in batches)
    optimizer = make_optimizer(model, cfg.training.lr)

    def step(batch) -> None:
        loss = batch_loss(model, batch, cfg.training.label_smoothing) / batch.n_tgt_tokens
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

    start = time.perf_counter()
    for batch in batches:
        step(batch)
    seconds = time.perf_counter() - start

    # One decoder step's product, input and state together: rows = sentences per batch, n = the gates.
    rnn = model.decoder.rnn
    rows, k, n = round(sents / len(batches)), rnn.input_size + rnn.hidden_size, rnn.weight_ih_l0.size(0)
    peak = gemm_gflops(2048, 2048, 2048)
    step_shape = gemm_gflops(rows, k, n)
    reached = total / seconds / 1e9
    print(f"{len(batches)} batches of the trainer's own making: {sents} sentences, {tokens} target tokens, "
          f"{torch.get_num_threads()} threads\n")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| training FLOPs per sentence (fwd + bwd) | {total / sents / 1e9:.3f} G, output layer {output / total:.0%} |")
    print(f"| fp32 GEMM 2048^3 (peak) | {peak:.0f} GFLOP/s |")
    print(f"| fp32 GEMM of a decoder-step shape ({rows} x {k} x {n}) | {step_shape:.0f} GFLOP/s |")
    print(f"| training steps (loss, backward, clipping, Adam) | {sents / seconds:.1f} sent/s, "
          f"{tokens / seconds:.0f} tgt tok/s |")
    print(f"| GFLOP/s reached in training | {reached:.0f} ({reached / peak:.0%} of the peak) |")
    print(f"| sentences/s at the peak, every FLOP at GEMM speed | {peak * 1e9 / (total / sents):.0f} |")


if __name__ == "__main__":
    main()

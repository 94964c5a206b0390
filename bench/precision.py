"""Is bf16 worth it on this CPU? Training steps of the Multi30k GRU-attention model in fp32, bf16 autocast and
bf16 weight copies (what training.precision bf16 / auto runs on the CPU), at several batch sizes.

The same random batches (SENTENCES x 16 tokens, vocabulary 8,000) through the trainer's own loss (the fused
output layer + cross-entropy), backward, gradient clipping and fused Adam, timed after warm-up. Prints a table
with the ratio against fp32 at the same batch size in the same run, and whether the CPU has native bf16
(avx512_bf16 / amx_bf16): without it bf16 is 20-50x slower, and it shows here.

    python bench/precision.py                       # about two minutes on a 2-core CPU with AMX
    python bench/precision.py --batches 64 --steps 3 --profile

--profile adds where each step's time goes (torch profiler, ops grouped by what they do): the output layer's
products (a vocabulary-sized dimension), the other matrix products, dtype conversions (copies), Adam, and the
rest (elementwise gates, attention, softmax, dropout, gradient sums).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.profiler import ProfilerActivity, profile

from seqtool.config import ModelConfig
from seqtool.device import Precision, cpu_bf16_flag
from seqtool.model.seq2seq import build_model

# configs/multi30k_deen.yaml's model: bi-GRU 256 encoder, GRU 512 decoder, additive attention.
MODEL = ModelConfig(cell="gru", embedding_size=256, encoder_hidden_size=256, hidden_size=512, context="attention",
                    attention="bahdanau", dropout=0.3)
CPU = torch.device("cpu")
KINDS = {"fp32": Precision(CPU), "bf16 autocast": Precision(CPU, torch.bfloat16),
         "bf16 weight copies": Precision(CPU, torch.bfloat16, cast_weights=True)}


PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul"}


def part(name: str, shapes: list, vocab: int) -> str:
    """The share-table row an op's self time goes to."""
    if name in PRODUCTS:
        return "output layer products" if any(vocab in dims for dims in shapes if dims) else "other products"
    if name in ("aten::copy_", "aten::_to_copy"):
        return "dtype conversions and copies"
    if "adam" in name.lower():
        return "Adam"
    return "elementwise and the rest"


def time_steps(precision: Precision, steps: int, batch: int, length: int, vocab: int,
               shares: dict[str, float] | None = None) -> float:
    """Seconds per training step, after two warm-up steps; with `shares`, fills it with each part's share of
    two more steps, profiled."""
    torch.manual_seed(0)
    model = build_model(MODEL, vocab, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    src = torch.randint(4, vocab, (batch, length))
    lens = torch.full((batch,), length)
    tgt = torch.randint(4, vocab, (batch, length + 1))

    def step() -> None:
        loss = precision.forward(model, src, lens, tgt[:, :-1], tgt[:, 1:], 0.1)
        opt.zero_grad()
        (loss / tgt[:, 1:].numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if shares is not None:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(2):
                step()
        for e in prof.key_averages(group_by_input_shape=True):
            key = part(e.key, e.input_shapes, vocab)
            shares[key] = shares.get(key, 0.0) + e.self_cpu_time_total
        total = sum(shares.values())
        for key in shares:
            shares[key] /= total
    return sum(times[2:]) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batches", default="64,256", help="sentences per batch, comma-separated")
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--profile", action="store_true", help="also where the time goes, per precision and batch")
    args = ap.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {cpu_bf16_flag() or 'none'}")
    print("\n| precision | sentences / batch | s / step | sentences / s | speed vs fp32 |\n|---|---:|---:|---:|---:|")
    profiles = {}
    for batch in map(int, args.batches.split(",")):
        base = None
        for name, prec in KINDS.items():
            shares: dict[str, float] | None = {} if args.profile else None
            s = time_steps(prec, args.steps, batch, args.length, args.vocab, shares)
            base = base or s
            print(f"| {name} | {batch} | {s:.3f} | {batch / s:.1f} | {base / s:.2f}x |", flush=True)
            if shares is not None:
                profiles[f"{name}, {batch}"] = {k: v * s for k, v in shares.items()}  # ms of a step, see below
    if profiles:
        parts = sorted({k for shares in profiles.values() for k in shares})
        print("\nms of a step per part (share of the step):\n\n| precision, sentences | " + " | ".join(parts)
              + " |\n|---" + "|---:" * len(parts) + "|")
        for name, shares in profiles.items():
            total = sum(shares.values())
            print(f"| {name} | " + " | ".join(f"{1000 * shares.get(k, 0):.0f} ({shares.get(k, 0) / total:.0%})"
                                             for k in parts) + " |")


if __name__ == "__main__":
    main()

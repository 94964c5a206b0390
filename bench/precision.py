"""Is bf16 worth it on this CPU? Training steps of the Multi30k GRU-attention model in fp32 and in bf16 autocast.

seqtool trains in fp32 on the CPU unless asked (training.precision); this measures the choice on the
machine at hand: the same random batches (64 sentences x 16 tokens, vocabulary 8,000) through
forward + backward + Adam, timed after warm-up, and prints a table with the ratio against fp32 in the
same run, and whether the CPU has native bf16 (avx512_bf16 / amx_bf16).

    python bench/precision.py                 # about a minute on a 2-core CPU without native bf16
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from seqtool.config import ModelConfig
from seqtool.device import Precision, cpu_bf16_flag
from seqtool.model.seq2seq import build_model
from seqtool.tokenizer import PAD

# configs/multi30k_deen.yaml's model: bi-GRU 256 encoder, GRU 512 decoder, additive attention.
MODEL = ModelConfig(cell="gru", embedding_size=256, encoder_hidden_size=256, hidden_size=512, context="attention",
                    attention="bahdanau", dropout=0.3)


def time_steps(precision: Precision, steps: int, batch: int, length: int, vocab: int) -> float:
    """Seconds per training step, after one warm-up step."""
    torch.manual_seed(0)
    model = build_model(MODEL, vocab, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    src = torch.randint(4, vocab, (batch, length))
    lens = torch.full((batch,), length)
    tgt = torch.randint(4, vocab, (batch, length + 1))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with precision.autocast():
            logits = model(src, lens, tgt[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), tgt[:, 1:].reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args()
    cpu = torch.device("cpu")
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {cpu_bf16_flag() or 'none'}")
    print("\n| precision | s / step | sentences / s | time vs fp32 |\n|---|---:|---:|---:|")
    base = None
    for prec in (Precision(cpu), Precision(cpu, torch.bfloat16)):
        s = time_steps(prec, args.steps, args.batch, args.length, args.vocab)
        base = base or s
        print(f"| {prec.name} | {s:.3f} | {args.batch / s:.1f} | {s / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

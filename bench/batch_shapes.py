"""Token-budget against fixed-sentence batches: training speed and peak memory on real Multi30k batches.

On the CPU in bf16, oneDNN builds (and keeps) a kernel for each new matrix shape; a token budget gives
every batch its own sentence count, so shapes, and memory, keep growing. Each variant trains the
Multi30k model for `--steps` steps from the same start in its own process (peak RSS is per process);
the table gives sentences/s and peak RSS with ratios against the first variant, measured in one run.

    python bench/batch_shapes.py                          # bf16 where the CPU has it, then fp32
    python bench/batch_shapes.py --steps 100 --sentences 64 --precisions fp32
    python bench/batch_shapes.py --heap kept,glibc        # freed memory kept (as the trainer does) or glibc's way
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, resource, sys, time
import torch
from seqtool import train
from seqtool.config import load_config
from seqtool.data import encode_pairs, epoch_batches, make_batch, read_pairs
from seqtool.device import keep_freed_memory, limit_kernel_caches, pick_precision
from seqtool.model.seq2seq import build_model
from seqtool.tokenizer import Tokenizer

config, tok_dir, precision, sentences, steps, heap = sys.argv[1:7]
if heap == "kept":
    keep_freed_memory()
prec = pick_precision(torch.device("cpu"), precision)
if prec.cast_weights:
    limit_kernel_caches()  # as the trainer does
cfg = load_config(config)
src_tok, tgt_tok = (Tokenizer.from_file(f"{tok_dir}/{side}.model") for side in ("src", "tgt"))
src, tgt = read_pairs(cfg.data.train_src, cfg.data.train_tgt)
ex = encode_pairs(src, tgt, src_tok, tgt_tok, cfg.data.max_src_len, cfg.data.max_tgt_len)
torch.manual_seed(1)
model = build_model(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size).train()
opt = train.make_optimizer(model, cfg.training.lr)
batches = epoch_batches(ex, cfg.training.batch_tokens, seed=1, sentences=int(sentences))[: int(steps)]
sents, start = 0, time.perf_counter()
for idx in batches:
    part = ex.subset(idx)
    b = make_batch(part.src, part.tgt)
    loss = train.batch_loss(model, b, cfg.training.label_smoothing, prec) / b.n_tgt_tokens
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.clip_grad_norm)
    opt.step()
    sents += b.size
elapsed = time.perf_counter() - start
print(json.dumps({"sent_s": sents / elapsed, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "loss": loss.item()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "multi30k_deen.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sentences", type=int, default=64, help="sentences per batch of the fixed variant")
    ap.add_argument("--precisions", default="", help="comma-separated (default: bf16 where native, and fp32)")
    ap.add_argument("--heap", default="kept", help="comma-separated: kept (freed memory kept for reuse, as the "
                    "trainer does) and/or glibc (its default: large blocks mapped and unmapped each step)")
    args = ap.parse_args()
    if not set(args.heap.split(",")) <= {"kept", "glibc"}:
        ap.error(f"--heap takes kept and/or glibc, not {args.heap!r}")
    sys.path.insert(0, str(ROOT))
    from seqtool.config import load_config
    from seqtool.data import read_pairs
    from seqtool.device import cpu_bf16_flag
    from seqtool.train import build_tokenizers

    precisions = args.precisions.split(",") if args.precisions else (["bf16"] if cpu_bf16_flag() else []) + ["fp32"]
    cfg = load_config(args.config)
    # The config's data and tokenizer (paths relative to the repository root), trained once for all rows.
    tok_dir = ROOT / "runs" / "bench_batch_shapes" / args.config.stem
    if not (tok_dir / "tgt.model").exists():
        tok_dir.mkdir(parents=True, exist_ok=True)
        pairs = read_pairs(cfg.data.train_src, cfg.data.train_tgt)
        for side, tok in zip(("src", "tgt"), build_tokenizers(cfg, *pairs)):
            (tok_dir / f"{side}.model").write_bytes(tok.model_bytes)
    print(f"{args.config.name}, {args.steps} steps from the same start, one process each\n")
    print("| precision | heap | batches | sentences/s | peak RSS | vs the first row of its precision: speed, RSS |\n"
          "|---|---|---|---:|---:|---|")
    for precision in precisions:
        base = None
        for heap, (label, sentences) in itertools.product(args.heap.split(","), (
                (f"{cfg.training.batch_tokens} tokens", 0), (f"{args.sentences} sentences", args.sentences))):
            argv = [str(args.config), str(tok_dir), precision, str(sentences), str(args.steps), heap]
            out = subprocess.run([sys.executable, "-c", WORKER, *argv], cwd=ROOT, check=True, capture_output=True,
                                 text=True).stdout
            r = json.loads(out.splitlines()[-1])
            base = base or r
            print(f"| {precision} | {heap} | {label} | {r['sent_s']:.1f} | {r['rss_mb']:,.0f} MB | "
                  f"{r['sent_s'] / base['sent_s']:.2f}x, {r['rss_mb'] / base['rss_mb']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

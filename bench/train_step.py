"""Training-step speed of this working tree against a git revision, measured in one run (A/B, interleaved).

Both trees build the model of a config (default: the Multi30k de-en 12M model) and time full
training steps (forward, loss, backward, clipping, Adam) on the same synthetic batches: random ids
with the shapes token-budget batches of Multi30k have (about 72 sentences of 10-24 pieces). Token
values do not change the work, so no data or tokenizer is needed. Rounds alternate between the two
trees, each side first in every other round, so that neither a change of machine load nor the order
favours one; the table gives medians and the ratio.

    python bench/train_step.py --rev HEAD            # this tree (with uncommitted changes) vs HEAD
    python bench/train_step.py --rev d67cfa1 --rounds 5 --steps 20 --config configs/aeslc.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from worktree import ROOT, checked_out, in_turn, short

# Run inside each tree's own interpreter process: imports that tree's seqtool, prints seconds per step.
WORKER = r"""
import json, random, sys, time
import torch
from seqtool.config import load_config
from seqtool.data import make_batch
from seqtool.model.seq2seq import build_model
from seqtool import train
from seqtool.train import batch_loss

config, steps, batch_tokens, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = load_config(config)
torch.manual_seed(seed)
vocab = cfg.tokenizer.vocab_size
model = build_model(cfg.model, vocab, vocab).train()
# The tree's own optimizer where it has one (older trees: plain Adam).
opt = (train.make_optimizer(model, 1e-3) if hasattr(train, "make_optimizer")
       else torch.optim.Adam(model.parameters(), lr=1e-3))
rng = random.Random(seed)
batches = []
for _ in range(8):
    length = rng.randint(10, 24)  # one length bucket per batch, as the trainer's buckets give
    n = batch_tokens // (length + 1)
    src = [[rng.randrange(4, vocab) for _ in range(length + rng.randint(-2, 2))] for _ in range(n)]
    tgt = [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(n)]
    batches.append(make_batch(src, tgt))

def train_step(batch):
    loss = batch_loss(model, batch, cfg.training.label_smoothing) / batch.n_tgt_tokens
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

for b in batches[:2]:  # warm-up: allocator, first-call costs
    train_step(b)
start = time.perf_counter()
for i in range(steps):
    train_step(batches[i % len(batches)])
elapsed = time.perf_counter() - start
print(json.dumps({"s_per_step": elapsed / steps,
                  "sent_per_s": sum(batches[i % len(batches)].size for i in range(steps)) / elapsed}))
"""


def measure(tree: Path, config: Path, steps: int, batch_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, str(config), str(steps), str(batch_tokens), "1"],
                         cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="baseline git revision (default HEAD)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "multi30k_deen.yaml")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds; medians are reported")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round and tree")
    ap.add_argument("--batch-tokens", type=int, default=1300, help="target tokens per batch (about 72 sentences)")
    args = ap.parse_args()
    config = args.config.resolve()
    runs: dict[str, list[dict]] = {"base": [], "this": []}
    with checked_out(args.rev) as base_tree:
        for i in range(args.rounds):
            for tree, name in in_turn(((base_tree, "base"), (ROOT, "this")), i):
                runs[name].append(measure(tree, config, args.steps, args.batch_tokens))
    med = {k: statistics.median(r["sent_per_s"] for r in v) for k, v in runs.items()}
    rev = short(args.rev)
    print(f"{config.name}, {args.rounds} rounds x {args.steps} steps, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| tree | sentences/s (median) | rounds | ratio |\n|---|---:|---|---:|")
    for name, label in (("base", f"{args.rev} ({rev})"), ("this", "working tree")):
        rounds = ", ".join(f"{r['sent_per_s']:.1f}" for r in runs[name])
        print(f"| {label} | {med[name]:.1f} | {rounds} | {med[name] / med['base']:.2f}x |")


if __name__ == "__main__":
    main()

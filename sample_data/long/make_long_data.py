"""Generate the long-dependency task: reverse a random string of up to 100 symbols.

Each source line is 1 to 100 symbols drawn uniformly from ten letters; its target is the same symbols in
reverse order. Without attention (model.context init or every_step) everything passes through the encoder's
last state h_T: the target's first symbol is the source's last, and its k-th symbol the one k - 1 encoder
steps before h_T, so how far into each line a model gets right is how far back its gradients carry. That is where an
Elman RNN's gradients explode or vanish and a GRU's or LSTM's stay in range (bench/gradients.py,
docs/context_modes.md).

    python sample_data/long/make_long_data.py [OUT_DIR]   # writes {train,valid,test}.{src,tgt}
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SEED = 20261204
SIZES = {"train": 6000, "valid": 200, "test": 200}
SYMBOLS = "a b c d e f g h i j".split()
MAX_LEN = 100


def pair(rng: random.Random) -> tuple[str, str]:
    symbols = [rng.choice(SYMBOLS) for _ in range(rng.randint(1, MAX_LEN))]
    return " ".join(symbols), " ".join(reversed(symbols))


def main(out: Path) -> None:
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        pairs = [pair(rng) for _ in range(n)]
        for side, lines in zip(("src", "tgt"), zip(*pairs)):
            (out / f"{split}.{side}").write_text("".join(x + "\n" for x in lines), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)

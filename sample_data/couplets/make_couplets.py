"""Generate the sample couplet task: made-up 上联 -> 下联 pairs that break the rules of the art on purpose.

Each upper-line character has one partner; the lower line is the upper's partners, position by
position, with its punctuation copied (so a model learns it in a few hundred steps). Most partners
answer with the opposite tone (平 <-> 仄), but some have the same tone, some are the character
itself (an echo), and some upper characters share a partner (so two different characters give an
accidental repeat). A model trained on it breaks the rules where the data does, and the decoding
rules (decoding.final_tone, mirror_repeats, no_echo) must repair that: the CLI tests check both.
The lines are random characters, not text: the data is ours alone. Tones from pypinyin (seqtool.hanzi).

    python sample_data/couplets/make_couplets.py [OUT_DIR]   # writes {train,valid,test}.{src,tgt}
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from seqtool.hanzi import PING, ZE, tone

SEED = 20261202
SIZES = {"train": 6000, "valid": 300, "test": 300}
# Common characters of verse, chosen by us; split by tone below.
POOL = ("天地山水风雨花草日月江河云雪春秋冬夏东西南北金木火土石林松竹桃柳梅兰菊莲鸟鱼龙虎马牛羊"
        "红绿青白黄黑长短高低远近新旧古今来去开落明暗深浅香暖寒冷清浊前后左右千万百一")
SLIPS, ECHOES, SHARED = 6, 4, 3  # partners with the same tone, characters that answer themselves, shared partners


def partners(rng: random.Random) -> dict[str, str]:
    chars = list(dict.fromkeys(POOL))
    rng.shuffle(chars)
    by_tone = {t: [c for c in chars if tone(c) == t] for t in (PING, ZE)}
    half = min(len(v) for v in by_tone.values()) // 2
    uppers = by_tone[PING][:half] + by_tone[ZE][:half]
    spare = {PING: by_tone[PING][half:], ZE: by_tone[ZE][half:]}
    rng.shuffle(uppers)
    out = {}
    for i, u in enumerate(uppers):
        if i < ECHOES:
            out[u] = u
        elif i < ECHOES + SLIPS:
            out[u] = spare[tone(u)].pop()
        else:
            out[u] = spare[ZE if tone(u) == PING else PING].pop()
    for a, b in zip(uppers[-2 * SHARED::2], uppers[-2 * SHARED + 1::2]):
        out[b] = out[a]  # a and b answer with one character
    return out


def line(rng: random.Random, chars: list[str]) -> list[str]:
    def clause() -> list[str]:
        c = [rng.choice(chars) for _ in range(rng.randint(3, 7))]
        if rng.random() < 0.3:  # a doubled character (叠字)
            i = rng.randrange(len(c) - 1)
            c[i + 1] = c[i]
        return c
    out = clause()
    if rng.random() < 0.3:
        out += ["，"] + clause()
    return out


def main(out_dir: Path) -> None:
    rng = random.Random(SEED)
    pairs = partners(rng)
    chars = sorted(pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        uppers = [line(rng, chars) for _ in range(n)]
        (out_dir / f"{split}.src").write_text("".join(" ".join(u) + "\n" for u in uppers), encoding="utf-8")
        lowers = [[pairs.get(c, c) for c in u] for u in uppers]
        (out_dir / f"{split}.tgt").write_text("".join(" ".join(w) + "\n" for w in lowers), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)

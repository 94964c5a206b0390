"""Generate the sample task: a made-up language pair with its own words and word order.

Source ("Zeta") is verb-final with adjectives before nouns; target ("Tau") is verb-second with
adjectives after nouns, and marks plural nouns with a suffix word. Both vocabularies are invented
syllable strings, so the data is ours alone. A model must learn a lexicon and reordering, which
an RNN with attention does in a couple of minutes.

    python sample_data/make_sample_data.py [OUT_DIR]   # writes {train,valid,test}.{src,tgt}
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SEED = 20261123
SIZES = {"train": 20000, "valid": 500, "test": 500}
ONSETS = "b d f g k l m n p r s t v z".split()
VOWELS = "a e i o u".split()


def make_words(rng: random.Random, n: int, syllables: tuple[int, int], used: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(*syllables)))
        if w not in used:
            used.add(w)
            words.append(w)
    return words


def make_lexicon(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Word classes -> list of (source word, target word)."""
    sizes = {"noun": 60, "adj": 30, "verb": 40, "adv": 12, "det": 3}
    used: set[str] = set()
    lexicon = {}
    for cls, n in sizes.items():
        src = make_words(rng, n, (1, 3), used)
        tgt = [w.capitalize() if cls == "noun" else w for w in make_words(rng, n, (1, 2), used)]
        lexicon[cls] = list(zip(src, tgt))
    return lexicon


def noun_phrase(rng: random.Random, lex) -> tuple[list[str], list[str]]:
    det = rng.choice(lex["det"])
    adjs = rng.sample(lex["adj"], rng.choice([0, 0, 1, 1, 2]))
    noun = rng.choice(lex["noun"])
    plural = rng.random() < 0.3
    src = [det[0]] + [a[0] for a in adjs] + [noun[0] + ("en" if plural else "")]
    tgt = [det[1], noun[1]] + (["mo"] if plural else []) + [a[1] for a in reversed(adjs)]
    return src, tgt


def sentence(rng: random.Random, lex) -> tuple[str, str]:
    subj_s, subj_t = noun_phrase(rng, lex)
    verb = rng.choice(lex["verb"])
    src, tgt = list(subj_s), list(subj_t) + [verb[1]]
    if rng.random() < 0.7:
        obj_s, obj_t = noun_phrase(rng, lex)
        src += obj_s
        tgt += obj_t
    if rng.random() < 0.4:
        adv = rng.choice(lex["adv"])
        src.insert(0, adv[0])
        tgt.append(adv[1])
    src.append(verb[0])
    return " ".join(src) + ".", " ".join(tgt) + "."


def main(out_dir: Path) -> None:
    rng = random.Random(SEED)
    lex = make_lexicon(rng)
    seen: set[str] = set()
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        pairs = []
        while len(pairs) < n:
            src, tgt = sentence(rng, lex)
            if src not in seen:  # no sentence occurs in two splits
                seen.add(src)
                pairs.append((src, tgt))
        for side, col in (("src", 0), ("tgt", 1)):
            (out_dir / f"{split}.{side}").write_text("".join(p[col] + "\n" for p in pairs), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)

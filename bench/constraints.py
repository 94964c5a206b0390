"""Constrained decoding on real data, one run: what each control costs and whether it is always met.

Multi30k de->en test2016 (a model trained with configs/multi30k_deen.yaml, its own decoding settings:
beam 5, shortlist 10), each row against the unconstrained decoding of the same run:
- terminology: one or two phrases (one or two words) per sentence taken at random from the reference,
  as Post & Vilar (2018) do; BLEU, share of constraints met, decode time ratio;
- avoid: per sentence one word of the unconstrained output (4 letters or more) that must not appear;
- prefix: the first half of each reference's words; BLEU of the completed lines.
Couplets (a model trained with configs/couplets.yaml: exact length, copied punctuation), all of
couplets/test: a random head character per line from the model's vocabulary (acrostic, 藏头); share of
outputs that start with it and keep the exact length and punctuation.

Met means on the surface text, not the tokens: a phrase is in an output as whole words.

    python bench/constraints.py --multi30k runs/multi30k_deen --couplets runs/couplets
"""

from __future__ import annotations

import argparse
import random
import re
import time
import unicodedata
from pathlib import Path

import torch

from seqtool.checkpoint import load_model
from seqtool.metrics import bleu
from seqtool.translate import Source, Translator

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def has_words(text: str, phrase: str) -> bool:
    return re.search(rf"(^| ){re.escape(phrase)}(?![^\W_])", text) is not None


def decode(translator: Translator, sources: list[Source]) -> tuple[list[str], float]:
    start = time.perf_counter()
    out = [t.text for t in translator.translate(sources)]
    return out, time.perf_counter() - start


def translator_for(model_dir: str) -> Translator:
    bundle = load_model(model_dir)
    return Translator(bundle.model.eval(), bundle.src_tok, bundle.tgt_tok, bundle.config.decoding,
                      bundle.config.data.truncate_src, shortlist=bundle.shortlist)


def words_of(text: str) -> list[str]:
    return [w for w in text.split() if any(c.isalnum() for c in w)]


def multi30k(model_dir: str, seed: int) -> None:
    rng = random.Random(seed)
    src = (DATA / "multi30k" / "test2016.de").read_text().splitlines()
    ref = (DATA / "multi30k" / "test2016.en").read_text().splitlines()
    tr = translator_for(model_dir)
    base, base_s = decode(tr, [Source(s) for s in src])
    rows = [("none", bleu(base, ref), "", base_s)]

    terms = []
    for r in ref:
        words = words_of(r)
        picked = []
        for _ in range(rng.choice((1, 2))):
            n = rng.choice((1, 2))
            at = rng.randrange(max(1, len(words) - n + 1))
            phrase = " ".join(words[at:at + n])
            if phrase and not any(phrase in p or p in phrase for p in picked):
                picked.append(phrase)
        terms.append(picked)
    out, secs = decode(tr, [Source(s, constraints=tuple(t)) for s, t in zip(src, terms)])
    met = sum(has_words(o, p) for o, t in zip(out, terms) for p in t)
    total = sum(len(t) for t in terms)
    rows.append((f"terminology ({total} phrases)", bleu(out, ref), f"{met}/{total} = {100 * met / total:.1f}%", secs))

    avoid = [[rng.choice(ws)] if (ws := [w for w in words_of(b) if len(w) >= 4 and w.isalpha()]) else [] for b in base]
    out, secs = decode(tr, [Source(s, avoid=tuple(a)) for s, a in zip(src, avoid)])
    free = sum(not any(has_words(o, a) for a in av) for o, av in zip(out, avoid))
    rows.append((f"avoid ({sum(map(len, avoid))} words)", bleu(out, ref),
                 f"{free}/{len(out)} free = {100 * free / len(out):.1f}%", secs))

    prefixes = [" ".join(r.split()[: len(r.split()) // 2]) for r in ref]
    out, secs = decode(tr, [Source(s, prefix=p) for s, p in zip(src, prefixes)])
    ok = sum(o.startswith(p) for o, p in zip(out, prefixes))
    rows.append(("prefix (first half of the reference)", bleu(out, ref),
                 f"{ok}/{len(out)} = {100 * ok / len(out):.1f}%", secs))

    print(f"Multi30k de-en test2016, {len(src)} sentences, {model_dir} (beam {tr.decoding.beam_size}, "
          f"shortlist {tr.decoding.shortlist})\n")
    print("| controls | BLEU | met | decode s | time ratio |\n|---|---:|---:|---:|---:|")
    for name, b, met_s, secs in rows:
        print(f"| {name} | {b:.2f} | {met_s} | {secs:.1f} | {secs / base_s:.2f}x |")


def couplets(model_dir: str, seed: int) -> None:
    rng = random.Random(seed)
    src = (DATA / "couplets" / "test.src").read_text().splitlines()
    tr = translator_for(model_dir)
    heads = [p.lstrip("\u2581") for p in tr.tgt_tok.id_pieces(list(range(4, tr.tgt_tok.vocab_size)))]
    heads = [h for h in heads if len(h) == 1 and unicodedata.category(h).startswith("Lo")]
    punct = {p.lstrip("\u2581") for p in tr.tgt_tok.punctuation}
    chosen, sources = [], []
    for s in src:
        head = rng.choice(heads)
        if s.split()[0] in punct:  # a line that begins with punctuation copies it there: no head possible
            head = ""
        chosen.append(head)
        sources.append(Source(s, prefix=head))
    base, base_s = decode(tr, [Source(s) for s in src])
    out, secs = decode(tr, sources)
    starts = sum(o.split()[0] == h for o, h in zip(out, chosen) if h)
    exact = sum(len(o.split()) == len(s.split()) for o, s in zip(out, src))
    same_punct = sum([i for i, c in enumerate(o.split()) if c in punct]
                     == [i for i, c in enumerate(s.split()) if c in punct]
                     for o, s in zip(out, src))
    n, with_head = len(src), sum(1 for h in chosen if h)
    print(f"\nCouplets test, {n} lines, {model_dir} (beam {tr.decoding.beam_size}), a random head character from "
          f"{len(heads)} per line\n")
    print("| | starts with the head | exact length | punctuation in place | decode s | time ratio |\n"
          "|---|---:|---:|---:|---:|---:|")
    print(f"| acrostic | {starts}/{with_head} = {100 * starts / with_head:.1f}% | {100 * exact / n:.1f}% | "
          f"{100 * same_punct / n:.1f}% | {secs:.1f} | {secs / base_s:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--multi30k", help="model dir trained with configs/multi30k_deen.yaml")
    ap.add_argument("--couplets", help="model dir trained with configs/couplets.yaml")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.multi30k:
        multi30k(args.multi30k, args.seed)
    if args.couplets:
        couplets(args.couplets, args.seed)


if __name__ == "__main__":
    main()

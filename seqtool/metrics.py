"""Scores of hypotheses against one or more references: BLEU, chrF, char BLEU, ROUGE, couplet checks.

Definitions (also in docs/metrics.md):
- bleu / chrf: sacrebleu corpus scores (BLEU 13a, cased); several references are used jointly.
- bleu_char: sacrebleu BLEU with tokenize=none on text split into single characters (couplets).
- rouge1 / rouge2 / rougeL: rouge-score F1 with stemming, mean over examples; with several
  references, the best F1 over the references for each example.
- exact_length: share of outputs with as many characters (spaces ignored) as their source.
- punct_agreement: share of outputs whose punctuation characters and positions equal the source's.
- copy_rate: share of outputs identical to their source (a degenerate copy).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Optional, Sequence

import sacrebleu

from seqtool.errors import DataError

METRICS = ("bleu", "chrf", "bleu_char", "rouge", "couplet")


@dataclass
class Score:
    name: str
    value: float
    signature: str = ""


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def _is_punct(c: str) -> bool:
    return unicodedata.category(c).startswith("P")


def couplet_scores(hyps: Sequence[str], srcs: Sequence[str]) -> list[Score]:
    n = max(len(hyps), 1)
    exact = punct = copy = 0
    for h, s in zip(hyps, srcs):
        hc, sc = _chars(h), _chars(s)
        exact += len(hc) == len(sc)
        punct += [(i, c) for i, c in enumerate(hc) if _is_punct(c)] == [(i, c) for i, c in enumerate(sc) if _is_punct(c)]
        copy += hc == sc
    return [Score("exact_length", 100.0 * exact / n), Score("punct_agreement", 100.0 * punct / n),
            Score("copy_rate", 100.0 * copy / n)]


def rouge_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> list[Score]:
    """Mean ROUGE-1/2/L F1 (stemmed); per example the best over the references."""
    from rouge_score import rouge_scorer  # imported here: only summarization needs it

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for i, hyp in enumerate(hyps):
        per_ref = [scorer.score(ref_set[i], hyp) for ref_set in refs]
        for k in kinds:
            totals[k] += max(s[k].fmeasure for s in per_ref)
    sig = f"rouge-score|stem:yes|F1|nrefs:{len(refs)}|best-of-refs"
    return [Score(k, 100.0 * totals[k] / max(len(hyps), 1), sig) for k in kinds]


def score(hyps: Sequence[str], refs: Sequence[Sequence[str]], metrics: Sequence[str] = ("bleu", "chrf"),
          srcs: Optional[Sequence[str]] = None) -> list[Score]:
    """Score `hyps` against one or more reference sets (each line-aligned with hyps)."""
    for name in metrics:
        if name not in METRICS:
            raise DataError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    for ref_set in refs:
        if len(ref_set) != len(hyps):
            raise DataError(f"{len(hyps)} hypotheses but {len(ref_set)} references; they must be line-aligned")
    out: list[Score] = []
    for name in metrics:
        if name in ("bleu", "chrf", "bleu_char"):
            if name == "bleu_char":
                metric = sacrebleu.BLEU(tokenize="none", force=True)
                h, r = [" ".join(_chars(x)) for x in hyps], [[" ".join(_chars(x)) for x in rs] for rs in refs]
            else:
                metric = sacrebleu.BLEU(force=True) if name == "bleu" else sacrebleu.CHRF()
                h, r = list(hyps), [list(rs) for rs in refs]
            out.append(Score(name, metric.corpus_score(h, r).score, str(metric.get_signature())))
        elif name == "rouge":
            out += rouge_scores(hyps, refs)
        elif name == "couplet":
            if srcs is None or len(srcs) != len(hyps):
                raise DataError("couplet metrics need the source lines (--src), line-aligned with the output")
            out += couplet_scores(hyps, srcs)
    return out


def rouge_mean(hyps: list[str], refs: list[str]) -> float:
    """Mean of ROUGE-1/2/L F1: one number to pick a summarization checkpoint by."""
    return sum(s.value for s in rouge_scores(hyps, [refs])) / 3


def bleu(hyps: list[str], refs: list[str]) -> float:
    return score(hyps, [refs], ("bleu",))[0].value

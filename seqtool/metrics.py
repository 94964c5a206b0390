"""Scores of hypotheses against references: BLEU and chrF with sacrebleu."""

from __future__ import annotations

from dataclasses import dataclass

import sacrebleu

from seqtool.errors import DataError


@dataclass
class Score:
    name: str
    value: float
    signature: str


def corpus_scores(hyps: list[str], refs: list[str], metrics: tuple[str, ...] = ("bleu", "chrf")) -> list[Score]:
    """Corpus BLEU (13a, cased) and chrF against one reference per line."""
    if len(hyps) != len(refs):
        raise DataError(f"{len(hyps)} hypotheses but {len(refs)} references; they must be line-aligned")
    out = []
    for name in metrics:
        if name == "bleu":
            metric = sacrebleu.BLEU()
        elif name == "chrf":
            metric = sacrebleu.CHRF()
        else:
            raise DataError(f"unknown metric {name!r}; choose bleu or chrf")
        result = metric.corpus_score(hyps, [refs])
        out.append(Score(name, result.score, str(metric.get_signature())))
    return out


def bleu(hyps: list[str], refs: list[str]) -> float:
    return corpus_scores(hyps, refs, ("bleu",))[0].value

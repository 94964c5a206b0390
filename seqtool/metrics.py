"""Scores of hypotheses against one or more references: BLEU, chrF, char BLEU, ROUGE, couplet checks.

Definitions (also in docs/metrics.md):
- bleu / chrf: sacrebleu corpus scores (BLEU 13a, cased); several references are used jointly.
- bleu_char: sacrebleu BLEU with tokenize=none on text split into single characters (couplets).
- rouge1 / rouge2 / rougeL: rouge-score F1 with stemming, mean over examples; with several
  references, the best F1 over the references for each example. As a checkpoint picker, rouge is
  their mean.
- couplet: BLEU-1/2/4 on characters, chrF, and what a reader checks of a lower line against its upper
  line (positions are characters, spaces ignored; tones from seqtool.hanzi):
  - exact_length: share of outputs with as many characters as their source.
  - punct_agreement: share of outputs whose punctuation characters and positions equal the source's.
  - tone_match: of the sources whose last non-punctuation character has a tone, the share of outputs
    whose last non-punctuation character has the opposite tone (仄 answered by 平, 平 by 仄).
  - tone_opposed: of the positions where both lines have a non-punctuation character with a tone,
    the share whose tones are opposed.
  - repeat_agreement: share of outputs whose repetition pattern equals the source's (a character
    repeats exactly where the source's does: 叠字 AA -> BB, 重字 ABA -> CDC).
  - echo_rate: of the positions where both lines have a non-punctuation character, the share where
    the output has the source's character (合掌; lower is better).
  - distinct_1 / distinct_2: distinct characters / character bigrams over all outputs, as a share of
    all of them (diversity; Li et al. 2016).
  - copy_rate: share of outputs identical to their source (a degenerate copy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from seqtool.errors import DataError
from seqtool.hanzi import NONE, is_punct, opposite, repetition_pattern, tone


@dataclass
class Score:
    name: str
    value: float
    signature: str = ""


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def _content(chars: list[str]) -> list[int]:
    """Positions of the characters that are not punctuation."""
    return [i for i, c in enumerate(chars) if not is_punct(c)]


def _bleu_chars(name: str, hyps: Sequence[str], refs: Sequence[Sequence[str]], order: int = 4) -> Score:
    """BLEU up to `order`-grams on single characters (spaces dropped: 春风 and 春 风 score the same)."""
    import sacrebleu

    metric = sacrebleu.BLEU(tokenize="none", max_ngram_order=order, force=True)
    h, r = [" ".join(_chars(x)) for x in hyps], [[" ".join(_chars(x)) for x in rs] for rs in refs]
    return Score(name, metric.corpus_score(h, r).score, str(metric.get_signature()))


def couplet_scores(hyps: Sequence[str], srcs: Sequence[str]) -> list[Score]:
    """What a reader of couplets checks of each lower line (hyp) against its upper line (src); see the
    module docstring. Tones are pypinyin's modern readings (seqtool.hanzi)."""
    n = max(len(hyps), 1)
    exact = punct = copy = repeat = 0
    tone_lines = tone_met = pos_pairs = pos_opposed = echo_pos = echoed = 0
    grams: tuple[set, set] = (set(), set())
    gram_count = [0, 0]
    for h, s in zip(hyps, srcs):
        hc, sc = _chars(h), _chars(s)
        exact += len(hc) == len(sc)
        punct += [(i, c) for i, c in enumerate(hc) if is_punct(c)] == [(i, c) for i, c in enumerate(sc) if is_punct(c)]
        copy += hc == sc
        repeat += repetition_pattern(hc) == repetition_pattern(sc)
        s_content, h_content = _content(sc), _content(hc)
        if s_content and tone(sc[s_content[-1]]) != NONE:
            tone_lines += 1
            tone_met += bool(h_content) and tone(hc[h_content[-1]]) == opposite(tone(sc[s_content[-1]]))
        for i in s_content:
            if i < len(hc) and not is_punct(hc[i]):
                echo_pos += 1
                echoed += hc[i] == sc[i]
                if tone(sc[i]) != NONE and tone(hc[i]) != NONE:
                    pos_pairs += 1
                    pos_opposed += tone(hc[i]) == opposite(tone(sc[i]))
        for k in (1, 2):
            line = [tuple(hc[i:i + k]) for i in range(len(hc) - k + 1)]
            grams[k - 1].update(line)
            gram_count[k - 1] += len(line)
    def share(part: int, whole: int) -> float:
        return 100.0 * part / whole if whole else 0.0

    return [Score("exact_length", share(exact, n)), Score("punct_agreement", share(punct, n)),
            Score("tone_match", share(tone_met, tone_lines)), Score("tone_opposed", share(pos_opposed, pos_pairs)),
            Score("repeat_agreement", share(repeat, n)), Score("echo_rate", share(echoed, echo_pos)),
            Score("distinct_1", share(len(grams[0]), gram_count[0])),
            Score("distinct_2", share(len(grams[1]), gram_count[1])), Score("copy_rate", share(copy, n))]


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


def _sacrebleu(name: str) -> Callable[..., list[Score]]:
    def compute(hyps: Sequence[str], refs: Sequence[Sequence[str]], srcs: Optional[Sequence[str]]) -> list[Score]:
        import sacrebleu  # imported when scoring: `seqtool translate` starts faster without it

        metric = sacrebleu.BLEU(force=True) if name == "bleu" else sacrebleu.CHRF()
        return [Score(name, metric.corpus_score(list(hyps), [list(rs) for rs in refs]).score,
                      str(metric.get_signature()))]
    return compute


def _couplet(hyps: Sequence[str], refs: Sequence[Sequence[str]], srcs: Optional[Sequence[str]]) -> list[Score]:
    assert srcs is not None  # score() checks needs_source
    return ([_bleu_chars(f"bleu_{order}", hyps, refs, order) for order in (1, 2, 4)]
            + _sacrebleu("chrf")(hyps, refs, srcs) + couplet_scores(hyps, srcs))


@dataclass(frozen=True)
class Metric:
    """One scorer, known by its name to `seqtool evaluate --metrics`, training.valid_metrics and
    training.keep_best_by, and `seqtool plot`. It scores hypotheses against one or more line-aligned
    reference sets (and the sources, when `needs_source`) and yields one or more Scores."""
    compute: Callable[[Sequence[str], Sequence[Sequence[str]], Optional[Sequence[str]]], list[Score]]
    title: str
    # Whether the mean of its scores can pick a checkpoint (training.keep_best_by), higher being better. The
    # couplet checks cannot: they mix directions (echo_rate is better lower) and are not one quality.
    selects: bool = True
    needs_source: bool = False


METRICS: dict[str, Metric] = {
    "bleu": Metric(_sacrebleu("bleu"), "BLEU"),
    "chrf": Metric(_sacrebleu("chrf"), "chrF"),
    "bleu_char": Metric(lambda hyps, refs, srcs: [_bleu_chars("bleu_char", hyps, refs)], "character BLEU"),
    "rouge": Metric(lambda hyps, refs, srcs: rouge_scores(hyps, refs), "ROUGE-1/2/L mean"),
    "couplet": Metric(_couplet, "couplet checks", selects=False, needs_source=True),
}


def unknown_names(names: Sequence[str]) -> Optional[str]:
    """What is wrong with `names` as metric names, every unknown one at once; None when all are known. The one
    wording of `seqtool evaluate --metrics` and training.valid_metrics."""
    unknown = [name for name in names if name not in METRICS]
    if not unknown:
        return None
    return (f"unknown metric{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(METRICS)}")


def check_names(names: Sequence[str]) -> None:
    """DataError naming every unknown metric."""
    problem = unknown_names(names)
    if problem is not None:
        raise DataError(problem)


def score(hyps: Sequence[str], refs: Sequence[Sequence[str]], metrics: Sequence[str] = ("bleu", "chrf"),
          srcs: Optional[Sequence[str]] = None) -> list[Score]:
    """Score `hyps` against one or more reference sets (each line-aligned with hyps); each score once, in the
    order the metrics name them (couplet's chrF is not repeated after chrf)."""
    check_names(metrics)
    for ref_set in refs:
        if len(ref_set) != len(hyps):
            raise DataError(f"{len(hyps)} hypotheses but {len(ref_set)} references; they must be line-aligned")
    out: dict[str, Score] = {}
    for name in metrics:
        metric = METRICS[name]
        if metric.needs_source and (srcs is None or len(srcs) != len(hyps)):
            raise DataError(f"{name} metrics need the source lines (--src), line-aligned with the output")
        for s in metric.compute(hyps, refs, srcs):
            out.setdefault(s.name, s)
    return list(out.values())


def logged(names: Sequence[str], hyps: Sequence[str], refs: Sequence[str], srcs: Sequence[str]) -> dict[str, float]:
    """A validation line's scores, rounded: valid_NAME for each selecting metric (the mean of its scores:
    ROUGE-1/2/L), and valid_SCORE for each score of a metric that gives several (rouge1, tone_match, ...)."""
    out = {}
    for name in dict.fromkeys(names):
        metric = METRICS[name]
        scores = metric.compute(hyps, [refs], srcs)
        if metric.selects:
            out[f"valid_{name}"] = round(sum(s.value for s in scores) / len(scores), 2)
        if len(scores) > 1:
            out.update((f"valid_{s.name}", round(s.value, 2)) for s in scores)
    return out


def bleu(hyps: list[str], refs: list[str]) -> float:
    return score(hyps, [refs], ("bleu",))[0].value

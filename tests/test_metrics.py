"""Metrics against hand-computed values."""

import pytest

from seqtool.errors import DataError
from seqtool.metrics import score


def values(results):
    return {s.name: s.value for s in results}


def test_rouge_hand_computed():
    # hyp has 3 unigrams, all in the 6-unigram reference: P = 1, R = 1/2, F1 = 2/3.
    # bigrams: 2 of 2 hyp bigrams in the 5 reference bigrams: P = 1, R = 2/5, F1 = 4/7. LCS = 3: as ROUGE-1.
    v = values(score(["the cat sat"], [["the cat sat on the mat"]], ["rouge"]))
    assert v["rouge1"] == pytest.approx(200 / 3)
    assert v["rouge2"] == pytest.approx(400 / 7)
    assert v["rougeL"] == pytest.approx(200 / 3)


def test_rouge_stems_and_takes_best_reference_per_example():
    hyps = ["cats sitting", "a dog"]
    one = values(score(hyps, [["cat sits", "the bird"]], ["rouge"]))
    assert one["rouge1"] == pytest.approx(50.0)  # stemmed: cats~cat, sitting~sit -> 100; second 0
    both = values(score(hyps, [["cat sits", "the bird"], ["no match", "a dog"]], ["rouge"]))
    assert both["rouge1"] == pytest.approx(100.0)


def test_couplet_metrics_hand_computed():
    srcs = ["春 风 ， 化 雨", "一 二 三", "山 高 。", "天 地"]
    hyps = ["秋 月 ， 流 光",  # right length, punctuation in place
            "四 五",  # too short
            "水 。 长",  # right length, punctuation moved
            "天 地"]  # a copy
    v = values(score(hyps, [srcs], ["couplet"], srcs=srcs))
    assert v["exact_length"] == pytest.approx(75.0)
    assert v["punct_agreement"] == pytest.approx(75.0)  # 1, 2 (no punctuation on either side), 4
    assert v["copy_rate"] == pytest.approx(25.0)


def test_char_bleu_ignores_spacing():
    v = values(score(["春风化雨"], [["春 风 化 雨"]], ["bleu_char"]))
    assert v["bleu_char"] == pytest.approx(100.0)


def test_multi_reference_bleu_and_errors():
    v = values(score(["a b c d e"], [["x y z w v"], ["a b c d e"]], ["bleu", "chrf"]))
    assert v["bleu"] == pytest.approx(100.0)
    with pytest.raises(DataError, match="line-aligned"):
        score(["a"], [["a", "b"]])
    with pytest.raises(DataError, match="^unknown metric 'meteor'; choose from bleu, chrf, bleu_char, rouge, couplet$"):
        score(["a"], [["a"]], ["meteor"])
    with pytest.raises(DataError, match="^unknown metrics 'meteor', 'ter'; choose from "):
        score(["a"], [["a"]], ["bleu", "meteor", "ter"])
    with pytest.raises(DataError, match="--src"):
        score(["a"], [["a"]], ["couplet"])

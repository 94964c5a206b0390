"""Couplets by the rules of the art: tones, repetition, echo; as metrics and as rules every search obeys."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import LEARNS, SAMPLE, run_cli, tiny_config, write_config
from seqtool.config import DecodingConfig, validate
from seqtool.data import make_batch
from seqtool.errors import ConfigError
from seqtool.hanzi import NONE, PING, ZE, repetition_pattern, tone
from seqtool.metrics import couplet_scores, score
from seqtool.verse import couplet_controls
from test_constraints import search_with
from test_search import PUNCT, V, model_for, models, rules_for


def scores(hyps, srcs, refs=None):
    return {s.name: round(s.value, 2) for s in score(hyps, [refs or hyps], ["couplet"], srcs)}


def test_tones_are_modern_readings():
    assert [tone(c) for c in "天地水火"] == [PING, ZE, ZE, ZE]
    assert tone("一") == PING and tone("白") == PING  # 入声 characters read by their modern tone
    assert [tone(c) for c in "，a的"] == [NONE, NONE, NONE]  # punctuation, Latin letters, the neutral tone


def test_repetition_pattern():
    assert repetition_pattern(list("山外山")) == repetition_pattern(list("楼上楼")) == [0, 1, 0]
    assert repetition_pattern(list("春春，风")) == [0, 0, "，", 3]


def test_couplet_metrics_against_hand_counts():
    # upper 山山，天高 / lower 春秋，海阔: 高 (平) answered by 阔 (仄); positions 山/春 山/秋 天/海 高/阔:
    # 平平 平平 平仄 平仄 -> 2 of 4 opposed; 山山 repeats, 春秋 does not; no echo.
    # upper 一四 / lower 一二: 四 (仄) answered by 二 (仄): no; 一/一 平平, 四/二 仄仄; 一 echoed: 1 of 2.
    s = scores(["春 秋 ， 海 阔", "一 二"], ["山 山 ， 天 高", "一 四"])
    assert s["tone_match"] == 50.0 and s["tone_opposed"] == pytest.approx(100 * 2 / 6, abs=0.01)
    assert s["repeat_agreement"] == 50.0 and s["echo_rate"] == pytest.approx(100 / 6, abs=0.01)
    assert s["exact_length"] == 100.0 and s["punct_agreement"] == 100.0 and s["copy_rate"] == 0.0
    assert s["bleu_1"] == s["bleu_2"] == s["bleu_4"] == s["chrf"] == 100.0  # scored against themselves
    assert s["distinct_1"] == 100.0 and s["distinct_2"] == 100.0


def test_couplet_metrics_edge_cases():
    s = {x.name: x.value for x in couplet_scores(["风 风", "a b", ""], ["雨 雨", "c d", "天"])}
    # 雨雨 -> 风风: same repetition, 雨 (仄) answered by 风 (平); no tone in "c d": not counted; "" answers nothing
    assert s["tone_match"] == 50.0 and s["repeat_agreement"] == 200 / 3 and s["exact_length"] == 200 / 3
    assert s["distinct_1"] == pytest.approx(100 * 3 / 4) and s["distinct_2"] == 100.0
    assert all(x.value == 0.0 for x in couplet_scores([], []))


def test_rules_need_exact_length():
    for rule in ("final_tone", "mirror_repeats", "no_echo"):
        for without in ({}, {"exact_length": True}):
            with pytest.raises(ConfigError, match=f"decoding.{rule} needs decoding.exact_length and copy_punctuation"):
                validate({"tokenizer": {"type": "word"}, "decoding": {rule: True, **without}})


def test_controls_of_a_line():
    d = DecodingConfig(exact_length=True, final_tone=True, mirror_repeats=True, no_echo=True)
    mirror, echo, tones = couplet_controls(list("花花，雨雨"), 5, d)
    assert mirror == (0, 0, -1, 3, 3) and echo == ("花", "花", "", "雨", "雨")
    assert tones == (-1, -1, -1, PING, PING)  # 雨 is 仄: the repeated last character must be 平 at both places
    assert couplet_controls(list("花花，雨雨"), 5, DecodingConfig(exact_length=True, final_tone=True))[2] == \
        (-1, -1, -1, -1, PING)
    assert couplet_controls(None, 4, DecodingConfig(), end_tone=ZE) == (None, None, (-1, -1, -1, ZE))
    assert couplet_controls(list("ab"), 2, d) == ((0, 1), ("a", "b"), None)  # no tone to answer


def test_a_prefix_is_the_users_choice_and_rules_give_way_to_it():
    d = DecodingConfig(exact_length=True, copy_punctuation=True, final_tone=True, mirror_repeats=True, no_echo=True)
    # 山外山 with the head 山: the head may echo, and so may the position that must repeat it
    assert couplet_controls(list("山外山"), 3, d, fixed=1)[1] == ("", "外", "")
    # the last character repeats the first: with the head fixed there, no tone can be asked of it
    assert couplet_controls(list("春风吹落春"), 5, d, fixed=1)[2] is None
    assert couplet_controls(list("春风吹落春"), 5, d)[2] == (ZE, -1, -1, -1, ZE)  # 春 is 平
    # a poem's line end asks its tone: then the end need not repeat the head (影落日月影 -> 纲...?)
    mirror, _, tones = couplet_controls(list("影落日月影"), 5, d, end_tone=PING, fixed=1)
    assert mirror == (0, 1, 2, 3, 4) and tones == (-1, -1, -1, -1, PING)


# Synthetic characters for tokens: a token's character is a real CJK one, so tones are pypinyin's.
CHAR = {t: "，" if t == 5 else "。" if t == 6 else chr(0x4E00 + 3 * t) for t in range(V)}
VOCAB_TONES = [tone(CHAR[t]) if t > 3 else NONE for t in range(V)]


@st.composite
def uppers(draw):
    """Sources with repeats (叠字, 重字) and punctuation, each a list of tokens."""
    srcs = []
    for _ in range(draw(st.integers(1, 4))):
        src = draw(st.lists(st.integers(4, V - 1), min_size=1, max_size=12))
        for _ in range(draw(st.integers(0, 3))):  # copy some token to another position: a repeat
            i, j = draw(st.integers(0, len(src) - 1)), draw(st.integers(0, len(src) - 1))
            src[j] = src[i]
        srcs.append(src)
    return srcs


@settings(max_examples=40, deadline=None)
@given(uppers(), models, st.sampled_from(["greedy", "sample", "beam"]), st.integers(1, 4),
       st.sampled_from([(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)]))
def test_every_rule_holds_for_any_input(srcs, which, kind, k, on):
    d = DecodingConfig(exact_length=True, copy_punctuation=True, final_tone=bool(on[0]), mirror_repeats=bool(on[1]),
                       no_echo=bool(on[2]))
    controls = [couplet_controls([CHAR[t] for t in s], len(s), d) for s in srcs]
    inv = {c: t for t, c in CHAR.items()}
    rules = rules_for(srcs, forced=[[t if t in PUNCT else -1 for t in s] for s in srcs], free_banned=PUNCT,
                      mirror=[c[0] for c in controls] if on[1] else None,
                      echo=[[inv.get(ch, -1) for ch in c[1]] for c in controls] if on[2] else None,
                      tones=[c[2] or () for c in controls] if on[0] else None, vocab_tones=VOCAB_TONES)
    b = make_batch(srcs, [[4]] * len(srcs))
    for src, hyps in zip(srcs, search_with(kind, k)(model_for(*which), b.src, b.src_lens, rules)):
        assert hyps
        upper = " ".join(CHAR[t] for t in src)
        content = [t for t in src if t not in PUNCT]
        for h in hyps:
            assert h.complete and len(h.tokens) == len(src)
            s = {x.name: x.value for x in couplet_scores([" ".join(CHAR[t] for t in h.tokens)], [upper])}
            assert s["punct_agreement"] == 100.0
            if on[0] and content and tone(CHAR[content[-1]]) != NONE:
                assert s["tone_match"] == 100.0, (src, h.tokens)
            if on[1]:
                assert s["repeat_agreement"] == 100.0, (src, h.tokens)
            if on[2]:
                assert s["echo_rate"] == 0.0, (src, h.tokens)


COUPLETS = SAMPLE / "couplets"  # made by sample_data/couplets/make_couplets.py: it breaks every rule on purpose


@pytest.fixture(scope="module")
def couplet_model(tmp_path_factory):
    """A couplet model trained for real on the sample couplets; it learns them (BLEU 100), rule breaks included."""
    work = tmp_path_factory.mktemp("couplets")
    data = {f"{kind}_{side}": str(COUPLETS / f"{'valid' if kind == 'valid' else 'train'}.{side}")
            for kind in ("train", "valid") for side in ("src", "tgt")}
    cfg = tiny_config(work / "model", data=data, tokenizer={"type": "word", "vocab_size": 200},
                      model=LEARNS["model"], training={"max_steps": 300, "valid_every": 150, "keep_best_by": "loss"},
                      decoding={"exact_length": True, "copy_punctuation": True, "shortlist": 0})
    run_cli("train", "-c", str(write_config(work / "c.yaml", cfg)), "-q", check=True)
    return work / "model"


def couplet_eval(model, *flags):
    proc = run_cli("evaluate", "-m", str(model), "--src", str(COUPLETS / "test.src"),
                   "--ref", str(COUPLETS / "test.tgt"), "--metrics", "couplet", "--json", *flags, check=True)
    return json.loads(proc.stdout)["scores"]


RULES = {"final_tone": "tone_match", "mirror_repeats": "repeat_agreement", "no_echo": "echo_rate"}


def test_cli_rules_repair_what_the_model_learned_to_break(couplet_model):
    free = couplet_eval(couplet_model)
    assert free["bleu_4"] == 100.0 and free["exact_length"] == 100.0 and free["punct_agreement"] == 100.0
    assert free["tone_match"] < 80 and free["repeat_agreement"] < 97 and free["echo_rate"] > 5  # as the data does
    every = couplet_eval(couplet_model, *(f for rule in RULES for f in ("--set", f"decoding.{rule}=true")))
    assert every["tone_match"] == 100.0 and every["repeat_agreement"] == 100.0 and every["echo_rate"] == 0.0
    assert every["exact_length"] == 100.0 and every["punct_agreement"] == 100.0
    for rule, metric in RULES.items():  # each rule alone does its own job, and only that
        alone = couplet_eval(couplet_model, "--set", f"decoding.{rule}=true")
        assert alone[metric] == (0.0 if rule == "no_echo" else 100.0), (rule, alone)
        assert alone["bleu_4"] > 60


def test_cli_couplet_input_as_people_type_it(couplet_model):
    upper = (COUPLETS / "test.src").read_text(encoding="utf-8").splitlines()[:3]
    spaced = run_cli("translate", "-m", str(couplet_model), input="\n".join(upper) + "\n", check=True).stdout
    unspaced = run_cli("translate", "-m", str(couplet_model), input="\n".join(u.replace(" ", "") for u in upper) + "\n",
                       check=True).stdout
    assert spaced == unspaced and len(spaced.splitlines()) == 3


@pytest.mark.parametrize("stdin,message", [
    ("hello world\n", "line 1: none of its characters is in the model's vocabulary"),
    ("江 右 秋\n", None),
    ("江 右 , 秋\n", "line 1: the punctuation ',' is not in the model's vocabulary, so it cannot be copied"),
])
def test_cli_non_chinese_input_to_a_couplet_model_is_one_line(couplet_model, stdin, message):
    from test_cli_errors import assert_one_line_error

    proc = run_cli("translate", "-m", str(couplet_model), "-q", "--set", "decoding.final_tone=true", input=stdin)
    if message is None:
        assert proc.returncode == 0 and len(proc.stdout.split()) == 3
    else:
        assert_one_line_error(proc, message)


def test_cli_acrostic_head_with_the_rules_and_a_head_that_breaks_one(couplet_model):
    from test_cli_errors import assert_one_line_error

    rules = [f for rule in RULES for f in ("--set", f"decoding.{rule}=true")]
    upper = (COUPLETS / "test.src").read_text(encoding="utf-8").splitlines()[:40]
    stdin = "".join(json.dumps({"text": u, "prefix": "天"}, ensure_ascii=False) + "\n" for u in upper)
    out = run_cli("translate", "-m", str(couplet_model), "--input-format", "jsonl", *rules, input=stdin,
                  check=True).stdout.splitlines()
    assert all(o.split()[0] == "天" for o in out)
    s = {x.name: x.value for x in couplet_scores(out, upper)}
    assert s["tone_match"] == s["repeat_agreement"] == s["exact_length"] == 100.0
    assert s["echo_rate"] <= 100 * sum(u.split()[0] == "天" for u in upper) / sum(len(u.split()) for u in upper)
    # a prefix is the user's choice: the tone and echo rules give way to it (江 is 平, and so is 天) ...
    proc = run_cli("translate", "-m", str(couplet_model), "--input-format", "jsonl", "-q", *rules,
                   input='{"text": "江", "prefix": "天"}\n{"text": "江", "prefix": "江"}\n', check=True)
    assert proc.stdout.split() == ["天", "江"]
    # ... but a prefix repeating a character where the upper line does not cannot be mirrored
    proc = run_cli("translate", "-m", str(couplet_model), "--input-format", "jsonl", "-q", *rules,
                   input='{"text": "江 右 秋", "prefix": "天 天"}\n')
    assert_one_line_error(proc, "line 1: the prefix's token 2 breaks decoding.mirror_repeats")


@pytest.fixture(scope="module")
def first_line_model(tmp_path_factory):
    """A one-to-many model, a head character -> a line, trained on the sample couplets' lines (as
    configs/poem_first.yaml is on the poetry lines)."""
    work = tmp_path_factory.mktemp("first")
    data = {}
    for split in ("train", "valid"):
        lines = [line for side in ("src", "tgt")
                 for line in (COUPLETS / f"{split}.{side}").read_text("utf-8").splitlines()]
        (work / f"{split}.tgt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (work / f"{split}.src").write_text("\n".join(line.split()[0] for line in lines) + "\n", encoding="utf-8")
        data.update({f"{split}_src": str(work / f"{split}.src"), f"{split}_tgt": str(work / f"{split}.tgt")})
    cfg = tiny_config(work / "model", data=data, tokenizer={"type": "word", "vocab_size": 200},
                      training={"max_steps": 100, "valid_every": 100, "keep_best_by": "loss"},
                      decoding={"shortlist": 0})
    run_cli("train", "-c", str(write_config(work / "c.yaml", cfg)), "-q", check=True)
    return work / "model"


def test_cli_acrostic_poem_heads_lengths_and_tones(first_line_model, couplet_model):
    heads = ["天江秋南", "江右", "", "古"]  # a blank line: an empty poem in its place
    proc = run_cli("poem", "--first", str(first_line_model), "--next", str(couplet_model), "--chars", "5",
                   "--format", "json", "--set", "decoding.mirror_repeats=true", input="\n".join(heads) + "\n",
                   check=True)
    poems = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [p["heads"] for p in poems] == heads and poems[2]["lines"] == []
    for p in poems:
        assert [line[0] for line in p["lines"]] == list(p["heads"])
        assert all(len(line) == 5 for line in p["lines"])
        assert [tone(line[-1]) for line in p["lines"]] == [ZE, PING, ZE, PING][: len(p["heads"])]
        for upper, lower in zip(p["lines"], p["lines"][1:]):  # each later line answers the one before
            if upper[-1] != upper[0]:  # else the end need not repeat the head: its tone comes first
                assert repetition_pattern(list(upper)) == repetition_pattern(list(lower))
    text = run_cli("poem", "--first", str(first_line_model), "--next", str(couplet_model), "--heads", "天江秋南",
                   "--chars", "7", check=True).stdout.splitlines()
    assert [line[0] for line in text] == list("天江秋南") and all(len(line) == 7 for line in text)


@pytest.mark.parametrize("args,message", [
    (["--heads", ""], "line 1: no head characters"),
    (["--heads", "天x"], "line 1: the head 'x' is not a Chinese character"),
    (["--heads", "天龘"], "line 1: the head '龘' is not in the first-line model's input vocabulary"),
    (["--heads", "天，"], "the head '，' is not a Chinese character"),
    (["--heads", "天江", "--chars", "1"], "--chars 1: a line has 2 to 32 characters"),
])
def test_cli_poem_bad_heads_are_one_line(first_line_model, couplet_model, args, message):
    from test_cli_errors import assert_one_line_error

    proc = run_cli("poem", "--first", str(first_line_model), "--next", str(couplet_model), "-q", *args)
    assert_one_line_error(proc, message)


def test_cli_poem_next_model_must_keep_the_length(first_line_model):
    from test_cli_errors import assert_one_line_error

    proc = run_cli("poem", "--first", str(first_line_model), "--next", str(first_line_model), "--heads", "天江", "-q")
    assert_one_line_error(proc, "a next-line model that answers with a line of the same length")


def test_serve_writes_poems(first_line_model, couplet_model):
    from seqtool.cli import _translator
    from seqtool.poem import Poet
    from seqtool.serve import make_app
    from test_serve import in_process

    def translator(path):
        return _translator(path, [], {}, quiet=True)

    served = translator(couplet_model)

    async def scenario(client):
        return [await client.post("/poem", json=body) for body in
                ({"heads": "天江秋南", "chars": 5}, {"heads": "天江", "chars": 6, "tones": False}, {"heads": "x"},
                 {"heads": "天", "chars": "five"})]

    good, untoned, bad, malformed = in_process(make_app(served, {}, poet=Poet(translator(first_line_model), served)),
                                               scenario)
    assert good.status_code == 200 and good.json()["heads"] == "天江秋南"
    lines = good.json()["lines"]
    assert [line[0] for line in lines] == list("天江秋南") and {len(line) for line in lines} == {5}
    assert [tone(line[-1]) for line in lines] == [ZE, PING, ZE, PING]
    assert untoned.status_code == 200 and {len(line) for line in untoned.json()["lines"]} == {6}
    assert bad.status_code == 400 and bad.json() == {"error": "line 1: the head 'x' is not a Chinese character"}
    assert malformed.status_code == 400 and malformed.json()["error"].startswith("chars:")

    async def no_poet(client):
        return await client.post("/poem", json={"heads": "天"})
    reply = in_process(make_app(served, {}), no_poet)
    assert Poet(translator(first_line_model), served, tones=False).next_line.decoding.final_tone is False
    assert reply.status_code == 404 and "--poem-first" in reply.json()["error"]


def test_the_serve_page_writes_an_acrostic_poem_in_a_real_browser(first_line_model, couplet_model):
    import subprocess
    import sys

    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import ROOT
    from test_serve import _browser, _free_port

    page = _browser()  # skips first where there is no browser
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "seqtool", "serve", "-m", str(couplet_model), "--poem-first",
                             str(first_line_model), "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        WebDriverWait(httpx, 120, ignored_exceptions=(httpx.TransportError,)).until(
            lambda h: h.get(url + "/health").json()["poems"])
        page.get(url + "/")
        wait = WebDriverWait(page, 60)
        heads = wait.until(ready.visibility_of_element_located((By.ID, "heads")))  # shown: the server writes poems
        heads.send_keys("天江秋南")
        page.find_element(By.ID, "write").click()
        wait.until(lambda p: len(p.find_elements(By.CSS_SELECTOR, "#out .poem .text")) == 4)
        lines = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#out .poem .text")]
        assert [line[0] for line in lines] == list("天江秋南") and {len(line) for line in lines} == {5}
        heads.clear()
        heads.send_keys("x")
        page.find_element(By.ID, "write").click()
        error = wait.until(ready.visibility_of_element_located((By.ID, "error")))
        assert error.text == "line 1: the head 'x' is not a Chinese character"
    finally:
        page.quit()
        proc.terminate()
        proc.wait(timeout=30)

"""End to end through the real CLI: train a tiny model, check it learned, translate and evaluate."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

from conftest import ROOT, SAMPLE, read_metrics, readline_within, run_cli, tiny_config, write_config


def test_training_learned_the_sample_task(trained_model):
    assert (trained_model / "model.safetensors").is_file()
    assert (trained_model / "config.yaml").is_file()
    metrics = read_metrics(trained_model)
    assert [m["step"] for m in metrics] == [200, 400]
    assert metrics[-1]["valid_loss"] < metrics[0]["valid_loss"]
    assert metrics[-1]["valid_bleu"] >= 95  # it reaches 100; an untrained model scores about 0


def test_evaluate_beam_on_test_set(trained_model):
    proc = run_cli("evaluate", "-m", str(trained_model), "--src", str(SAMPLE / "test.src"),
                   "--ref", str(SAMPLE / "test.tgt"), "--beam", "5", check=True)
    bleu = float(re.search(r"bleu = ([\d.]+)", proc.stdout).group(1))
    assert bleu >= 95, proc.stdout
    assert "chrf = " in proc.stdout and "tok:13a" in proc.stdout and "test.tgt" in proc.stdout


def test_evaluate_scores_a_mid_range_output_as_sacrebleu_does(tmp_path):
    """A real output of middling quality (every 3rd line's words reversed, every 5th cut short), scored by
    seqtool evaluate, gives sacrebleu's own corpus BLEU and chrF to the printed precision."""
    import sacrebleu

    refs = (SAMPLE / "test.tgt").read_text().splitlines()
    hyps = [" ".join(r.split()[::-1]) if i % 3 == 0 else " ".join(r.split()[:3]) if i % 5 == 0 else r
            for i, r in enumerate(refs)]
    (tmp_path / "hyp").write_text("\n".join(hyps) + "\n")
    proc = run_cli("evaluate", "--hyp", str(tmp_path / "hyp"), "--ref", str(SAMPLE / "test.tgt"), "--json", check=True)
    scores = __import__("json").loads(proc.stdout)["scores"]
    bleu, chrf = sacrebleu.corpus_bleu(hyps, [refs]).score, sacrebleu.corpus_chrf(hyps, [refs]).score
    assert 20 < bleu < 80  # mid-range: neither a perfect nor an empty output
    assert scores["bleu"] == round(bleu, 2) and scores["chrf"] == round(chrf, 2), (scores, bleu, chrf)


def test_evaluate_existing_output_with_several_references_as_json(trained_model, tmp_path):
    import json

    refs = (SAMPLE / "test.tgt").read_text().splitlines()[:50]
    (tmp_path / "ref1").write_text("\n".join(refs) + "\n")
    (tmp_path / "ref2").write_text("\n".join(r.upper() for r in refs) + "\n")
    (tmp_path / "hyp").write_text("\n".join(refs) + "\n")
    proc = run_cli("evaluate", "--hyp", str(tmp_path / "hyp"), "--ref", str(tmp_path / "ref2"), "--ref",
                   str(tmp_path / "ref1"), "--metrics", "bleu,rouge", "--json", check=True)
    result = json.loads(proc.stdout)
    assert result["scores"]["bleu"] == 100.0 and result["scores"]["rouge1"] == 100.0
    assert result["references"] == [str(tmp_path / "ref2"), str(tmp_path / "ref1")]
    assert "nrefs:2" in result["signatures"]["bleu"]


def test_translate_file_keeps_lines_and_order(trained_model, tmp_path):
    src = tmp_path / "in.txt"
    lines = (SAMPLE / "test.src").read_text().splitlines()[:20]
    lines[3] = ""
    lines[7] = "   "
    src.write_text("\n".join(lines) + "\n")
    out = run_cli("translate", "-m", str(trained_model), str(src), check=True).stdout.split("\n")
    assert len(out) == len(lines) + 1 and out[-1] == ""
    assert out[3] == "" and out[7] == ""
    assert all(out[i] for i in range(20) if i not in (3, 7))
    # the same lines one at a time give the same translations (batching does not change results)
    for i in (0, 5, 19):
        alone = run_cli("translate", "-m", str(trained_model), "-b", "5", input=lines[i] + "\n", check=True).stdout
        assert alone == out[i] + "\n"


def test_translate_output_file_and_json(trained_model, tmp_path):
    out = tmp_path / "out.txt"
    run_cli("translate", "-m", str(trained_model / "model.safetensors"), "-o", str(out), "--beam", "3",
            input="zuza\n\n", check=True)
    assert len(out.read_text().split("\n")) == 3
    proc = run_cli("translate", "-m", str(trained_model), "--format", "json", "--nbest", "3", input="a b\n\n",
                   check=True)
    import json
    first, second = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(first["nbest"]) == 3 and first["text"] == first["nbest"][0]["text"]
    assert first["nbest"][0]["score"] >= first["nbest"][1]["score"]
    assert second == {"text": "", "nbest": [], "src_pieces": [], "pieces": []}
    assert first["src_pieces"] == ["▁a", "▁b"] or "".join(first["src_pieces"]).replace("▁", " ").strip() == "a b"
    assert "".join(first["pieces"]).replace("▁", " ").strip() == first["text"]


def test_interactive_pipe_answers_each_line_before_the_next(trained_model):
    proc = subprocess.Popen([sys.executable, "-m", "seqtool", "translate", "-m", str(trained_model)], bufsize=0,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        for line in (SAMPLE / "test.src").read_text().splitlines()[:3]:
            proc.stdin.write(line.encode() + b"\n")
            answer = readline_within(proc.stdout, 60)  # that line's translation, flushed before the next line is sent
            assert answer.strip()
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def _read_until(fd: int, marker: bytes, timeout: float = 60) -> bytes:
    """What a pty shows up to and including `marker` (fail after `timeout` s: never hang)."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no {marker!r} within {timeout} s; the terminal shows {seen!r}"
        seen += os.read(fd, 4096)
    return seen


def test_interactive_prompt_on_a_terminal_with_history_and_nbest(trained_model):
    line = (SAMPLE / "test.src").read_text().splitlines()[0]
    want = run_cli("translate", "-m", str(trained_model), "--beam", "3", "--nbest", "2", "--format", "json",
                   input=line + "\n", check=True).stdout
    hyps = json.loads(want)["nbest"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: seqtool on a terminal, as a user runs it
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "seqtool", "translate", "-m", str(trained_model), "-i",
                                  "--beam", "3", "--nbest", "2", "-q"])
    try:
        _read_until(fd, b"> ")
        os.write(fd, line.encode() + b"\r")
        shown = _read_until(fd, b"> ").decode()
        assert hyps[0]["text"] in shown and f"  2. {hyps[1]['text']}" in shown, shown
        os.write(fd, b"\x1b[A\r")  # arrow up: the line before, again
        assert hyps[0]["text"] in _read_until(fd, b"> ").decode()
        os.write(fd, b"\x04")  # Ctrl-D ends
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        os.close(fd)


def test_translating_a_file_shows_progress_on_a_terminal(trained_model, tmp_path):
    lines = (SAMPLE / "test.src").read_text().splitlines()[:150]
    src = tmp_path / "in.src"
    src.write_text("\n".join(lines) + "\n")
    pid, fd = pty.fork()
    if pid == 0:  # stderr on a terminal, the translations to a file
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "seqtool", "translate", "-m", str(trained_model), str(src),
                                  "-o", str(tmp_path / "out"), "--batch-size", "8"])
    shown = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, shown
            try:
                data = os.read(fd, 4096)
            except OSError:  # the child closed the terminal: it has ended
                break
            if not data:
                break
            shown += data
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, shown
    text = shown.decode(errors="replace")
    assert "/150 lines" in text and "lines/s" in text and "ETA" in text, text
    assert len((tmp_path / "out").read_text().splitlines()) == 150


def test_plain_progress_lines_with_verbose_off_a_terminal(capsys):
    from seqtool.progress import LineProgress

    progress = LineProgress(3, plain=True, every=0)
    for lineno in (1, 2, 3):
        progress(lineno)
    progress.close()
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 3 and said[1].startswith("translated 2 of 3 lines (") and "lines/s, ETA" in said[1]


def test_interactive_needs_a_terminal(trained_model):
    proc = run_cli("translate", "-m", str(trained_model), "-i", input="a\n")
    assert proc.returncode == 2 and "-i reads lines typed at a terminal" in proc.stderr


def test_tokenizer_commands_round_trip(trained_model, tmp_path):
    text = "zuza zobo reza paledi.\n"
    pieces = run_cli("tokenizer", "encode", "-m", str(trained_model), input=text, check=True).stdout
    assert "▁" in pieces
    back = run_cli("tokenizer", "decode", "-m", str(trained_model), input=pieces, check=True).stdout
    assert back == text
    spm = tmp_path / "t.spm"
    run_cli("tokenizer", "train", str(SAMPLE / "valid.src"), "-o", str(spm), "--vocab-size", "400", check=True)
    assert run_cli("tokenizer", "encode", "-m", str(spm), input=text, check=True).stdout.strip()


def test_info_model_card(trained_model):
    import json

    text = run_cli("info", str(trained_model), check=True).stdout
    assert "parameters:" in text and "context attention" in text
    card = json.loads(run_cli("info", str(trained_model), "--json", check=True).stdout)
    assert card["step"] in (200, 400) and card["format_version"] == 1 and card["vocab"]["joint"] is True
    assert card["vocab"]["shortlist_table"] is True
    assert card["best"]["bleu"] >= 95 and card["config"]["model"]["hidden_size"] == 128


def test_train_without_a_config(tmp_path):
    src, tgt = tmp_path / "a.src", tmp_path / "a.tgt"
    src.write_text("".join(line + "\n" for line in (SAMPLE / "train.src").read_text().splitlines()[:300]))
    tgt.write_text("".join(line + "\n" for line in (SAMPLE / "train.tgt").read_text().splitlines()[:300]))
    run_cli("train", "--src", str(src), "--tgt", str(tgt), "-o", str(tmp_path / "run"), "-q",
            "--set", "training.max_steps=3", "--set", "model.hidden_size=16", "--set", "tokenizer.vocab_size=400",
            check=True)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert str(src) in written and "hidden_size: 16" in written
    assert run_cli("translate", "-m", str(tmp_path / "run"), "-b", "1", input="zuza\n",
                   check=True).stdout.count("\n") == 1


def test_verbose_and_quiet(tmp_path, trained_model):
    src, tgt = tmp_path / "a.src", tmp_path / "a.tgt"
    src.write_text("".join(line + "\n" for line in (SAMPLE / "train.src").read_text().splitlines()[:200]))
    tgt.write_text("".join(line + "\n" for line in (SAMPLE / "train.tgt").read_text().splitlines()[:200]))
    proc = run_cli("train", "--src", str(src), "--tgt", str(tgt), "-o", str(tmp_path / "run"), "-v",
                   "--set", "training.max_steps=20", "--set", "model.hidden_size=16",
                   "--set", "tokenizer.vocab_size=400", check=True)
    assert "config:\n" in proc.stderr and "  hidden_size: 16" in proc.stderr
    assert re.search(r"^step 10 ", proc.stderr, re.M) and re.search(r"^step 20 ", proc.stderr, re.M)
    proc = run_cli("translate", "-m", str(trained_model), "-v", input="zuza\n", check=True)
    assert "decoding: beam_size=5" in proc.stderr and proc.stdout.count("\n") == 1
    proc = run_cli("translate", "-m", str(trained_model), "-q", input="zuza\n", check=True)
    assert proc.stderr == ""


def test_decoding_flags_reach_the_decoder_and_win_over_set(trained_model):
    """Each flag that is a decoding key is applied as that key, after --set strings, and validated as it."""
    proc = run_cli("translate", "-m", str(trained_model), "-v", "--beam", "2", "--batch-size", "3",
                   "--length-penalty", "0.5", "--shortlist", "0", "--no-quantize", "--set", "decoding.beam_size=7",
                   "--set", "decoding.min_len=2", input="zuza\n", check=True)
    assert re.search(r"decoding: beam_size=2 length_penalty=0.5 .*min_len=2 .*batch_size=3 ", proc.stderr)
    assert "quantize=False" in proc.stderr and "shortlist=0 " in proc.stderr
    scoring = ["--src", str(SAMPLE / "test.src"), "--ref", str(SAMPLE / "test.tgt")]
    for command, extra in (("translate", []), ("evaluate", scoring)):
        proc = run_cli(command, "-m", str(trained_model), *extra, "--beam", "0", input="zuza\n")
        assert proc.returncode == 2 and "decoding.beam_size" in proc.stderr, proc.stderr


def test_sampling_from_the_cli_is_seeded(trained_model):
    lines = "".join(line + "\n" for line in (SAMPLE / "test.src").read_text().splitlines()[:10])
    args = ("translate", "-m", str(trained_model), "--sample", "--temperature", "1.5", "--top-p", "0.95")
    a = run_cli(*args, "--seed", "1", input=lines, check=True).stdout
    b = run_cli(*args, "--seed", "1", input=lines, check=True).stdout
    assert a == b and a.count("\n") == 10
    other_seed = run_cli(*args, "--seed", "2", input=lines, check=True).stdout
    greedy = run_cli("translate", "-m", str(trained_model), "--beam", "1", input=lines, check=True).stdout
    # It really samples: another seed draws other lines, and the draws are not the most probable ones.
    assert other_seed != a and a != greedy and other_seed != greedy and other_seed.count("\n") == 10


def test_couplet_constraints_end_to_end(tmp_path):
    """A `word` tokenizer model decodes with exact length and punctuation in place, from the CLI."""
    import random

    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(60)]
    punct = "，、；"
    src, tgt = [], []
    for _ in range(400):
        n = rng.randint(3, 9)
        line = [rng.choice(chars) for _ in range(n)]
        if n > 4 and rng.random() < 0.6:
            line[rng.randint(1, n - 2)] = rng.choice(punct)
        src.append(" ".join(line))
        tgt.append(" ".join(c if c in punct else chars[(chars.index(c) + 7) % 60] for c in line))
    (tmp_path / "s").write_text("\n".join(src) + "\n")
    (tmp_path / "t").write_text("\n".join(tgt) + "\n")
    cfg = tiny_config(tmp_path / "m", data={"train_src": str(tmp_path / "s"), "train_tgt": str(tmp_path / "t"),
                                            "valid_src": None, "valid_tgt": None},
                      tokenizer={"type": "word", "vocab_size": 100},
                      training={"max_steps": 5, "valid_every": 5},
                      decoding={"exact_length": True, "copy_punctuation": True, "length_penalty": 0.0})
    run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), "-q", check=True)
    inputs = ["一 丁 ， 七 万", "丈 三 上 下 不 与 丐", "丑 、 专", "一"]
    for beam in ("1", "4"):
        out = run_cli("translate", "-m", str(tmp_path / "m"), "-b", beam, input="\n".join(inputs) + "\n", check=True)
        for line, hyp in zip(inputs, out.stdout.splitlines()):
            s, h = line.split(), hyp.split()
            assert len(h) == len(s), (line, hyp)
            assert [(i, c) for i, c in enumerate(h) if c in punct] == [(i, c) for i, c in enumerate(s) if c in punct]
            assert "⁇" not in hyp and "<unk>" not in hyp


def test_copy_source_learns_to_copy_from_the_cli(tmp_path):
    """Target = source: with model.copy_source the tiny model copies perfectly after 250 steps
    (the same model without copy scores about 11 BLEU there)."""
    cfg = tiny_config(tmp_path / "model", training={"max_steps": 250, "valid_every": 250})
    cfg["data"].update(train_tgt=str(SAMPLE / "train.src"), valid_tgt=str(SAMPLE / "valid.src"))
    config = write_config(tmp_path / "copy.yaml", cfg)
    run_cli("train", "-c", str(config), "-q", "--set", "model.copy_source=true", check=True)
    proc = run_cli("evaluate", "-m", str(tmp_path / "model"), "--src", str(SAMPLE / "test.src"),
                   "--ref", str(SAMPLE / "test.src"), check=True)
    assert float(re.search(r"bleu = ([\d.]+)", proc.stdout).group(1)) > 90, proc.stdout


def test_long_dependency_task_is_what_its_generator_writes(tmp_path):
    """sample_data/long: regenerated byte for byte; each target is its source reversed, 1 to 100 symbols."""
    subprocess.run([sys.executable, str(SAMPLE / "long" / "make_long_data.py"), str(tmp_path)], check=True)
    for split in ("train", "valid", "test"):
        for side in ("src", "tgt"):
            name = f"{split}.{side}"
            assert (tmp_path / name).read_bytes() == (SAMPLE / "long" / name).read_bytes(), name
    src = (SAMPLE / "long" / "train.src").read_text().splitlines()
    tgt = (SAMPLE / "long" / "train.tgt").read_text().splitlines()
    assert all(t.split() == s.split()[::-1] for s, t in zip(src, tgt)) and len(src) == len(tgt)
    assert {len(s.split()) for s in src} == set(range(1, 101))


def test_long_reverse_config_trains_an_unclipped_elman_rnn_with_a_pooled_context(tmp_path):
    """configs/long_reverse.yaml as the docs run it, shortened: the gradient norms are logged with clipping
    off, and the model card names the context vector chosen on the command line."""
    model_dir = tmp_path / "long"
    sets = [f"training.model_dir={model_dir}", "model.cell=rnn", "training.clip_grad_norm=0",
            "model.context_vector=mean", "training.max_steps=40", "training.valid_every=20",
            "training.valid_max_sentences=20"]
    config = ROOT / "configs" / "long_reverse.yaml"
    run_cli("train", "-c", str(config), "-q", *(a for kv in sets for a in ("--set", kv)), check=True, cwd=ROOT)
    records = read_metrics(model_dir)
    assert [r["step"] for r in records] == [20, 40]
    assert all(r["train_grad_norm"] > 0 and r["train_clipped"] == 0 for r in records)
    card = json.loads(run_cli("info", str(model_dir), "--json", check=True).stdout)
    assert "context every_step, c = mean" in card["architecture"] and card["config"]["model"]["cell"] == "rnn"


def test_the_prompt_names_a_bad_line_by_its_place_and_goes_on(monkeypatch):
    """The third line typed (an empty one counted) is the one the error names; the lines after it are answered."""
    import builtins
    import io

    from seqtool.errors import DataError
    from seqtool.prompt import run_prompt
    from seqtool.translate import Translation

    class Echo:
        def translate(self, lines, first_lineno=1):
            if lines == ["bad"]:
                raise DataError(f"line {first_lineno}: a constraint cannot be met")
            return [Translation(lines[0].upper())]

    typed = iter(["a", "", "bad", "b"])

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    errors, out = [], io.StringIO()
    assert run_prompt(Echo(), "text", errors.append, out) == 2
    assert out.getvalue() == "A\nB\n" and errors == ["error: line 3: a constraint cannot be met"]

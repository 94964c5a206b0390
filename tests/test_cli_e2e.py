"""End to end through the real CLI: train a tiny model, check it learned, translate and evaluate."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from conftest import ROOT, SAMPLE, read_metrics, run_cli


def test_training_learned_the_sample_task(trained_model):
    assert (trained_model / "model.safetensors").is_file()
    assert (trained_model / "config.yaml").is_file()
    metrics = read_metrics(trained_model)
    assert [m["step"] for m in metrics] == [350, 700]
    assert metrics[-1]["valid_loss"] < metrics[0]["valid_loss"]
    assert max(m["valid_bleu"] for m in metrics) > 40  # an untrained model scores about 0


def test_evaluate_beam_on_test_set(trained_model):
    proc = run_cli("evaluate", "-m", str(trained_model), "--src", str(SAMPLE / "test.src"),
                   "--ref", str(SAMPLE / "test.tgt"), "--beam", "5", check=True)
    bleu = float(re.search(r"BLEU = ([\d.]+)", proc.stdout).group(1))
    assert bleu > 40, proc.stdout
    assert "CHRF" in proc.stdout and "tok:13a" in proc.stdout


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
    proc = run_cli("translate", "-m", str(trained_model), "--format", "json", "--nbest", "3", input="a b\n\n", check=True)
    import json
    first, second = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(first["nbest"]) == 3 and first["text"] == first["nbest"][0]["text"]
    assert first["nbest"][0]["score"] >= first["nbest"][1]["score"]
    assert second == {"text": "", "nbest": []}


def test_interactive_pipe_answers_each_line_before_the_next(trained_model):
    proc = subprocess.Popen([sys.executable, "-m", "seqtool", "translate", "-m", str(trained_model)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in (SAMPLE / "test.src").read_text().splitlines()[:3]:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline()  # blocks until that line's translation is flushed
            assert answer.endswith("\n") and answer.strip()
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_tokenizer_commands_round_trip(trained_model, tmp_path):
    text = "zuza zobo reza paledi.\n"
    pieces = run_cli("tokenizer", "encode", "-m", str(trained_model), input=text, check=True).stdout
    assert "▁" in pieces
    back = run_cli("tokenizer", "decode", "-m", str(trained_model), input=pieces, check=True).stdout
    assert back == text
    spm = tmp_path / "t.spm"
    run_cli("tokenizer", "train", str(SAMPLE / "valid.src"), "-o", str(spm), "--vocab-size", "400", check=True)
    assert run_cli("tokenizer", "encode", "-m", str(spm), input=text, check=True).stdout.strip()

"""Bad input through the real CLI: one clear line on stderr, a non-zero exit, never a traceback."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli, tiny_config, write_config


def assert_one_line_error(proc, match, code=None):
    assert proc.returncode != 0, proc
    if code is not None:
        assert proc.returncode == code
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert match in lines[0], lines[0]


def test_train_unknown_key_suggests_name(tmp_path):
    cfg = tiny_config(tmp_path / "m")
    cfg["model"]["hiden_size"] = 3
    proc = run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)))
    assert_one_line_error(proc, "unknown key model.hiden_size; did you mean hidden_size?", code=2)
    assert not (tmp_path / "m").exists()


def test_train_bad_values_and_missing_paths_reported_together(tmp_path):
    cfg = tiny_config(tmp_path / "m", data={"train_src": str(tmp_path / "nope.src")})
    proc = run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)))
    assert_one_line_error(proc, "data.train_src: file not found", code=2)
    proc = run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), "--src", str(tmp_path))
    assert_one_line_error(proc, f"data.train_src: {tmp_path} is a directory, not a file", code=2)
    assert not (tmp_path / "m").exists()
    proc = run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), "--set", "model.dropout=1.5",
                   "--set", "decoding.beam_size=0")
    assert_one_line_error(proc, "model.dropout")
    assert "decoding.beam_size" in proc.stderr


def test_train_misaligned_files(tmp_path):
    (tmp_path / "a").write_text("x y\n" * 5)
    (tmp_path / "b").write_text("x y\n" * 4)
    cfg = tiny_config(tmp_path / "m", data={"train_src": str(tmp_path / "a"), "train_tgt": str(tmp_path / "b"),
                                            "valid_src": None, "valid_tgt": None})
    proc = run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)))
    assert_one_line_error(proc, "has 5 lines but")
    assert not (tmp_path / "m").exists()  # a run that fails before writing anything leaves no empty dir
    cfg["data"]["train_tgt"] = str(tmp_path / "a")
    proc = run_cli("train", "-q", "-c", str(write_config(tmp_path / "c.yaml", cfg)), "--set", "tokenizer.vocab_size=10")
    assert_one_line_error(proc, "tokenizer.vocab_size 10 is too small")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args,match", [
    (["train"], "give a config"),
    (["train", "-c", "missing.yaml"], "config file not found"),
    (["train", "-c", "configs/sample.yaml", "--set", "model.hidden_size"], "--set expects section.key=value"),
])
def test_train_usage_errors(args, match):
    assert_one_line_error(run_cli(*args), match)


def test_translate_model_file_errors(tmp_path):
    (tmp_path / "rand.safetensors").write_bytes(os.urandom(2048))
    for model, match in ((tmp_path / "none", "not found"), (tmp_path / "rand.safetensors", "not a seqtool model"),
                         (tmp_path, "directory without")):
        assert_one_line_error(run_cli("translate", "-m", str(model), input="a\n"), match)


def test_translate_input_errors(trained_model, tmp_path):
    assert_one_line_error(run_cli("translate", "-m", str(trained_model), str(tmp_path / "none.txt")), "file not found")
    assert_one_line_error(run_cli("translate", "-m", str(trained_model), "-b", "0", input="a\n"), "decoding.beam_size")
    assert_one_line_error(run_cli("translate", "-m", str(trained_model), "--format", "xml", input="a\n"), "--format")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"zuza zobo.\r\n\xef\xbb\xbfok\n\xff\xfe broken\n")
    proc = run_cli("translate", "-m", str(trained_model), str(bad))
    assert_one_line_error(proc, "bad.txt:3: invalid UTF-8")
    assert len(proc.stdout.splitlines()) == 2  # the lines before the bad one were translated and kept


def test_jsonl_lines_that_are_not_text_are_one_line_and_the_lines_before_are_kept(trained_model):
    """A lone surrogate (valid JSON, no character) in any field, JSON nested past the parser's recursion, a
    --prefix of bytes that are not UTF-8: one line naming the line, exit 1, the lines before it written."""
    good = '{"text": "zuza."}\n{"text": "zobo."}\n'
    for third, match in (('{"text": "\\ud800"}', "line 3: it holds '\\ud800', half of a UTF-16 pair"),
                         ('{"text": "zuza.", "constraints": ["\\udfff"]}', "line 3: a constraint holds '\\udfff'"),
                         ("[" * 100_000, "line 3: not valid JSON here (nested too deeply)")):
        proc = run_cli("translate", "-m", str(trained_model), "-b", "1", "--input-format", "jsonl",
                       input=good + third + "\n")
        assert_one_line_error(proc, match, code=1)
        assert len(proc.stdout.splitlines()) == 2
    proc = run_cli("translate", "-m", str(trained_model), "-b", "1", "--prefix", "\udcff", input="zuza.\n")
    assert_one_line_error(proc, "line 1: the prefix holds '\\udcff'", code=1)


def test_translate_output_file_not_half_written_and_finished_lines_kept(trained_model, tmp_path):
    """A failure on line N: nothing under the output's name, the N-1 lines done in OUTPUT.partial."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"zuza.\nzobo zuza.\n\xff\n")
    out = tmp_path / "out.txt"
    proc = run_cli("translate", "-m", str(trained_model), str(bad), "-o", str(out), "-b", "1")
    assert_one_line_error(proc, "bad.txt:3: invalid UTF-8 at byte 1 "
                                f"(the 2 lines translated before it are in {out}.partial)")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad.txt", "out.txt.partial"]
    alone = run_cli("translate", "-m", str(trained_model), "-b", "1", input="zuza.\nzobo zuza.\n", check=True)
    assert (tmp_path / "out.txt.partial").read_text() == alone.stdout
    ok = run_cli("translate", "-m", str(trained_model), "-b", "1", "-o", str(out), input="zuza.\n", check=True)
    assert ok.returncode == 0 and out.read_text() == alone.stdout.splitlines(keepends=True)[0]
    assert not (tmp_path / "out.txt.partial").exists()  # an earlier run's partial output is not left to mislead
    first_bad = tmp_path / "first.txt"
    first_bad.write_bytes(b"\xff\n")
    proc = run_cli("translate", "-m", str(trained_model), str(first_bad), "-o", str(tmp_path / "none.txt"))
    assert_one_line_error(proc, "first.txt:1: invalid UTF-8")  # nothing translated: no partial file either
    assert "partial" not in proc.stderr and not list(tmp_path.glob("none.txt*"))


def test_write_errors_on_stdout_are_one_line(trained_model):
    """A full disk behind stdout (/dev/full): one line, exit 1, no traceback, nothing at exit either."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "seqtool", "translate", "-m", str(trained_model), "-b", "1"],
                              input="zuza.\n" * 50, stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              timeout=300)
    assert proc.returncode == 1 and proc.stderr == "seqtool: error: No space left on device\n", proc.stderr


def test_nbest_beyond_the_beam_or_with_sampling_is_refused(trained_model):
    proc = run_cli("translate", "-m", str(trained_model), "--beam", "2", "--nbest", "3", input="a\n")
    assert_one_line_error(proc, "decoding.nbest 3 is more than decoding.beam_size 2", code=2)
    proc = run_cli("translate", "-m", str(trained_model), "--sample", "--nbest", "2", input="a\n")
    assert_one_line_error(proc, "decoding.nbest 2 with decoding.sample: sampling draws one output per line", code=2)


@pytest.mark.parametrize("args,match", [
    (["train", "-c", "/proc/self/mem"], "cannot read /proc/self/mem: Input/output error"),  # unreadable, even for root
    (["train", "-c", "configs"], "configs is a directory, not a config file"),
    (["train", "-c", "configs/sample.yaml", "--nproc", "0"], "--nproc must be at least 1, not 0"),
    (["train", "-c", "configs/sample.yaml", "--nproc", "-2"], "--nproc must be at least 1, not -2"),
])
def test_unreadable_config_and_impossible_nproc(args, match):
    assert_one_line_error(run_cli(*args), match, code=2)


def test_crlf_bom_and_long_line_accepted(trained_model, tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"\xef\xbb\xbfzuza zobo.\r\n\r\n" + b"zobo " * 210_000 + b"\n")  # a 1 MB line
    proc = run_cli("translate", "-m", str(trained_model), str(src), "-b", "1")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split("\n")) == 4
    assert "truncated" in proc.stderr


def test_closed_stdout_exits_quietly(trained_model):
    text = "zuza zobo.\n" * 3000
    pipeline = f"{sys.executable} -m seqtool translate -m {trained_model} -b 1 | head -1"
    proc = subprocess.run(["bash", "-c", pipeline], input=text, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


COMMANDS = ["train", "translate", "evaluate", "average", "info", "plot", "serve",
            "tokenizer train", "tokenizer encode", "tokenizer decode"]


def test_help_teaches():
    top = run_cli("--help")
    assert top.returncode == 0 and "Usage" in top.stdout and "--install-completion" in top.stdout
    for cmd in COMMANDS:
        proc = run_cli(*cmd.split(), "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout and "Example" in proc.stdout, cmd
        assert cmd.split()[-1] in top.stdout or cmd.startswith("tokenizer")


def test_shell_completion_script():
    # --show-completion finds the shell among its ancestors: run it from a bash that stays its parent
    # ('; exit' keeps bash from exec-ing python), or it fails wherever the test runner has no shell above it.
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m seqtool --show-completion; exit $?"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "complete " in proc.stdout and "seqtool" in proc.stdout, proc.stderr


def test_no_color_is_respected():
    colour = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|4[0-8]|9[0-7])(?:;[0-9;]*)?m")  # foreground/background codes
    forced = run_cli("translate", "--bogus", env={"FORCE_COLOR": "1"})
    assert forced.returncode == 2 and colour.search(forced.stderr)  # the check can see colour
    plain = run_cli("translate", "--bogus", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert plain.returncode == 2 and "No such option" in plain.stderr and not colour.search(plain.stderr)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_model_config_error_found_before_any_work(tmp_path, nproc):
    """A model combination the schema rejects stops train before the tokenizer or the model dir, --nproc too."""
    cfg = tiny_config(tmp_path / "m", model={"context": "every_step", "copy_source": True, "input_feeding": True})
    proc = run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), "--nproc", nproc)
    assert_one_line_error(proc, "model.input_feeding applies to luong_* attention only", code=2)
    assert "copy_source copies by attention" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_an_error_is_one_line_whatever_the_file_name_or_the_file_holds(trained_model, tmp_path):
    """A file name with a line break, a damaged header whose version string holds U+001E (a line boundary
    for str.splitlines; found by the header fuzzer): escaped, one line still."""
    import json
    import struct

    proc = run_cli("translate", "-m", str(tmp_path / "a\nb.safetensors"), input="x\n")
    assert_one_line_error(proc, "model file not found: ")
    assert "a\\nb.safetensors" in proc.stderr
    data = (trained_model / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["format_version"] = "\x1e\x1b[31m"
    text = json.dumps(header).encode()
    (tmp_path / "v.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    proc = run_cli("info", str(tmp_path / "v.safetensors"))
    assert_one_line_error(proc, "has seqtool model format version \\x1e\\x1b[31m; this seqtool reads version 1")
    assert proc.stderr.count("\n") == 1 and len(proc.stderr.splitlines()) == 1


def test_a_bug_is_one_line_with_its_own_exit_code(trained_model, monkeypatch):
    """An exception that is not a user error (a seqtool bug) is one line and exit 70; SEQTOOL_TRACEBACK=1
    shows the traceback to whoever debugs it."""
    import seqtool.checkpoint
    from test_fuzz import run_main

    def broken(*args):
        raise RuntimeError("model card\nexploded")

    monkeypatch.setattr(seqtool.checkpoint, "model_card", broken)
    code, _, err = run_main("info", str(trained_model))
    assert code == 70 and err == ("seqtool: internal error: RuntimeError: model card\\nexploded "
                                  "(a bug in seqtool; SEQTOOL_TRACEBACK=1 shows where)\n")
    monkeypatch.setenv("SEQTOOL_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="exploded"):
        run_main("info", str(trained_model))


def test_output_is_utf8_whatever_the_locale(trained_model):
    """A Latin-1 stdout (PYTHONIOENCODING, or a C locale on old Pythons) cannot encode CJK: seqtool writes
    UTF-8 anyway, as it reads."""
    proc = run_cli("tokenizer", "decode", "-m", str(trained_model), input="\u2581\u4e2d\u6587\n",
                   env={"PYTHONIOENCODING": "latin-1"})
    assert proc.returncode == 0, proc.stderr
    assert "\u4e2d\u6587" in proc.stdout


def test_output_through_a_symlink_or_into_a_fifo_keeps_what_it_is(trained_model, tmp_path):
    """-o LINK writes the link's target and leaves the link; -o FIFO feeds the reader on it; -o /dev/stdout
    appends to what the shell opened (a rename over them made plain files of all, of /dev/null too as root)."""
    import threading

    alone = run_cli("translate", "-m", str(trained_model), "-b", "1", input="zuza.\nzobo.\n", check=True).stdout
    target, link = tmp_path / "real.txt", tmp_path / "link.txt"
    link.symlink_to(target)  # dangling until written
    for _ in range(2):  # made, then replaced
        run_cli("translate", "-m", str(trained_model), "-b", "1", "-o", str(link), input="zuza.\nzobo.\n", check=True)
        assert link.is_symlink() and target.read_text() == alone
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    run_cli("translate", "-m", str(trained_model), "-b", "1", "-o", str(fifo), input="zuza.\nzobo.\n", check=True)
    reader.join(timeout=60)
    assert got == [alone] and fifo.is_fifo()
    log = tmp_path / "log.txt"
    log.write_text("kept\n")
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m seqtool translate -m {trained_model} -b 1 -q "
                           f"-o /dev/stdout >> {log}"], input="zuza.\nzobo.\n", capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and log.read_text() == "kept\n" + alone, proc.stderr  # as the shell's >> would


def _closed_streams_run(trained_model, redirect: str, *args: str) -> subprocess.CompletedProcess:
    command = " ".join([sys.executable, "-m", "seqtool", *args, "-m", str(trained_model), "-b", "1"])
    return subprocess.run(["bash", "-c", f"{command} {redirect}"], input="zuza.\n", capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_closed_standard_streams_are_one_line_or_harmless(trained_model, tmp_path):
    """Started with stdin or stdout closed (`<&-`, `>&-`): one line and exit 1, as the shell's own `echo >&-`;
    with stderr closed the work is done (and nothing lands on stdout but the output)."""
    proc = _closed_streams_run(trained_model, "<&-", "translate")
    assert proc.returncode == 1 and proc.stderr == "seqtool: error: cannot read <stdin>: standard input is closed\n"
    out = tmp_path / "in-closed.txt"
    proc = _closed_streams_run(trained_model, f"<&- -o {out}", "translate")  # the input's error, not the output's
    assert proc.returncode == 1 and proc.stderr == "seqtool: error: cannot read <stdin>: standard input is closed\n"
    proc = _closed_streams_run(trained_model, ">&-", "translate")
    assert proc.returncode == 1 and proc.stderr == "seqtool: error: standard output is closed\n", proc.stderr
    out = tmp_path / "out.txt"
    proc = _closed_streams_run(trained_model, f">&- -o {out}", "translate")
    assert proc.returncode == 0 and out.read_text().count("\n") == 1, proc.stderr
    proc = _closed_streams_run(trained_model, "2>&-", "translate")
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1 and "error" not in proc.stdout, proc.stdout


def test_a_file_name_that_is_not_utf8_is_shown_escaped_in_one_line_and_a_model_there_loads(trained_model, tmp_path):
    proc = subprocess.run([sys.executable.encode(), b"-m", b"seqtool", b"translate", b"-m",
                           os.fsencode(tmp_path) + b"/\xff.safetensors"], input=b"a\n", capture_output=True,
                          cwd=ROOT, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "model file not found" in err and "\\udcff.safetensors" in err
    import shutil

    shutil.copy(trained_model / "model.safetensors", os.fsencode(tmp_path) + b"/\xff.safetensors")
    proc = run_cli("info", os.fsdecode(os.fsencode(tmp_path) + b"/\xff.safetensors"))  # a model there loads
    assert proc.returncode == 0 and "parameters" in proc.stdout, proc.stderr


def test_a_model_with_nan_weights_or_a_config_too_large_to_build_is_refused_as_damaged(trained_model, tmp_path,
                                                                                       monkeypatch):
    import torch

    import seqtool.checkpoint
    from seqtool.checkpoint import load_model, save_model

    bundle = load_model(trained_model)
    with torch.no_grad():
        next(iter(bundle.model.parameters())).fill_(float("nan"))
    save_model(tmp_path / "nan.safetensors", bundle)
    proc = run_cli("translate", "-m", str(tmp_path / "nan.safetensors"), input="zuza.\n")
    assert_one_line_error(proc, "damaged: 1 weight tensor(s) hold NaN or infinity")
    assert proc.stdout == ""

    def unbuildable(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(seqtool.checkpoint, "build_model", unbuildable)
    assert_one_line_error(run_cli("info", str(trained_model)), "asks for a model too large for this machine's memory")


def test_evaluate_without_a_metric_is_refused_before_translating(trained_model):
    for metrics, match in ((",", "--metrics: no metric named; choose from bleu"),
                           ("bleu,meteor", "--metrics: unknown metric 'meteor'")):
        proc = run_cli("evaluate", "-m", str(trained_model), "--src", "/dev/null", "--ref", "/dev/null",
                       "--metrics", metrics)
        assert_one_line_error(proc, match, code=2)


def test_misaligned_evaluate_and_score_from_one_stdin_are_refused_before_any_work(trained_model, tmp_path):
    (tmp_path / "src").write_text("zuza.\nzobo.\n")
    (tmp_path / "ref").write_text("govo.\n")
    proc = run_cli("evaluate", "-m", str(trained_model), "--src", str(tmp_path / "src"), "--ref", str(tmp_path / "ref"))
    assert_one_line_error(proc, "ref has 1 lines but ")
    assert "translated" not in proc.stderr
    proc = run_cli("score", "-m", str(trained_model), "-s", "-", "-t", "-", input="zuza.\ngovo.\n")
    assert_one_line_error(proc, "--src and --tgt cannot both be stdin", code=2)


def test_serve_refuses_a_batch_wait_that_would_hold_every_request_forever(trained_model):
    for wait in ("inf", "1e9", "-1"):
        proc = run_cli("serve", "-m", str(trained_model), "--batch-wait-ms", wait)
        assert_one_line_error(proc, "--batch-wait-ms 0 to 10,000", code=2)


def test_average_names_a_missing_run_folder_or_a_file_given_for_one(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"x")
    out = str(tmp_path / "avg.safetensors")
    assert_one_line_error(run_cli("average", str(tmp_path / "nope"), "-o", out), "run folder not found: ", code=1)
    assert_one_line_error(run_cli("average", str(tmp_path / "m.safetensors"), "-o", out), "is a file, not a run's")
    assert_one_line_error(run_cli("average", str(tmp_path), "-o", out), "no step*.safetensors checkpoints in")


def test_attention_plot_at_a_file_says_it_takes_a_folder(trained_model, tmp_path):
    plot = tmp_path / "plot"
    plot.write_text("keep me\n")
    proc = run_cli("translate", "-m", str(trained_model), "--attention-plot", str(plot), input="zuza.\n")
    assert_one_line_error(proc, f"--attention-plot takes a folder (one picture per line); {plot} is a file")
    assert proc.stdout == "" and plot.read_text() == "keep me\n"

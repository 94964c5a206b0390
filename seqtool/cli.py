"""The `seqtool` command: parses flags, calls one library function, reports user errors in one line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from seqtool.errors import SeqtoolError

app = typer.Typer(
    help="Train, run and score RNN sequence-to-sequence models for text.\n\n"
    "Typical use:  seqtool train -c configs/sample.yaml  then  seqtool translate -m runs/sample input.txt",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
tokenizer_app = typer.Typer(help="Train and apply a sentencepiece tokenizer on its own.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")

SetOpt = typer.Option([], "--set", help="Override a config key: --set section.key=value (repeatable).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Only errors on stderr.")


def _err(message: str) -> None:
    print(f"seqtool: {message}", file=sys.stderr, flush=True)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Experiment YAML (see configs/)."),
    overrides: List[str] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in training.model_dir where it stopped."),
    quiet: bool = QuietOpt,
) -> None:
    """Train a tokenizer and a model; writes model.safetensors, config.yaml and metrics.jsonl to the model dir.

    Example:  seqtool train -c configs/sample.yaml --set training.max_steps=2000
    """
    from seqtool.config import load_config
    from seqtool.train import run_training

    if config is None and not overrides:
        raise SeqtoolError("give a config with -c FILE (see configs/), or the keys with --set section.key=value")
    run_training(load_config(config, overrides), resume=resume, quiet=quiet)


def _decoding(bundle, overrides: List[str], beam: Optional[int], nbest: Optional[int], batch_size: Optional[int],
              length_penalty: Optional[float]):
    """The model's decoding section with --set overrides and flags applied (validated)."""
    from seqtool.config import apply_overrides, validate

    raw = bundle.config.model_dump()
    for key, value in (("beam_size", beam), ("nbest", nbest), ("batch_size", batch_size), ("length_penalty", length_penalty)):
        if value is not None:
            raw["decoding"][key] = value
    return validate(apply_overrides(raw, overrides)).decoding


def _translator(model: Path, overrides, beam, nbest, batch_size, length_penalty, quiet: bool):
    from seqtool.checkpoint import load_model
    from seqtool.translate import Translator

    bundle = load_model(model)
    decoding = _decoding(bundle, overrides, beam, nbest, batch_size, length_penalty)
    return Translator(bundle.model, bundle.src_tok, bundle.tgt_tok, decoding, warn=(lambda m: None) if quiet else _err)


ModelOpt = typer.Option(..., "--model", "-m", help="A model file, or a model dir (uses its model.safetensors).")
BeamOpt = typer.Option(None, "--beam", "-b", help="Beam size; 1 is greedy. Default: the model's decoding.beam_size.")
BatchOpt = typer.Option(None, "--batch-size", help="Sentences per decoding batch.")
LpOpt = typer.Option(None, "--length-penalty", help="GNMT length penalty alpha (0 = none).")


@app.command()
def translate(
    input: str = typer.Argument("-", help="Input text file, one sentence per line; '-' or nothing reads stdin."),
    model: Path = ModelOpt,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
    beam: Optional[int] = BeamOpt,
    nbest: Optional[int] = typer.Option(None, "--nbest", help="Hypotheses kept per line (shown with --format json)."),
    batch_size: Optional[int] = BatchOpt,
    length_penalty: Optional[float] = LpOpt,
    fmt: str = typer.Option("text", "--format", help="text: one line per input; json: one JSON object per input with n-best and scores."),
    overrides: List[str] = SetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Translate lines: exactly one output line per input line (empty in, empty out), in order.

    Examples:  seqtool translate -m runs/sample test.src > out.txt
               cat test.src | seqtool translate -m runs/sample --beam 5
    """
    from seqtool.data import iter_lines
    from seqtool.translate import translate_stream

    if fmt not in ("text", "json"):
        raise SeqtoolError(f"--format must be text or json, not {fmt!r}")
    translator = _translator(model, overrides, beam, nbest, batch_size, length_penalty, quiet)
    lines = iter_lines(input)
    start = time.monotonic()
    if output is None:
        n = translate_stream(translator, lines, sys.stdout, fmt)
    else:
        tmp = output.with_name(f".{output.name}.partial")
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                n = translate_stream(translator, lines, out, fmt)
            os.replace(tmp, output)  # no half-written output under the real name
        except OSError as exc:
            raise SeqtoolError(f"cannot write {output}: {exc.strerror}") from None
        finally:
            if tmp.exists():
                tmp.unlink()
    if not quiet:
        seconds = time.monotonic() - start
        _err(f"translated {n} lines in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} lines/s)")


@app.command()
def evaluate(
    ref: Path = typer.Option(..., "--ref", "-r", help="Reference file, line-aligned with the source."),
    src: Optional[Path] = typer.Option(None, "--src", "-s", help="Source file to translate with --model."),
    hyp: Optional[Path] = typer.Option(None, "--hyp", help="Score this existing output instead of translating."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model file or dir (with --src)."),
    beam: Optional[int] = BeamOpt,
    batch_size: Optional[int] = BatchOpt,
    length_penalty: Optional[float] = LpOpt,
    metrics: str = typer.Option("bleu,chrf", "--metrics", help="Comma-separated: bleu, chrf."),
    overrides: List[str] = SetOpt,
) -> None:
    """Score translations with sacrebleu (BLEU 13a cased, chrF): translate --src with --model, or score --hyp.

    Example:  seqtool evaluate -m runs/sample --src sample_data/test.src --ref sample_data/test.tgt
    """
    from seqtool.data import read_lines
    from seqtool.metrics import corpus_scores

    refs = read_lines(ref)
    if hyp is not None:
        hyps = read_lines(hyp)
    elif src is not None and model is not None:
        translator = _translator(model, overrides, beam, None, batch_size, length_penalty, quiet=False)
        hyps = [t.text for t in translator.translate(read_lines(src))]
    else:
        raise SeqtoolError("give --hyp FILE, or --model and --src to translate")
    for score in corpus_scores(hyps, refs, tuple(m.strip() for m in metrics.split(",") if m.strip())):
        print(f"{score.name.upper()} = {score.value:.2f}  ({score.signature})")


@tokenizer_app.command("train")
def tokenizer_train(
    inputs: List[Path] = typer.Argument(..., help="Text files to learn from."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the sentencepiece model."),
    type: str = typer.Option("bpe", "--type", help="bpe, unigram, char, or word (text already split by spaces)."),
    vocab_size: int = typer.Option(8000, "--vocab-size", help="Upper bound on the number of pieces."),
) -> None:
    """Train a sentencepiece model.  Example:  seqtool tokenizer train train.de train.en -o joint.spm"""
    from seqtool.checkpoint import atomic_write
    from seqtool.config import validate
    from seqtool.data import iter_lines
    from seqtool.tokenizer import train_tokenizer

    cfg = validate({"tokenizer": {"type": type, "vocab_size": vocab_size}}).tokenizer
    tok = train_tokenizer((line for path in inputs for line in iter_lines(path)), cfg)
    atomic_write(output, tok.model_bytes)
    print(f"{output}: {tok.vocab_size} pieces", file=sys.stderr)


def _tokenizer_io(model: Path, input: str, fn) -> None:
    from seqtool.checkpoint import load_model
    from seqtool.data import iter_lines
    from seqtool.tokenizer import Tokenizer

    if model.suffix == ".safetensors" or model.is_dir():
        tok = load_model(model).src_tok
    else:
        tok = Tokenizer.from_file(str(model))
    for line in iter_lines(input):
        sys.stdout.write(fn(tok, line) + "\n")
        sys.stdout.flush()


TokModelOpt = typer.Option(..., "--model", "-m", help="A sentencepiece model, or a seqtool model (its source tokenizer).")


@tokenizer_app.command("encode")
def tokenizer_encode(input: str = typer.Argument("-", help="Text file, or '-' for stdin."), model: Path = TokModelOpt) -> None:
    """Text -> space-separated pieces, one line per line."""
    _tokenizer_io(model, input, lambda tok, line: " ".join(tok.pieces(line)))


@tokenizer_app.command("decode")
def tokenizer_decode(input: str = typer.Argument("-", help="Pieces file, or '-' for stdin."), model: Path = TokModelOpt) -> None:
    """Space-separated pieces -> text, one line per line."""
    _tokenizer_io(model, input, lambda tok, line: tok.decode_pieces(line.split()))


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit code, never a traceback."""
    try:
        app()  # Typer handles --help, usage errors (exit 2) and Ctrl-C itself
    except SeqtoolError as exc:
        _err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # The reader went away (e.g. `| head -1`): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)

if __name__ == "__main__":
    main()

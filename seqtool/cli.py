"""The `seqtool` command: parses flags, calls one library function, reports user errors in one line."""

from __future__ import annotations

import atexit
import errno
import gc
import io
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import typer

from seqtool.errors import ConfigError, DataError, SeqtoolError, one_line
from seqtool.metrics import METRICS

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
VerboseOpt = typer.Option(False, "--verbose", "-v", help="More detail on stderr.")
DeviceOpt = typer.Option(None, "--device",
                         help="auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda or cuda:N.")
QuantizeOpt = typer.Option(None, "--quantize/--no-quantize", help="int8 weights for the linear and RNN layers: faster "
                           "CPU decoding, BLEU within a few tenths (docs/performance.md); --set "
                           "decoding.quantize_kind=bf16 for bf16 on a CPU with native bf16.")
ShortlistOpt = typer.Option(None, "--shortlist", help="Cut the output layer to each source token's N likeliest target "
                            "tokens (learned when training) + the most frequent ones: faster decoding; 0 = whole "
                            "vocabulary (decoding.shortlist).")


INTERNAL_ERROR = 70  # sysexits' EX_SOFTWARE: not the user's mistake, and never mistaken for one (1, 2)


def _err(message: str) -> None:
    print(f"seqtool: {one_line(message)}", file=sys.stderr, flush=True)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Experiment YAML (see configs/)."),
    src: Optional[str] = typer.Option(None, "--src", help="Training source file (data.train_src)."),
    tgt: Optional[str] = typer.Option(None, "--tgt", help="Training target file (data.train_tgt)."),
    valid_src: Optional[str] = typer.Option(None, "--valid-src", help="Dev source file (data.valid_src)."),
    valid_tgt: Optional[str] = typer.Option(None, "--valid-tgt", help="Dev target file (data.valid_tgt)."),
    model_dir: Optional[str] = typer.Option(None, "--model-dir", "-o",
                                            help="Where to write the run (training.model_dir)."),
    overrides: list[str] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in training.model_dir where it stopped."),
    device: Optional[str] = DeviceOpt,
    nproc: int = typer.Option(1, "--nproc", help="Data-parallel processes on this machine (torch.distributed; same as "
                              "torchrun --nproc-per-node). One process per GPU or per machine's worth of cores: on one "
                              "CPU a single process already uses every core, so 2 processes on 2 cores run slower "
                              "(docs/scaling.md)."),
    max_restarts: int = typer.Option(0, "--max-restarts", help="With --nproc: when a process dies (killed, out of "
                                     "memory), start them all again up to this many times, resuming from the last "
                                     "checkpoint (as torchrun --max-restarts)."),
    quiet: bool = QuietOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Print the resolved config, and a log line every 10 steps instead of the bar."),
) -> None:
    """Train a tokenizer and a model; writes model.safetensors, config.yaml and metrics.jsonl to the model dir.

    Without -c, the defaults of every key apply (see the README's configuration reference), and the
    resolved config is written to the model dir for next time.

    Examples:

        seqtool train -c configs/sample.yaml --set training.max_steps=2000

        seqtool train --src train.de --tgt train.en --valid-src dev.de --valid-tgt dev.en -o runs/first

        seqtool train -c configs/sample.yaml --nproc 2      (or: torchrun --nproc-per-node 2 -m seqtool train -c ...)
    """
    from seqtool.config import load_config
    from seqtool.train import check_before_start, run_training

    flags = {"data.train_src": src, "data.train_tgt": tgt, "data.valid_src": valid_src, "data.valid_tgt": valid_tgt,
             "training.model_dir": model_dir, "training.device": device}
    if config is None and src is None:
        raise SeqtoolError("give a config with -c FILE (see configs/), or the data with --src and --tgt")
    cfg = load_config(config, overrides, {k: v for k, v in flags.items() if v is not None})
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, not {nproc}")
    if max_restarts and nproc == 1:
        raise ConfigError("--max-restarts needs --nproc 2 or more (or torchrun --max-restarts)")
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be at least 0, not {max_restarts}")
    if nproc != 1:
        from seqtool.distributed import launch

        check_before_start(cfg, resume)  # the usual mistakes once, here, rather than once per process
        raise typer.Exit(launch(nproc, cfg, [*(["--resume"] if resume else []), *(["-q"] if quiet else []),
                                             *(["-v"] if verbose else [])], max_restarts))
    run_training(cfg, resume=resume, quiet=quiet, verbose=verbose)


def _decoding_flags(params: dict) -> dict:
    """A command's options that are decoding keys, as given: each such option is named as its key (--beam is
    beam_size), so a new decoding option needs no mapping here."""
    from seqtool.config import DecodingConfig

    return {k: v for k, v in params.items() if k in DecodingConfig.model_fields and v is not None}


def _decoding(bundle, overrides: list[str], flags: dict):
    """The model's decoding section with --set overrides, then the command's decoding flags, applied."""
    from seqtool.config import apply_overrides, validate

    for expr in overrides:
        if not expr.startswith("decoding."):
            raise ConfigError(f"--set {expr}: only decoding.* keys can change at translation time")
    settings = {f"decoding.{k}": v for k, v in flags.items()}
    return validate(apply_overrides(bundle.config.model_dump(), overrides, settings)).decoding


def _translator(model: Path, overrides: list[str], flags: dict, quiet: bool, verbose: bool = False,
                attention: bool = False, bundle=None, pieces: bool = False, others: Sequence[Path] = (), **controls):
    """A Translator for the model at `model` (or the already loaded `bundle`) with decoding flags applied; with
    `others`, of the ensemble of them all (the first model's decoding settings and shortlist table)."""
    from seqtool.checkpoint import load_model
    from seqtool.device import pick_device, quantized, release_freed_memory
    from seqtool.translate import Translator

    bundle = bundle or load_model(model)
    members = [load_model(path) for path in others]
    for path, member in zip(others, members):
        if (member.src_tok.model_bytes, member.tgt_tok.model_bytes) != (bundle.src_tok.model_bytes,
                                                                        bundle.tgt_tok.model_bytes):
            raise SeqtoolError(f"{path}: its tokenizers differ from {model}'s; the models of an ensemble must share "
                               f"their vocabularies (train them on the same data and tokenizer settings, or with "
                               f"the same tokenizer.model)")
    decoding = _decoding(bundle, overrides, flags)
    device = pick_device(decoding.device)
    nets = [b.model.to(device) for b in (bundle, *members)]
    if decoding.quantize:
        nets = [quantized(n, device, decoding.quantize_kind) for n in nets]
        release_freed_memory()  # the conversion's temporaries
    net = nets[0]
    if verbose:
        m = bundle.config.model
        _err(f"model: {model} ({m.cell}, context {m.context}, "
             f"vocab {bundle.src_tok.vocab_size}/{bundle.tgt_tok.vocab_size}) "
             f"on {net.device}{f', {decoding.quantize_kind}' if decoding.quantize else ''}"
             f"{', shortlist table' if bundle.shortlist is not None else ', no shortlist table'}"
             f"{f'; an ensemble with {len(others)} more: ' + ', '.join(map(str, others)) if others else ''}")
        _err("decoding: " + " ".join(f"{k}={v}" for k, v in decoding.model_dump().items()))
    return Translator(net, bundle.src_tok, bundle.tgt_tok, decoding, bundle.config.data.truncate_src,
                      warn=(lambda m: None) if quiet else _err, with_attention=attention, with_pieces=pieces,
                      shortlist=bundle.shortlist, others=tuple(nets[1:]), **controls)


ModelOpt = typer.Option(..., "--model", "-m", help="A model file, or a model dir (uses its model.safetensors).")
BeamOpt = typer.Option(None, "--beam", "-b", help="Beam size; 1 is greedy. Default: the model's decoding.beam_size.")
BatchOpt = typer.Option(None, "--batch-size", help="Sentences per decoding batch.")
LpOpt = typer.Option(None, "--length-penalty", help="GNMT length penalty alpha (0 = none).")


@app.command()
def translate(
    input: str = typer.Argument("-", help="Input text file, one sentence per line; '-' or nothing reads stdin."),
    model: list[Path] = typer.Option(..., "--model", "-m", help="A model file, or a model dir (its "
                                     "model.safetensors). Repeat for an ensemble: every step averages the models' "
                                     "log-probabilities (models with the same tokenizers; the first one's decoding "
                                     "settings)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
    beam_size: Optional[int] = BeamOpt,
    nbest: Optional[int] = typer.Option(None, "--nbest", help="Hypotheses kept per line (shown with --format json)."),
    batch_size: Optional[int] = BatchOpt,
    length_penalty: Optional[float] = LpOpt,
    sample: Optional[bool] = typer.Option(None, "--sample/--no-sample", help="Draw tokens at random (with "
                                          "--temperature, --top-k, --top-p, --seed) instead of beam search."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default 1)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most probable tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p",
                                          help="Sample within the smallest set of this probability mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling (same seed, same output)."),
    fmt: str = typer.Option("text", "--format", help="text: one line per input; json: one JSON object per input with "
                            "n-best, scores and pieces."),
    input_format: str = typer.Option("text", "--input-format", help='text: one sentence per line; jsonl: one JSON '
                                     'object per line, {"text": ..., "prefix": ..., "constraints": [...], "avoid": '
                                     '[...]}, every field but text optional.'),
    prefix: Optional[str] = typer.Option(None, "--prefix",
                                         help="Every output begins with this text (a jsonl line's own prefix wins)."),
    drop_prefix: bool = typer.Option(False, "--drop-prefix", help="Write the outputs without their prefix."),
    avoid_file: Optional[Path] = typer.Option(None, "--avoid-file", help="Phrases no output may hold, one per line "
                                              "(besides a jsonl line's own avoid list)."),
    attention: bool = typer.Option(False, "--attention",
                                   help="Add each output's attention weights to --format json (attention models)."),
    device: Optional[str] = DeviceOpt,
    quantize: Optional[bool] = QuantizeOpt,
    shortlist: Optional[int] = ShortlistOpt,
    attention_plot: Optional[Path] = typer.Option(None, "--attention-plot", help="Save an attention heatmap per input "
                                                  "line to this folder (LINE.png; with --format json the weights are "
                                                  "shown too)."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="A prompt on a terminal: type a line, read "
                                     "its translation (and the n-best with --nbest); arrow keys for history, "
                                     "Ctrl-D ends."),
    overrides: list[str] = SetOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Translate lines: exactly one output line per input line (empty in, empty out), in order.

    Examples:

        seqtool translate -m runs/sample test.src > out.txt

        cat test.src | seqtool translate -m runs/sample --beam 5

        head -3 test.src | seqtool translate -m runs/sample --format json --attention-plot attn/

        echo '{"text": "seliti roma lasa.", "prefix": "voba", "constraints": ["Kevi"]}' |
        seqtool translate -m runs/sample --input-format jsonl

        seqtool translate -m runs/sample -i --beam 5 --nbest 3

        seqtool translate -m runs/seed1 -m runs/seed2 -m runs/seed3 test.src      (an ensemble)
    """
    flags = _decoding_flags(locals())
    from seqtool.data import iter_lines
    from seqtool.translate import parse_jsonl, translate_stream

    if fmt not in ("text", "json"):
        raise SeqtoolError(f"--format must be text or json, not {fmt!r}")
    if input_format not in ("text", "jsonl"):
        raise SeqtoolError(f"--input-format must be text or jsonl, not {input_format!r}")
    if attention and fmt != "json":
        raise SeqtoolError("--attention adds weights to JSON output: use it with --format json")
    if interactive and (input != "-" or output is not None or input_format != "text" or attention_plot is not None
                        or not sys.stdin.isatty()):
        raise ConfigError("-i reads lines typed at a terminal and answers there: give it no input file, -o, "
                          "--input-format or --attention-plot (a file or a pipe is translated without -i)")
    avoid = [(n, line) for n, line in enumerate(iter_lines(avoid_file), 1) if line.strip()] if avoid_file else []
    translator = _translator(model[0], overrides, flags, quiet, verbose, attention or attention_plot is not None,
                             pieces=fmt == "json", prefix=prefix or "", avoid=tuple(line for _, line in avoid),
                             drop_prefix=drop_prefix, others=model[1:])
    for n, phrase in avoid:  # each checked now, named by its own line (lines use them from the cache)
        translator.spellings(phrase, "an avoided phrase", f"{avoid_file}:{n}")
    each = _attention_plotter(attention_plot) if attention_plot is not None else None
    if interactive:
        from seqtool.prompt import run_prompt

        run_prompt(translator, fmt, _err)
        return
    lines = iter_lines(input) if input_format == "text" else parse_jsonl(iter_lines(input))
    progress = _line_progress(input, output, quiet, verbose)
    if progress is not None:
        callbacks = [f for f in (each, progress) if f is not None]

        def each(lineno: int, t) -> None:
            for f in callbacks:
                f(lineno, t)
    start = time.monotonic()
    try:
        if output is None:
            n = translate_stream(translator, lines, sys.stdout, fmt, each)
        else:
            n = _translate_to_file(translator, lines, output, fmt, each)
    finally:
        if progress is not None:
            progress.close()
    if not quiet:
        seconds = time.monotonic() - start
        _err(f"translated {n} lines in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} lines/s)")


@app.command()
def poem(
    input: str = typer.Argument("-", help="File of heads strings, one poem per line (a blank line: an empty poem, "
                                "in place); '-' or nothing reads stdin (unless --heads)."),
    first: Path = typer.Option(..., "--first",
                               help="The first-line model: a head character -> a line (configs/poem_first.yaml)."),
    next_model: Path = typer.Option(..., "--next", help="The next-line model: a line -> the line answering it "
                                    "(configs/couplets.yaml)."),
    heads: Optional[str] = typer.Option(None, "--heads",
                                        help="The heads of one poem, e.g. 春夏秋冬: line k begins with character k."),
    chars: int = typer.Option(5, "--chars", help="Characters per line (5 and 7 are the classical forms)."),
    tones: bool = typer.Option(True, "--tones/--no-tones", help="Odd lines end on a 仄 tone, even lines on 平."),
    fmt: str = typer.Option("text", "--format", "-f",
                            help="text (the lines, a blank line between poems) or json (one object per poem)."),
    beam_size: Optional[int] = BeamOpt,
    device: Optional[str] = DeviceOpt,
    overrides: list[str] = typer.Option([], "--set", help="Override a decoding key of the next-line model: --set "
                                        "decoding.no_echo=false (repeatable)."),
    quiet: bool = QuietOpt,
) -> None:
    """Write acrostic poems (藏头诗): one line per head character, line k beginning with head k.

    The first line grows from its head alone (a one-to-many model); each later line answers the line
    before it (a couplet model, whose rules on repeats and echoes apply) with its head forced.

    Examples:

        seqtool poem --first runs/poem_first --next runs/couplets --heads 春夏秋冬 --chars 5

        printf '春夏秋冬\n风花雪月\n' | seqtool poem --first runs/poem_first --next runs/couplets --format json
    """
    flags = _decoding_flags(locals())
    import json

    from seqtool.data import iter_lines
    from seqtool.poem import MAX_CHARS, Poet

    if fmt not in ("text", "json"):
        raise SeqtoolError(f"--format must be text or json, not {fmt!r}")
    if not 2 <= chars <= MAX_CHARS:
        raise SeqtoolError(f"--chars {chars}: a line has 2 to {MAX_CHARS} characters")
    poet = Poet(_translator(first, [], flags, quiet), _translator(next_model, overrides, flags, quiet), tones)
    texts = [heads] if heads is not None else iter_lines(input)
    for n, text in enumerate(texts, 1):
        # A blank line in a file is an empty poem in its place, so the poems stay aligned with their lines (as
        # translate keeps empty lines); --heads "" asked for one poem and names the mistake.
        lines = poet.write([text], chars, n)[0] if text.strip() or heads is not None else []
        if fmt == "json":
            print(json.dumps({"heads": text, "lines": lines}, ensure_ascii=False), flush=True)
        else:
            print(("\n" if n > 1 else "") + "\n".join(lines), flush=True)


def _line_progress(input: str, output: Optional[Path], quiet: bool, verbose: bool):
    """Progress through an input file: a bar while stderr is a terminal and the translations go elsewhere (a
    file, a pipe), plain periodic lines with -v otherwise; none for stdin, whose length is unknown, or -q."""
    from seqtool.data import count_lines
    from seqtool.progress import LineProgress

    if quiet or input == "-":
        return None
    if sys.stderr.isatty():
        return LineProgress(count_lines(input), plain=False) if output is not None or not sys.stdout.isatty() else None
    return LineProgress(count_lines(input), plain=True) if verbose else None


def _translate_to_file(translator, lines, output: Path, fmt: str, each) -> int:
    """Write under a temporary name and rename when complete, so the real name never holds half an output.
    If anything stops it (bad input on line N, a full disk, Ctrl-C, a bug), the lines already translated are
    kept in OUTPUT.partial, whole lines only, and the error says so."""
    from seqtool.checkpoint import write_target
    from seqtool.translate import translate_stream

    output, replaceable = write_target(output)
    if not replaceable:  # a FIFO, a device, /dev/stdout: lines go straight in, as with stdout
        try:
            with open(output, "a", encoding="utf-8") as out:
                return translate_stream(translator, lines, out, fmt, each)
        except OSError as exc:
            raise SeqtoolError(f"cannot write {output}: {exc.strerror}") from None
    tmp, partial = output.with_name(f".{output.name}.tmp"), output.with_name(output.name + ".partial")
    partial.unlink(missing_ok=True)  # an earlier run's: it would be taken for this one's
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            n = translate_stream(translator, lines, out, fmt, each)
        os.replace(tmp, output)
        return n
    except BaseException as exc:
        kept = _kept(tmp, partial)
        if isinstance(exc, SeqtoolError):
            raise type(exc)(f"{exc}{kept}") from None
        if isinstance(exc, OSError):
            raise SeqtoolError(f"cannot write {output}: {exc.strerror}{kept}") from None
        if kept:  # Ctrl-C or a bug: say where the finished lines are, then let it take its course
            _err(f"stopped{kept}")
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _kept(tmp: Path, partial: Path) -> str:
    """Keep the whole lines of an unfinished output as `partial` (cut after its last line break, renamed,
    never read into memory); the words to add to the error."""
    try:
        with open(tmp, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            while end > 0:  # back to just after the last b"\n"
                start = max(0, end - (1 << 16))
                f.seek(start)
                at = f.read(end - start).rfind(b"\n")
                if at >= 0:
                    end = start + at + 1
                    break
                end = start
            f.truncate(end)
        if end == 0:
            return ""
        with open(tmp, "rb") as f:
            count = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
        os.replace(tmp, partial)
    except OSError:
        return ""
    return f" (the {count} lines translated before it are in {partial})"


def _attention_plotter(folder: Path):
    """A per-line callback that saves FOLDER/LINE.png for each non-empty line."""
    from seqtool.plot import plot_attention

    if folder.exists() and not folder.is_dir():  # mkdir would say only "File exists"
        raise SeqtoolError(f"--attention-plot takes a folder (one picture per line); {folder} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SeqtoolError(f"cannot create {folder}: {exc.strerror}") from None

    def save(lineno: int, t) -> None:
        if t.attention is not None:
            plot_attention(t.src_pieces, t.pieces + ["</s>"], t.attention, folder / f"{lineno}.png")

    return save


@app.command()
def evaluate(
    ref: list[Path] = typer.Option(..., "--ref", "-r",
                                   help="Reference file, line-aligned; repeat for several references."),
    src: Optional[Path] = typer.Option(None, "--src", "-s",
                                       help="Source file: translated with --model, and used by couplet metrics."),
    hyp: Optional[Path] = typer.Option(None, "--hyp", help="Score this existing output instead of translating."),
    model: Optional[list[Path]] = typer.Option(None, "--model", "-m", help="Model file or dir (with --src); "
                                               "repeat for an ensemble, as with translate."),
    beam_size: Optional[int] = BeamOpt,
    batch_size: Optional[int] = BatchOpt,
    length_penalty: Optional[float] = LpOpt,
    metrics: str = typer.Option("bleu,chrf", "--metrics",
                                help=f"Comma-separated: {', '.join(METRICS)}."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of text."),
    device: Optional[str] = DeviceOpt,
    quantize: Optional[bool] = QuantizeOpt,
    shortlist: Optional[int] = ShortlistOpt,
    overrides: list[str] = SetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Score output: translate --src with --model, or score an existing --hyp file.

    BLEU (13a, cased) and chrF come from sacrebleu, ROUGE from rouge-score (stemmed F1; best over
    references per example). couplet: BLEU-1/2/4 on characters, chrF, exact_length, punct_agreement,
    tone_match, tone_opposed, repeat_agreement, echo_rate, distinct_1/2, copy_rate (needs --src);
    definitions in docs/metrics.md.

    Examples:

        seqtool evaluate -m runs/sample --src sample_data/test.src --ref sample_data/test.tgt

        seqtool evaluate --hyp out.txt --ref test.ann0 --ref test.ann1 --metrics rouge
    """
    flags = _decoding_flags(locals())
    import json

    from seqtool.data import read_lines
    from seqtool.metrics import score, unknown_names

    names = [m.strip() for m in metrics.split(",") if m.strip()]
    problem = unknown_names(names) if names else f"no metric named; choose from {', '.join(METRICS)}"
    if problem:  # before any translating, which may take minutes
        raise ConfigError(f"--metrics: {problem}")
    refs = [read_lines(r) for r in ref]
    srcs = read_lines(src) if src is not None else None
    if hyp is not None:
        hyps = read_lines(hyp)
    elif srcs is not None and model:
        for path, lines in zip(ref, refs):  # found now, not after translating them all
            if len(lines) != len(srcs):
                raise DataError(f"{path} has {len(lines)} lines but {src} has {len(srcs)}; they must be line-aligned")
        translator = _translator(model[0], overrides, flags, quiet, others=model[1:])
        hyps = [t.text for t in translator.translate(srcs)]
    else:
        raise SeqtoolError("give --hyp FILE, or --model and --src to translate")
    results = score(hyps, refs, names, srcs)
    if as_json:
        print(json.dumps({"references": [str(r) for r in ref], "n": len(hyps),
                          "scores": {s.name: round(s.value, 2) for s in results},
                          "signatures": {s.name: s.signature for s in results if s.signature}}))
        return
    print(f"references: {', '.join(str(r) for r in ref)} ({len(hyps)} lines)")
    for s in results:
        print(f"{s.name} = {s.value:.2f}" + (f"  ({s.signature})" if s.signature else ""))


@app.command()
def score(
    model: Path = ModelOpt,
    src: str = typer.Option(..., "--src", "-s", help="Source file ('-' for stdin)."),
    tgt: str = typer.Option(..., "--tgt", "-t", help="Target file, line-aligned with --src: the outputs to score."),
    batch_size: Optional[int] = BatchOpt,
    as_json: bool = typer.Option(False, "--json", help="A JSON object per line instead of tab-separated text."),
    device: Optional[str] = DeviceOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Score given outputs: per line, the model's log-probability of the --tgt line given the --src line.

    One line out per line in, as each chunk is scored: the log-probability (natural log, summed over the
    target's tokens and its end-of-sentence token), the same per token, and the token count, tab-separated;
    with --json, {"logprob", "per_token", "tokens", "ppl"}. A line with an empty source is not scored
    ("-" fields; JSON nulls). On stderr at the end: the perplexity over the file, which is exp of the
    validation loss on it. Useful to filter training data (low per-token scores) and to compare models on
    the same pairs.

    Examples:

        seqtool score -m runs/sample --src sample_data/test.src --tgt sample_data/test.tgt

        seqtool score -m runs/sample -s train.src -t train.tgt --json > scores.jsonl
    """
    import json
    import math

    from seqtool.checkpoint import load_model
    from seqtool.device import pick_device
    from seqtool.score import Scorer, read_pairs_streamed

    if src == tgt == "-":  # two files from one stream would pair line 1 with line 2, and so on
        raise ConfigError("--src and --tgt cannot both be stdin ('-'); give one of them as a file")
    bundle = load_model(model)
    decoding = _decoding(bundle, [], {k: v for k, v in {"batch_size": batch_size, "device": device}.items()
                                      if v is not None})
    scorer = Scorer(bundle.model.to(pick_device(decoding.device)).eval(), bundle.src_tok, bundle.tgt_tok,
                    bundle.config.data.truncate_src, decoding.max_input_tokens, decoding.batch_size,
                    warn=(lambda m: None) if quiet else _err)
    total, tokens, lines, unscored = 0.0, 0, 0, 0
    for s in scorer.score(read_pairs_streamed(src, tgt)):
        lines += 1
        if s is None:
            unscored += 1
            print(json.dumps({"logprob": None, "per_token": None, "tokens": None, "ppl": None}) if as_json
                  else "-\t-\t-", flush=True)
            continue
        total, tokens = total + s.logprob, tokens + s.tokens
        print(json.dumps({"logprob": round(s.logprob, 4), "per_token": round(s.per_token, 4), "tokens": s.tokens,
                          "ppl": round(s.ppl, 4)}) if as_json else f"{s.logprob:.4f}\t{s.per_token:.4f}\t{s.tokens}",
              flush=True)
    if not lines:
        raise DataError(f"{src} is empty")
    if not quiet:
        per = total / tokens if tokens else float("nan")
        _err(f"{lines - unscored} of {lines} lines scored, {tokens} target tokens: log-probability {total:.2f}, "
             f"{per:.4f} per token, perplexity {math.exp(min(-per, 50.0)) if tokens else float('nan'):.3f}"
             + (f"; {unscored} with an empty source not scored" if unscored else ""))


@app.command()
def average(
    model_dir: Path = typer.Argument(..., help="A run trained with training.keep_last > 0."),
    output: Path = typer.Option(..., "--output", "-o", help="The averaged model file to write."),
    last: int = typer.Option(5, "--last", "-n", help="Average this many most recent validation checkpoints."),
) -> None:
    """Average the weights of the last N checkpoints of a run into one model file (often +0.5 BLEU).

    Example:

        seqtool train -c configs/sample.yaml --set training.keep_last=5 &&
        seqtool average runs/sample -o avg.safetensors
    """
    from seqtool.checkpoint import average_models, save_model, step_models

    if last < 1:
        raise SeqtoolError("--last must be at least 1")
    if not model_dir.is_dir():  # a glob in a missing dir, or in a file, finds nothing: say which it is
        raise SeqtoolError(f"{model_dir} is a file, not a run's folder" if model_dir.exists()
                           else f"run folder not found: {model_dir}")
    paths = step_models(model_dir)[-last:]
    if not paths:
        raise SeqtoolError(f"no step*.safetensors checkpoints in {model_dir}; train with --set training.keep_last=N")
    save_model(output, average_models(paths))
    print(f"{output}: average of {len(paths)} checkpoints ({paths[0].name} .. {paths[-1].name})", file=sys.stderr)


@app.command()
def info(
    model: Path = typer.Argument(..., help="A model file, or a model dir."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of text."),
) -> None:
    """Show a model card: architecture, parameters, vocabularies, training data, steps and best scores.

    Example:

        seqtool info runs/sample
    """
    import json

    from seqtool.checkpoint import load_model, model_card, resolve_model_path

    card = model_card(load_model(model), resolve_model_path(model))
    if as_json:
        print(json.dumps(card, ensure_ascii=False))
        return
    for key, value in card.items():
        if key != "config":
            print(f"{key}: {json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value}")


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="One or more model dirs (their metrics.jsonl)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="PNG to write. Default: RUN/curves.png of the first run."),
    x: str = typer.Option("step", "--x", help="Horizontal axis: step or time (minutes)."),
) -> None:
    """Draw training curves (loss, validation perplexity and BLEU, learning rate) to a PNG.

    Several runs share the axes, one colour each, to compare them.

    Examples:

        seqtool plot runs/sample

        seqtool plot runs/gru runs/lstm --x time -o compare.png
    """
    from seqtool.plot import X_AXES, plot_curves

    if x not in X_AXES:
        raise SeqtoolError(f"--x must be one of {', '.join(X_AXES)}, not {x!r}")
    out = output or runs[0] / "curves.png"
    plot_curves(runs, out, x)
    print(f"{out}: curves of {', '.join(str(r) for r in runs)}", file=sys.stderr)


@app.command()
def serve(
    model: Path = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port."),
    beam_size: Optional[int] = BeamOpt,
    batch_size: Optional[int] = BatchOpt,
    max_lines: int = typer.Option(1000, "--max-lines", help="Most lines per request, and per decoding round."),
    wait_ms: float = typer.Option(5.0, "--batch-wait-ms",
                                  help="How long a request waits for others to share its batch."),
    max_queue: int = typer.Option(10_000, "--max-queue", help="Most lines waiting to be decoded; beyond it a request "
                                  "gets 503 at once (back-pressure)."),
    device: Optional[str] = DeviceOpt,
    quantize: Optional[bool] = QuantizeOpt,
    shortlist: Optional[int] = ShortlistOpt,
    poem_first: Optional[Path] = typer.Option(None, "--poem-first", help="Also write acrostic poems (POST /poem): this "
                                              "first-line model begins each, the served model answers each line."),
    overrides: list[str] = SetOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Serve a model over HTTP: POST /translate {"lines": [...]}, GET /health, GET /info.

    Concurrent requests are decoded together. Bad requests get 400 with {"error": ...}; a body over
    1 MB 413; a full queue 503 (retry later). It listens on 127.0.0.1 unless --host says otherwise.

    Example:

        seqtool serve -m runs/sample --port 8000 &
        curl -s localhost:8000/translate -d '{"lines": ["a line", ""]}'
    """
    flags = _decoding_flags(locals())
    from seqtool.checkpoint import load_model, model_card, resolve_model_path
    from seqtool.serve import make_app
    from seqtool.serve import serve as run_server

    if max_lines < 1 or not 0 <= wait_ms <= 10_000 or max_queue < max_lines:  # inf: every request would wait forever
        raise ConfigError("--max-lines must be at least 1, --batch-wait-ms 0 to 10,000 "
                          "and --max-queue at least --max-lines")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be a TCP port, 1 to 65535, not {port}")
    bundle = load_model(model)
    translator = _translator(model, overrides, flags, False, verbose, bundle=bundle, pieces=True)
    card = model_card(bundle, resolve_model_path(model))
    poet = None
    if poem_first is not None:
        from seqtool.poem import Poet

        first_flags = {k: v for k, v in flags.items() if k in ("beam_size", "device")}  # its own rules stay
        poet = Poet(_translator(poem_first, [], first_flags, False), translator)
    run_server(make_app(translator, card, max_lines, wait_ms=wait_ms, max_queue=max_queue, poet=poet), host, port,
               verbose)


@tokenizer_app.command("train")
def tokenizer_train(
    inputs: list[Path] = typer.Argument(..., help="Text files to learn from."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the sentencepiece model."),
    type: str = typer.Option("bpe", "--type", help="bpe, unigram, char, or word (text already split by spaces)."),
    vocab_size: int = typer.Option(8000, "--vocab-size", help="Upper bound on the number of pieces."),
) -> None:
    """Train a sentencepiece model.

    Example:

        seqtool tokenizer train train.de train.en -o joint.spm --vocab-size 8000
    """
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


TokModelOpt = typer.Option(..., "--model", "-m",
                           help="A sentencepiece model, or a seqtool model (its source tokenizer).")


@tokenizer_app.command("encode")
def tokenizer_encode(input: str = typer.Argument("-", help="Text file, or '-' for stdin."),
                     model: Path = TokModelOpt) -> None:
    """Text -> space-separated pieces, one line per line.

    Example:

        seqtool tokenizer encode -m runs/sample sample_data/test.src | head
    """
    _tokenizer_io(model, input, lambda tok, line: " ".join(tok.pieces(line)))


@tokenizer_app.command("decode")
def tokenizer_decode(input: str = typer.Argument("-", help="Pieces file, or '-' for stdin."),
                     model: Path = TokModelOpt) -> None:
    """Space-separated pieces -> text, one line per line.

    Example:

        seqtool tokenizer encode -m runs/sample test.src | seqtool tokenizer decode -m runs/sample
    """
    _tokenizer_io(model, input, lambda tok, line: tok.decode_pieces(line.split()))


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit code, never a traceback."""
    try:
        _main()
    except SystemExit as exc:  # how every command ends: Typer's own exit, or one of _main's below
        if os.environ.get("WORLD_SIZE", "1") in ("", "1"):  # as distributed.init_from_env reads it: not a rank
            raise
        _leave_as_rank(exc.code)


def _leave_as_rank(code: int | str | None) -> None:
    """End a rank of a torchrun job (`seqtool train --nproc N` starts such ranks) with `code`, skipping the
    interpreter's finalization. gloo's worker threads outlive destroy_process_group (DistributedDataParallel
    keeps the process group alive, pytorch#109478) and free each finished exchange's tensors themselves; one
    that does so while the interpreter finalizes cannot take the GIL, and the process aborts after its work
    was saved ("terminate called without an active exception"; a core dump shows ProcessGroupGloo::runLoop ->
    ~AsyncBroadcastWork -> THPVariable_dealloc -> take_gil -> pthread_exit). The launcher then reported the
    job failed: 1 run in 100 of a bare two-rank DDP script on a 2-core EPYC. Everything a rank writes is
    closed by now; only stdout and stderr may hold text."""
    if code is not None and not isinstance(code, int):  # sys.exit("why"): printed, exit 1, as Python does
        print(code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or full stream: its text is lost either way
            pass
    os._exit(0 if code is None else code if isinstance(code, int) else 1)  # as SystemExit's codes read


def _main() -> None:
    _stand_in_for_closed_streams()
    # Text in and out is UTF-8 whatever the locale says (inputs are read as UTF-8 too): a C or Latin-1
    # locale would fail on the first Chinese character written. A file name that is not UTF-8 reaches a
    # message or a model card with its bytes as surrogates: written as \udcff, not a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="backslashreplace")
    # Python's last collection at exit walks every object alive, and torch's import alone leaves 170,000: 0.2 s of
    # every command (a one-line translate: 2.2 -> 2.0 s on 2 cores). Objects frozen just before it are skipped;
    # files are still flushed and closed and exit handlers still run.
    atexit.register(gc.freeze)
    try:
        app()  # Typer handles --help, usage errors (exit 2), Ctrl-C and a closed stdout (quiet exit 1)
    except SeqtoolError as exc:
        rank = os.environ.get("RANK", "0")  # under torchrun, say which process (rank 0 speaks plainly)
        _err(f"error: {exc}" if rank == "0" else f"error (rank {rank}): {exc}")
        sys.exit(exc.exit_code)
    except OSError as exc:  # files are checked where they are opened; this is the rest (printing to a full disk)
        _err(f"error: {f'{exc.filename}: ' if exc.filename else ''}{exc.strerror or exc}")
        _drop_stdout()
        sys.exit(1)
    except Exception as exc:  # a seqtool bug: one line for the user, the traceback on request
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
                "can't allocate memory" in str(exc):  # Python's, torch's CUDA one, torch's CPU allocator's
            _err("error: out of memory; use smaller batches (training.batch_tokens or batch_sentences, "
                 "decoding.batch_size or --batch-size) or a smaller model")
            sys.exit(1)
        if os.environ.get("SEQTOOL_TRACEBACK"):
            raise
        _err(f"internal error: {type(exc).__name__}: {exc} (a bug in seqtool; SEQTOOL_TRACEBACK=1 shows where)")
        sys.exit(INTERNAL_ERROR)


class _Closed(io.RawIOBase):
    """A standard stream the command was started without (`<&-`, `>&-`): reading or writing it is an OSError
    the CLI reports in one line, as the shell's `echo hi >&-` does, rather than Python's None."""

    def __init__(self, which: str) -> None:
        self.which = which

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise OSError(errno.EBADF, f"standard {self.which} is closed")

    def write(self, data) -> int:
        raise OSError(errno.EBADF, f"standard {self.which} is closed")


def _stand_in_for_closed_streams() -> None:
    """Python starts without sys.stdin / stdout / stderr where file descriptor 0 / 1 / 2 is closed. Each is
    taken by /dev/null, so that no file opened later lands on it (a library's print to fd 1 would go into
    it); stdin and stdout read and write as `_Closed`, and stderr goes nowhere: the work is still done."""
    for fd, (name, which) in enumerate((("stdin", "input"), ("stdout", "output"), ("stderr", "error"))):
        if getattr(sys, name) is not None:
            continue
        held = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one, the ones below are open
        assert held == fd, (held, fd)
        # Unbuffered text over _Closed: a failed write leaves nothing behind to fail again at exit.
        setattr(sys, name, open(held, "w", closefd=False) if name == "stderr" else
                io.TextIOWrapper(_Closed(which), encoding="utf-8", write_through=True))


def _drop_stdout() -> None:
    """What is still buffered for stdout cannot be written either: drop it rather than fail again at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (a test's StringIO): nothing is flushed at exit
        pass


if __name__ == "__main__":
    main()

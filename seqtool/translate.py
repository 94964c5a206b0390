"""Lines in -> buffer -> sort by length -> batches -> search -> restore order -> lines out.

Exactly one output per input line, in order; empty lines give empty output without touching the
model. Streams with a bounded read-ahead buffer and flushes as soon as a chunk is done, so an
interactive pipe gets each answer before it sends the next line.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO, cast

import torch

from seqtool.config import DecodingConfig
from seqtool.constraints import LineSpec, Vocab, line_problem, make_rules, prefix_problem
from seqtool.data import make_batch
from seqtool.ensemble import Ensemble
from seqtool.errors import DataError, SeqtoolError
from seqtool.hanzi import NONE, is_punct, tone
from seqtool.model.seq2seq import Seq2Seq
from seqtool.search import Decodable, Hypothesis, argmax, beam_search, greedy, sampler
from seqtool.shortlist import BatchVocab, OutputRows, Shortlist, Shortlisted
from seqtool.tokenizer import UNK, Tokenizer
from seqtool.verse import couplet_controls


@dataclass(frozen=True)
class Source:
    """One input line and its own controls (all optional): the output begins with `prefix`, holds each
    phrase of `constraints` and none of `avoid`; a poem's lines also ask `length` characters (0: as the
    decoding config says) ending on `end_tone` (seqtool.hanzi; NONE: as the config says)."""

    text: str
    prefix: str = ""
    constraints: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()
    length: int = 0
    end_tone: int = NONE


FIELDS = ("text", "prefix", "constraints", "avoid")
SURROGATE = re.compile("[\ud800-\udfff]")  # what JSON's lone "\\ud800" and Python's surrogateescape make of non-text


def parse_source(record: object, where: str) -> Source:
    """A JSON value -> Source: a string is plain text; an object has "text" and optionally the other FIELDS.
    Any other shape is a DataError naming `where` and the field."""
    if isinstance(record, str):
        return Source(record)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with \"text\" or a string, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    if not isinstance(record.get("text"), str):
        raise DataError(f"{where}: \"text\" must be given, as a string")
    if not isinstance(record.get("prefix", ""), str):
        raise DataError(f"{where}: \"prefix\" must be a string")
    lists = {}
    for key in ("constraints", "avoid"):
        value = record.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: \"{key}\" must be a list of strings")
        lists[key] = tuple(value)
    return Source(record["text"], record.get("prefix", ""), lists["constraints"], lists["avoid"])


def parse_jsonl(lines: Iterable[str]) -> Iterator[Source]:
    """JSON lines (one object, or string, per line; an empty line is an empty input) -> Sources."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            yield Source("")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:  # the parser recurses per level: [[[[... a hundred thousand deep
            raise DataError(f"line {lineno}: not valid JSON here (nested too deeply)") from None
        yield parse_source(record, f"line {lineno}")


@dataclass(frozen=True)
class Prepared:
    """A line ready for the search: source ids and its controls in target ids."""

    ids: list[int]
    spec: LineSpec


@dataclass
class Translation:
    text: str
    hypotheses: list[tuple[str, float]] = field(default_factory=list)  # n-best (text, score)
    src_pieces: list[str] = field(default_factory=list)  # the source as the model saw it
    pieces: list[str] = field(default_factory=list)  # the best output's pieces
    attention: Optional[list[list[float]]] = None  # (output pieces + </s>) x source pieces, when asked


def source_ids(tok: Tokenizer, text: str, truncate_src: int, limit: int, warn: Callable[[str], None],
               lineno: int) -> list[int]:
    """A source line as the model reads it: cut to data.truncate_src silently, as in training, then to
    decoding.max_input_tokens with a warning (translation and scoring alike)."""
    ids = tok.encode(text)
    if truncate_src:
        ids = ids[:truncate_src]
    if len(ids) > limit:
        warn(f"line {lineno}: {len(ids)} tokens, truncated to {limit} (decoding.max_input_tokens)")
        ids = ids[:limit]
    return ids


def attention_weights(model: Seq2Seq, src: list[int], tokens: list[int]) -> list[list[float]]:
    """Attention of each output step (tokens, then EOS) over the source, by teacher-forcing `tokens`."""
    batch = make_batch([src], [tokens]).to(model.device)
    state = model.encode(batch.src, batch.src_lens)
    rows = []
    for t in range(batch.tgt_in.size(1)):
        _, state, weights = model.step(batch.tgt_in[:, t], state)
        assert weights is not None  # Translator rejects with_attention for models without context attention
        rows.append([round(w, 4) for w in weights[0, : len(src)].tolist()])
    return rows


@dataclass
class Translator:
    model: Seq2Seq
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    decoding: DecodingConfig
    truncate_src: int = 0  # data.truncate_src: sources are cut to this many tokens, silently
    warn: Callable[[str], None] = lambda message: None
    with_attention: bool = False  # fill Translation.attention (attention models only)
    with_pieces: bool = False  # fill Translation.src_pieces / pieces (JSON output); off in plain text, the hot path
    shortlist: Optional[Shortlist] = None  # the model file's table, used when decoding.shortlist is set
    prefix: str = ""  # every line's prefix, unless the line has its own
    avoid: tuple[str, ...] = ()  # phrases no line's output holds, besides each line's own
    drop_prefix: bool = False  # outputs without their prefix
    others: tuple[Seq2Seq, ...] = ()  # an ensemble's further members, with the same tokenizers (seqtool.ensemble)
    _output_rows: list[OutputRows] = field(default_factory=list, init=False)  # each member's output layer: shortlists
    # phrase to avoid -> its spellings (--avoid-file: every line)
    _spelled: dict = field(default_factory=dict, init=False)
    _vocabs: dict = field(default_factory=dict, init=False)  # with tones or not -> the rules' Vocab, built once

    def __post_init__(self) -> None:
        if self.with_attention and self.model.decoder.mode.score is None:
            raise SeqtoolError("attention weights need a model with context 'attention'; this model's decoder "
                               "does not attend")
        if self.decoding.shortlist and self.shortlist is None:
            raise SeqtoolError("decoding.shortlist: this model file has no shortlist table "
                               "(trained by an older seqtool); decode without --shortlist, or train it again")
        if self.with_attention and self.others:
            raise SeqtoolError("attention weights are one model's: an ensemble has none (use one -m)")
        if self.decoding.shortlist:
            self._output_rows = [OutputRows.of(m.output) for m in (self.model, *self.others)]

    def prepare(self, line: str | Source, lineno: int = 1) -> Optional[Prepared]:
        """Tokenize a line and its controls; None for an empty line. A control that cannot be met is a
        DataError naming the line, raised before any line of its batch is searched."""
        source = line if isinstance(line, Source) else Source(line)
        if not source.text.strip():
            return None
        for what, value in (("it", source.text), ("the prefix", source.prefix or self.prefix),
                            *(("a constraint", c) for c in source.constraints),
                            *(("an avoided phrase", a) for a in (*source.avoid, *self.avoid))):
            if half := SURROGATE.search(value):  # no tokenizer takes one: sentencepiece raised a RuntimeError
                raise DataError(f"line {lineno}: {what} holds {half.group()!r}, half of a UTF-16 pair, not a "
                                "character (a lone \\u escape in JSON, or bytes not UTF-8 on the command line)")
        ids = source_ids(self.src_tok, source.text, self.truncate_src, self.decoding.max_input_tokens, self.warn,
                         lineno)
        d = self.decoding
        text = source.prefix or self.prefix
        where = f"line {lineno}"
        prefix = self._target(text, "the prefix", where) if text else ()
        positions, chars = None, None
        if source.length:  # no upper line to answer: every position free
            positions = (-1,) * source.length
        elif d.exact_length:
            src_p, tgt_p = self.src_tok.punctuation, self.tgt_tok.punctuation
            to_tgt = {i: tgt_p[piece] for piece, i in src_p.items() if piece in tgt_p} if d.copy_punctuation else {}
            positions = tuple(to_tgt.get(i, -1) for i in ids)
            chars = self.src_tok.words(source.text)[: len(ids)]  # as typed: an unknown character stays itself
            if all(i == UNK for i in ids):
                raise DataError(f"line {lineno}: none of its characters is in the model's vocabulary "
                                "(this model answers lines of one character per position, as couplets)")
            uncopied = next((c for c, p in zip(chars, positions) if d.copy_punctuation and p < 0 and is_punct(c)), None)
            if uncopied is not None:
                raise DataError(f"line {lineno}: the punctuation {uncopied!r} is not in the model's vocabulary, so it "
                                "cannot be copied in place (the training data may write it another way, as ， for ,)")
        mirror, echo, tones = (couplet_controls(chars, len(positions), d, source.end_tone, len(prefix)) if positions
                               else (None,) * 3)
        spec = LineSpec(len(ids), positions, prefix,
                        tuple(self._target(p, "a constraint", where) for p in source.constraints),
                        tuple(spelled for p in (*source.avoid, *self.avoid)
                              for spelled in self.spellings(p, "an avoided phrase", where)),
                        mirror, tuple(self._target_id(c) for c in echo) if echo else None, tones)
        problem = line_problem(spec, d, self._free_banned, self.tgt_tok.glue_ids) or \
            prefix_problem(spec, d, self._vocab(spec))
        if problem:
            raise DataError(f"line {lineno}: {problem}")
        return Prepared(ids, spec)

    def _target(self, text: str, what: str, where: str) -> tuple[int, ...]:
        """A control's text in target ids; refused if the model could not produce it as given."""
        ids = self.tgt_tok.encode(text)
        shown = repr(text if len(text) <= 40 else text[:40] + "...")
        if not ids:
            raise DataError(f"{where}: {what} is empty")
        if UNK in ids:
            raise DataError(f"{where}: {what} {shown} holds a word or character the model's target "
                            "vocabulary lacks")
        if set(ids) & set(self.tgt_tok.unsafe_ids):
            raise DataError(f"{where}: {what} {shown} holds a control character or a line break")
        return tuple(ids)

    def spellings(self, text: str, what: str, where: str) -> list[tuple[int, ...]]:
        """A phrase to avoid in every spelling of it in pieces: a model may not spell it as the tokenizer does.
        Computed once per phrase: the same ones (an avoid file) come with every line."""
        if text not in self._spelled:
            canonical = self._target(text, what, where)
            unsafe = set(self.tgt_tok.unsafe_ids)
            self._spelled[text] = [canonical, *(tuple(ids) for ids in self.tgt_tok.spellings(text)[1:]
                                                if not set(ids) & unsafe)]
        return self._spelled[text]

    def _target_id(self, word: str) -> int:
        """A source token's text as a target id, -1 if the target vocabulary lacks it (or there is no text)."""
        i = self.tgt_tok.sp.piece_to_id("\u2581" + word) if word else UNK
        return -1 if i == UNK else i

    @property
    def _free_banned(self) -> list[int]:
        """Copied punctuation appears only where the input has it."""
        return list(self.tgt_tok.punctuation.values()) if self.decoding.copy_punctuation else []

    def _vocab(self, *specs: LineSpec) -> Vocab:
        """The target vocabulary as the rules of these lines need it (tones only where one is asked); built once
        per kind, as every batch asks for it."""
        with_tones = any(spec.tones for spec in specs)
        if with_tones not in self._vocabs:
            tok = self.tgt_tok
            tones = (tuple(tone(piece.removeprefix("\u2581")) for piece in tok.id_pieces(range(tok.vocab_size)))
                     if with_tones else ())
            self._vocabs[with_tones] = Vocab(tok.vocab_size, tuple(tok.unsafe_ids), tuple(self._free_banned),
                                             tuple(tok.glue_ids), tones)
        return self._vocabs[with_tones]

    def search(self, lines: list[Prepared]) -> list[list[Hypothesis]]:
        """Decode a batch of prepared lines."""
        device = self.model.device
        ids = [p.ids for p in lines]
        batch = make_batch(ids, [[0]] * len(ids)).to(device)
        d = self.decoding
        vocabs = self.batch_vocabs(ids, [p.spec.required_tokens() for p in lines]) if d.shortlist else []
        vocab = vocabs[0] if vocabs else None  # the members' lists are the same; their output layers their own
        members: list[Decodable] = [self.model, *self.others]
        if vocabs:
            members = [Shortlisted(m, v) for m, v in zip((self.model, *self.others), vocabs)]
        model = members[0] if len(members) == 1 else Ensemble(members)
        specs = [p.spec for p in lines]
        rules = make_rules(specs, d, self._vocab(*specs), None if vocab is None else vocab.ids, device)
        if d.sample or (d.beam_size == 1 and d.nbest == 1):
            pick = sampler(d.temperature, d.top_k, d.top_p, d.seed) if d.sample else argmax
            hyps = greedy(model, batch.src, batch.src_lens, rules, d.length_penalty, pick)
        else:
            hyps = beam_search(model, batch.src, batch.src_lens, rules, d.beam_size, d.length_penalty, d.nbest,
                               d.coverage_penalty)
        return hyps if vocab is None else vocab.mapped(hyps)

    def batch_vocabs(self, ids: list[list[int]], required: list[list[int]]) -> list[BatchVocab]:
        """The shortlist of each source of a batch (with the tokens its rules require), their union, and each
        member's output layer cut to the union."""
        assert self.shortlist is not None and self._output_rows
        d = self.decoding
        own = self.shortlist.rows(ids, d.shortlist, d.shortlist_frequent, self.src_tok is self.tgt_tok, required,
                                  self.tgt_tok.vocab_size)
        union = own.any(0).nonzero().squeeze(1)  # sorted: ids 0..EOS sit at positions 0..EOS
        allowed = own[:, union]
        # Every line holding the whole union (one line, or alike ones) needs no mask at each step.
        mask = None if bool(allowed.all()) else allowed.to(self.model.device)
        union = union.to(self.model.device)
        return [BatchVocab(union, rows.restricted(union), mask) for rows in self._output_rows]

    def translate(self, lines: Sequence[str | Source], first_lineno: int = 1) -> list[Translation]:
        """Translate lines in any order of length; the result has one entry per line, in order."""
        return self.run([self.prepare(line, first_lineno + i) for i, line in enumerate(lines)], first_lineno)

    def run(self, lines: list[Optional[Prepared]], first_lineno: int = 1) -> list[Translation]:
        """Translate prepared lines (None: an empty line, an empty output) in batches of similar length."""
        out = [Translation("") for _ in lines]
        work = sorted(((i, p) for i, p in enumerate(lines) if p is not None), key=lambda item: len(item[1].ids))
        step = self.decoding.batch_size
        with torch.inference_mode():
            for start in range(0, len(work), step):
                chunk = work[start : start + step]
                for (i, p), hyps in zip(chunk, self.search([p for _, p in chunk])):
                    if not hyps[0].complete:
                        self.warn(f"line {first_lineno + i}: the decoding rules left no way to end the output; "
                                  "it is the best unfinished hypothesis")
                    out[i] = self._translation(p, hyps)
        return out

    def _translation(self, line: Prepared, hyps: list[Hypothesis]) -> Translation:
        drop = len(line.spec.prefix) if self.drop_prefix else 0
        texts = [(self.tgt_tok.decode(h.tokens[drop:]), h.score) for h in hyps]
        best = hyps[0].tokens if hyps else []
        pieces = self.with_pieces or self.with_attention
        return Translation(texts[0][0] if texts else "", texts, self.src_tok.id_pieces(line.ids) if pieces else [],
                           self.tgt_tok.id_pieces(best[drop:]) if pieces else [],
                           attention_weights(self.model, line.ids, best)[drop:] if self.with_attention else None)


PATIENCE = 0.05  # seconds a chunk waits for its next line: far longer than reading one, short for a person


def read_ahead(lines: Iterable[str | Source], max_chunk: int,
               patience: float = PATIENCE) -> Iterator[list[str | Source]]:
    """Group lines into chunks of at most `max_chunk`, never waiting long for input that is not coming.

    A reader thread pulls lines into a bounded queue; a chunk ends when it is full or when no further
    line arrives within `patience` seconds, so a file or a fast pipe gives full chunks and an
    interactive pipe gives one line at a time. Ending a chunk only when the queue is momentarily empty
    made the chunks of a file depend on thread timing, and with them the batches, the shortlist and
    int8 scales: outputs changed from run to run. Errors raised while reading surface after the lines
    before them were yielded.
    """
    q: queue.Queue = queue.Queue(maxsize=2 * max_chunk)
    done = object()

    def pump() -> None:
        try:
            for line in lines:
                q.put(line)
        except BaseException as exc:  # re-raised in the consumer, in order
            q.put(exc)
        q.put(done)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        item = q.get()
        chunk: list[str | Source] = []
        while True:
            if item is done or isinstance(item, BaseException):
                if chunk:
                    yield chunk
                if item is done:
                    return
                raise cast(BaseException, item)  # not done: the exception pump() put
            chunk.append(item)
            if len(chunk) >= max_chunk:
                break
            try:
                item = q.get(timeout=patience)
            except queue.Empty:
                break
        yield chunk


def translation_record(t: Translation) -> dict:
    """The JSON form: text, n-best with scores, pieces, and attention weights when computed."""
    record: dict[str, Any] = {"text": t.text, "nbest": [{"text": s, "score": round(sc, 4)} for s, sc in t.hypotheses],
                              "src_pieces": t.src_pieces, "pieces": t.pieces}
    if t.attention is not None:
        record["attention"] = t.attention
    return record


def format_translation(t: Translation, fmt: str) -> str:
    return json.dumps(translation_record(t), ensure_ascii=False) if fmt == "json" else t.text


def translate_stream(translator: Translator, lines: Iterable[str | Source], out: TextIO, fmt: str = "text",
                     each: Optional[Callable[[int, Translation], None]] = None) -> int:
    """Translate a stream of lines to `out`, flushing after each chunk; returns the line count.

    `each(line number, translation)` is called for every line once it is written.
    """
    n = 0
    for chunk in read_ahead(lines, translator.decoding.buffer_lines):
        prepared, error = [], None
        for i, line in enumerate(chunk):
            try:
                prepared.append(translator.prepare(line, n + 1 + i))
            except Exception as exc:  # bad input, or a bug: the lines before it are still translated and written
                error = exc
                break
        for lineno, t in enumerate(translator.run(prepared, first_lineno=n + 1), n + 1):
            out.write(format_translation(t, fmt) + "\n")
            if each:
                each(lineno, t)
        out.flush()
        n += len(prepared)
        if error is not None:
            raise error
    return n

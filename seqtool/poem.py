"""Acrostic poems (藏头诗): line k begins with head k; the first line grows from its head, each later one
answers the line before it.

Two models: the first-line model is one-to-many (a head character -> a line; configs/poem_first.yaml),
the next-line model answers a line with a line (a couplet model, exact length). Each head is the prefix
of its line; with tones on, the odd lines end on 仄 and the even lines on 平 (the rhyme positions of a
quatrain), through the same Tone rule as couplets. The next-line model's own rules (repeats mirrored,
no echo) apply as in any couplet.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from seqtool.errors import DataError, SeqtoolError
from seqtool.hanzi import NONE, PING, ZE
from seqtool.tokenizer import UNK
from seqtool.translate import Source, Translator

MAX_CHARS = 32  # the longest lines of the couplet data


@dataclass
class Poet:
    first: Translator  # a head character -> a line
    next: Translator  # a line -> the line answering it
    tones: bool = True  # odd lines end on 仄, even lines on 平

    def __post_init__(self) -> None:
        if not self.next.decoding.exact_length:
            raise SeqtoolError("the next-line model must answer with a line of the same length "
                               "(decoding.exact_length: true, as a couplet model)")

    def heads(self, text: str, lineno: int) -> list[str]:
        """The head characters of one poem; a DataError names the first that cannot head a line."""
        heads = [c for c in text if not c.isspace()]
        if not heads:
            raise DataError(f"line {lineno}: no head characters")
        for c in heads:
            if unicodedata.east_asian_width(c) not in ("W", "F") or unicodedata.category(c).startswith("P"):
                raise DataError(f"line {lineno}: the head {c!r} is not a Chinese character")
            for what, tok in (("first-line model's input", self.first.src_tok), ("first-line model's output", self.first.tgt_tok),
                              ("next-line model's output", self.next.tgt_tok)):
                if tok.encode(c) == [UNK]:
                    raise DataError(f"line {lineno}: the head {c!r} is not in the {what} vocabulary")
        return heads

    def write(self, poems: list[str], chars: int, first_lineno: int = 1) -> list[list[str]]:
        """Each poem's lines (one per head, `chars` characters each, unspaced), for a batch of heads strings."""
        if not 2 <= chars <= MAX_CHARS:
            raise SeqtoolError(f"--chars {chars}: a line has 2 to {MAX_CHARS} characters")
        heads = [self.heads(text, first_lineno + i) for i, text in enumerate(poems)]
        lines: list[list[str]] = [[] for _ in poems]
        for k in range(max(map(len, heads))):
            end = (ZE if k % 2 == 0 else PING) if self.tones else NONE
            todo = [i for i, h in enumerate(heads) if k < len(h)]
            if k == 0:
                sources = [Source(heads[i][0], prefix=heads[i][0], length=chars, end_tone=end) for i in todo]
                out = self.first.translate(sources, first_lineno)
            else:
                sources = [Source(" ".join(lines[i][-1]), prefix=heads[i][k], end_tone=end) for i in todo]
                out = self.next.translate(sources, first_lineno)
            for i, t in zip(todo, out):
                lines[i].append(t.text.replace(" ", ""))
        return lines

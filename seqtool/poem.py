"""Acrostic poems (藏头诗): line k begins with head k; the first line grows from its head, each later one
answers the line before it.

Two models: the first-line model is one-to-many (a head character -> a line; configs/poem_first.yaml),
the next-line model answers a line with a line (a couplet model, exact length). Each head is the prefix
of its line; with tones on, the odd lines end on 仄 and the even lines on 平 (the rhyme positions of a
quatrain), through the same Tone rule as couplets. The next-line model's own rules (repeats mirrored,
no echo) apply as in any couplet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from seqtool.errors import DataError, SeqtoolError
from seqtool.hanzi import NONE, PING, ZE, is_punct, is_wide
from seqtool.tokenizer import UNK
from seqtool.translate import Source, Translator

MAX_CHARS = 32  # the longest lines of the couplet data


@dataclass
class Poet:
    first: Translator  # a head character -> a line
    next_line: Translator  # a line -> the line answering it
    # odd lines end on 仄, even lines on 平; False: no tone asked, the next-line model's own rule off too
    tones: bool = True

    def __post_init__(self) -> None:
        if not (self.first.tgt_tok.word and self.next_line.decoding.exact_length):
            raise SeqtoolError("a poem needs a first-line model that writes characters (tokenizer.type word) and a "
                               "next-line model that answers with a line of the same length (decoding.exact_length, "
                               "as a couplet model)")
        if not self.tones and self.next_line.decoding.final_tone:
            self.next_line = replace(self.next_line,
                                     decoding=self.next_line.decoding.model_copy(update={"final_tone": False}))

    def heads(self, text: str, lineno: int) -> list[str]:
        """The head characters of one poem; a DataError names the first that cannot head a line."""
        heads = [c for c in text if not c.isspace()]
        if not heads:
            raise DataError(f"line {lineno}: no head characters")
        for c in heads:
            if not is_wide(c) or is_punct(c):
                raise DataError(f"line {lineno}: the head {c!r} is not a Chinese character")
            for what, tok in (("first-line model's input", self.first.src_tok),
                              ("first-line model's output", self.first.tgt_tok),
                              ("next-line model's output", self.next_line.tgt_tok)):
                if tok.encode(c) == [UNK]:
                    raise DataError(f"line {lineno}: the head {c!r} is not in the {what} vocabulary")
        return heads

    def write(self, poems: list[str], chars: int, first_lineno: int = 1) -> list[list[str]]:
        """Each poem's lines (one per head, `chars` characters each, unspaced), for a batch of heads strings;
        errors name the heads string's line number."""
        if not 2 <= chars <= MAX_CHARS:
            raise DataError(f"a poem's lines have 2 to {MAX_CHARS} characters, not {chars}")
        heads = [self.heads(text, first_lineno + i) for i, text in enumerate(poems)]
        lines: list[list[str]] = [[] for _ in poems]
        for k in range(max(map(len, heads))):
            end = (ZE if k % 2 == 0 else PING) if self.tones else NONE
            todo = [i for i, h in enumerate(heads) if k < len(h)]
            if k == 0:
                translator, sources = self.first, [Source(heads[i][0], heads[i][0], length=chars, end_tone=end)
                                                   for i in todo]
            else:
                translator = self.next_line
                sources = [Source(" ".join(lines[i][-1]), heads[i][k], end_tone=end) for i in todo]
            out = translator.run([translator.prepare(s, first_lineno + i) for i, s in zip(todo, sources)])
            for i, t in zip(todo, out):
                lines[i].append(t.text.replace(" ", ""))
        return lines

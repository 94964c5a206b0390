"""Characters of Chinese verse: tones (平仄), punctuation and repetition, for couplet metrics and rules.

Tones are a modern-Mandarin approximation, as published couplet work uses: a character's tone is the tone of
its first (most common) reading in pypinyin's dictionary; 平 (level) = tones 1 and 2, 仄 (oblique) =
tones 3 and 4. Classical prosody counts the 入声 (entering-tone) characters as 仄 whatever their
modern tone; here they are read by their modern tone, so some count as 平 (一 yī, 十 shí, 白 bái).
Characters without a reading (punctuation, Latin letters, digits) and the neutral tone have none.
"""

from __future__ import annotations

import unicodedata
from functools import cache

NONE, PING, ZE = 0, 1, 2


@cache
def tone(char: str) -> int:
    """PING, ZE or NONE for one character (anything but a single character has NONE)."""
    if len(char) != 1 or char.isspace():
        return NONE
    from pypinyin import Style, pinyin  # imported here: only couplets need it, and it loads a large table

    reading = pinyin(char, style=Style.TONE3, heteronym=False, errors="ignore")
    digit = reading[0][0][-1:] if reading and reading[0] else ""
    return PING if digit in ("1", "2") else ZE if digit in ("3", "4") else NONE


def opposite(t: int) -> int:
    """The tone that answers `t` (平 answers 仄 and the other way round); NONE answers NONE."""
    return {PING: ZE, ZE: PING}.get(t, NONE)


def is_wide(c: str) -> bool:
    """A character East Asian scripts write one per cell (CJK ideographs, kana, hangul, full-width marks):
    words without spaces between them."""
    return unicodedata.east_asian_width(c) in ("W", "F")


def is_punct(token: str) -> bool:
    """Whether a character (or a token of several) is punctuation only."""
    return bool(token) and all(unicodedata.category(c).startswith("P") for c in token)


def repetition_pattern(chars: list[str]) -> list[object]:
    """Per position: the first position of the same character (or token) (punctuation: the mark itself), so that
    春春 and 秋秋 share a pattern ([0, 0]), as do 山外山 and 楼上楼 ([0, 1, 0])."""
    first: dict[str, int] = {}
    return [c if is_punct(c) else first.setdefault(c, i) for i, c in enumerate(chars)]

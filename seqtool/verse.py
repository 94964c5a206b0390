"""Chinese verse: the rules of a couplet's lower line, derived from its upper line, as per-position controls.

The search enforces them through seqtool.constraints (Mirror, NoEcho, Tone); this module only says,
for one line, what they ask at each position of the exact-length output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, cast

from seqtool.config import DecodingConfig
from seqtool.hanzi import NONE, is_punct, opposite, repetition_pattern, tone

Controls = tuple[Optional[tuple[int, ...]], Optional[tuple[str, ...]], Optional[tuple[int, ...]]]


def couplet_controls(chars: Optional[Sequence[str]], length: int, d: DecodingConfig, end_tone: int = NONE,
                     fixed: int = 0) -> Controls:
    """(mirror pattern, the character not to echo at each position, the tone asked at each position) for an
    output of `length` characters answering the upper line `chars` (one per position; None: no upper
    line, as for a poem's first line). Each is None where its rule is off. `end_tone` (seqtool.hanzi), if
    given, is the tone the last character must have, whatever `decoding.final_tone` would ask. The first
    `fixed` positions are the user's choice (a prefix): no echo ban or tone rule asks anything of them,
    nor of the positions that must repeat them; but an asked `end_tone` (a poem's) is the user's choice
    too, so there the last position need not repeat a prefix position (a head can have the wrong tone)."""
    pattern: Optional[list[int]]
    if chars is None:
        pattern, content, want = None, list(range(length)), end_tone
    else:
        pattern = [-1 if is_punct(c) else cast(int, p) for c, p in zip(chars, repetition_pattern(list(chars)))]
        content = [i for i, p in enumerate(pattern) if p >= 0]
        want = end_tone
        if want == NONE and d.final_tone and content:
            want = opposite(tone(chars[content[-1]]))
    mirror = tuple(pattern) if pattern is not None and d.mirror_repeats else None
    if mirror is not None and end_tone != NONE and content and 0 <= mirror[content[-1]] < fixed:
        mirror = tuple(content[-1] if i == content[-1] else p for i, p in enumerate(mirror))  # new, not the head

    def chosen(i: int) -> bool:
        return i < fixed or (mirror is not None and 0 <= mirror[i] < fixed)

    echo = None
    if chars is not None and d.no_echo:
        echo = tuple("" if is_punct(c) or chosen(i) else c for i, c in enumerate(chars))
    tones = None
    if want != NONE and content:
        last = content[-1]
        # with repetition mirrored, the positions that repeat the last character must have its tone too
        tied = {i for i in content if mirror is not None and mirror[i] == mirror[last]} | {last}
        if not any(map(chosen, tied)):
            tones = tuple(want if i in tied else -1 for i in range(length))
    return mirror, echo, tones

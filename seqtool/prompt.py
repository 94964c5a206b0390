"""`seqtool translate -i`: a prompt on a terminal; a line in, its translation (and its n-best) out.

Line editing and history with the arrow keys come from Python's readline. Ctrl-D ends; Ctrl-C drops the
line being typed. A line that cannot be translated (a control that cannot be met) is one error line, and
the prompt goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from seqtool.errors import SeqtoolError
from seqtool.translate import Translator, format_translation


def run_prompt(translator: Translator, fmt: str, err: Callable[[str], None], out: TextIO = sys.stdout) -> int:
    """Translate what is typed until end of input; returns the count of lines translated."""
    try:
        import readline  # noqa: F401  (imported for its effect: input() edits lines and keeps a history)
    except ImportError:  # a Python built without it: plain input() still works
        pass
    # The prompt goes where the user looks: with stdout redirected, to stderr, so the output file holds
    # translations only.
    prompt = "> " if out.isatty() else ""
    n = typed = 0
    while True:
        if not prompt:
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            line = input(prompt)
        except EOFError:
            sys.stderr.write("\n")
            return n
        except KeyboardInterrupt:
            sys.stderr.write("\n")
            continue
        typed += 1  # errors name the line as typed, counting empty ones, as a file's are counted
        if not line.strip():
            continue
        try:
            [t] = translator.translate([line], first_lineno=typed)
        except SeqtoolError as exc:
            err(f"error: {exc}")
            continue
        out.write(format_translation(t, fmt) + "\n")
        if fmt == "text" and len(t.hypotheses) > 1:
            for k, (text, score) in enumerate(t.hypotheses, 1):
                out.write(f"  {k}. {text}  ({score:.3f})\n")
        out.flush()
        n += 1

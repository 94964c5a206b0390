"""The one exception family for mistakes a user can make; the CLI catches it once."""

import re

# Characters that end a line (str.splitlines splits on several) or reach a terminal as a command: Unicode
# Cc (line feed, carriage return, escape, NEL, ...) and the line and paragraph separators. Never in an
# output line, never in an error line.
LINE_BREAKERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(message: str) -> str:
    """`message` with each LINE_BREAKERS character escaped (a file name or a value read from a damaged
    file may hold one), so that an error is exactly one line."""
    return LINE_BREAKERS.sub(lambda m: repr(m.group())[1:-1], message)


class SeqtoolError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""

    exit_code = 1


class ConfigError(SeqtoolError):
    """Invalid configuration file, override or flag value."""

    exit_code = 2


class DataError(SeqtoolError):
    """Unreadable, misaligned or badly encoded input text."""


class ModelFileError(SeqtoolError):
    """A model file that is missing, damaged, foreign or of an unsupported version."""

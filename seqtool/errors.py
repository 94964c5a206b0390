"""The one exception family for mistakes a user can make; the CLI catches it once."""


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

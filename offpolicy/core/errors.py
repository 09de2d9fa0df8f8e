"""The errors a user sees: `ConfigError` (bad input, exit 2) and `one_line` (any error in one line).

Reads: nothing. Writes: nothing.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config key or value, model path or run folder. The message is one line and names
    the key; the command line prints it and exits 2."""


def one_line(e: BaseException) -> str:
    """`Type: first line` of an error; for a Ray task error, of the error raised in the role."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"

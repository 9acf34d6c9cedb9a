"""Errors that users see: what is wrong and what to change."""

from __future__ import annotations

import reprlib
from typing import Any

# Messages echo what the user gave, cut short: a value can be megabytes (a YAML alias bomb, a
# pasted file) and an error line must stay a line.
_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = 60
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = _ECHO.maxset = 6
_ECHO.maxlevel = 3


class ConfigError(ValueError):
    """A bad experiment config, task, plugin or checkpoint: the message says what to change."""


class TrainingAborted(RuntimeError):
    """A run stopped on a fault it cannot recover from in-process (a rank that stopped answering,
    too many non-finite steps, a checkpoint that could not be written); the message says what
    happened, where, and how to continue."""


def shorten(value: Any) -> str:
    """`repr(value)` cut short, for an error message that echoes it."""
    try:
        return _ECHO.repr(value)
    except ValueError:  # an integer past Python's 4300-digit limit for str()
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else f"<a {type(value).__name__}>"


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters (the cut marked with ...)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."

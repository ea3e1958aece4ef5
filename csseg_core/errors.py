"""Errors that reach the user as one line (the CLI prints ``str(err)`` and exits non-zero).

Every message names the offending thing (file, key, value) and the fix.
"""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line errors."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


class CssegError(Exception):
    """Base class of every user-facing csseg error."""

    exit_code = 2


class ConfigError(CssegError):
    """An unknown scenario, method, option, key or a value of the wrong type."""


class DataError(CssegError):
    """A missing data root or list file, a corrupt image, a bad label map, an empty step."""


class TrainingError(CssegError):
    """Training cannot go on (e.g. a loss term became NaN or infinite)."""

    exit_code = 3

"""Errors that mean "the user's input is wrong" (exit code 2, one clear line, no traceback)."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(Exception):
    """Bad input: a missing file or column, an inconsistent table, a bad flag value.

    The message names the file, block, column or flag and what was expected. The CLI prints it
    on one line and exits with code 2 (a traceback only with ``--verbose``).
    """

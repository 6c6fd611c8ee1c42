"""Errors that mean "the user's input is wrong" (exit code 2, one clear line, no traceback)."""

from __future__ import annotations

__all__ = ["InputError", "OutputRefused", "Terminated"]


class InputError(Exception):
    """Bad input: a missing file or column, an inconsistent table, a bad flag value.

    The message names the file, block, column or flag and what was expected. The CLI prints it
    on one line and exits with code 2 (a traceback only with ``--verbose``).
    """


class OutputRefused(InputError):
    """The output folder cannot be used (it would overwrite an input, is a file, cannot be
    written, or another run holds its lock). Nothing is written into it, not even the log line
    or a pipeline marker (exit code 2)."""


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
    """The process received SIGTERM (raised by the handler ``polish3d align`` installs, so that
    clean-up and the pipeline failure marker run; exit code 143)."""

    def __init__(self, signum: int = 15):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum

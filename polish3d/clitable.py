"""Typer commands whose options are one table: ``{name: (type, default, help)}``, in order.

typer reads a command's options from the function signature; :func:`add_table_command` gives a
``**values`` function the keyword-only signature the table describes, so each option is
written once (no signature, alias and mapping lists to keep in step).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer

__all__ = ["OptionRows", "add_table_command", "options_signature"]

OptionRows = Mapping[str, tuple[Any, Any, str]]
"""Option name (the flag without ``--``) → (type, default, help)."""


def options_signature(rows: OptionRows) -> inspect.Signature:
    """One keyword-only parameter ``--<name>`` per row, annotated for typer."""
    return inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                          annotation=Annotated[kind, typer.Option(f"--{name}", help=help_text)])
        for name, (kind, default, help_text) in rows.items()
    ])


def add_table_command(app, name: str, rows: OptionRows, action: Callable[[dict[str, Any]], None],
                      run: Callable[[Callable[[], None]], None], doc: str) -> None:
    """Add command ``name`` to the typer ``app``: it parses the options of ``rows`` and calls
    ``action({name: value})`` through ``run`` (which maps errors to exit codes); ``doc`` is its
    help text."""

    def command(**values) -> None:
        run(lambda: action(values))

    command.__doc__ = doc
    command.__signature__ = options_signature(rows)
    app.command(name)(command)

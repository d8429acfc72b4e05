"""Building blocks for ``chx-masks`` commands that other packages contribute.

A package adds a command with an entry point in the group
``chx_masks.commands`` (:data:`COMMANDS_GROUP`) that names a
:class:`click.Command`; ``chx-masks`` loads it only when the command is
named or listed, so its module should import its heavy dependencies inside
the command. The Bluesky integration contributes ``process`` and ``demo``
this way (``bluesky_callbacks.commands``). A command shares the group's
options through :func:`pass_state` (:class:`State`: ``--uri``,
``--profile``, ``--dir`` and the registry they choose), fails with
:class:`CommandFailure` (one line, ``chx-masks: ...``, exit status 1), and
prints JSON, tables and files as the built-in commands do.

Examples
--------
>>> import click
>>> from chx_masks.cli import CommandFailure, json_option, pass_state, print_json
>>> @click.command("count")
... @json_option
... @pass_state
... def count(state, as_json):
...     '''How many masks are current.'''
...     records = state.registry.search()
...     if not records:
...         raise CommandFailure("No masks registered.")
...     if as_json:
...         print_json({"masks": len(records)})
...     else:
...         click.echo(f"{len(records)} masks")
>>> count.name
'count'
"""

from __future__ import annotations

from ._cli import COMMANDS_GROUP, pass_state
from ._cli import _Failure as CommandFailure
from ._cli import _json_option as json_option
from ._cli import _percent as percent
from ._cli import _print_json as print_json
from ._cli import _State as State
from ._cli import _table as table
from ._cli import _wrote as wrote

__all__ = [
    "COMMANDS_GROUP",
    "CommandFailure",
    "State",
    "json_option",
    "pass_state",
    "percent",
    "print_json",
    "table",
    "wrote",
]

"""What every `meter` command shares: the one rule for bad input.

A user error is one line on stderr naming what is wrong, exit status
`EXIT_USAGE` (2), no traceback.  `meter.cli` and the command modules it wires
(`meter.report.commands`) both raise `CommandError`; it lives here, below both,
so that neither has to import the other to reach it.
"""

from __future__ import annotations

EXIT_USAGE = 2


class CommandError(Exception):
    """A user error in a command; printed as one line, exit status `EXIT_USAGE`."""

"""Errors that cross packages, in a module that imports nothing of meter's.

`StartupError` is raised by the config, the server and the ledger alike; the
DuckDB ledger process imports it without loading the config's pydantic models
(11 MB of its resident memory).
"""

from __future__ import annotations


class StartupError(Exception):
    """Start-up failed for a reason the user can fix; the message names the setting
    (or the file, or the process in the way).  The CLI prints it as one line, exit 2."""

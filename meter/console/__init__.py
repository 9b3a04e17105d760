"""The web console on the admin port (SPEC §12): `/`, its static files, and `/api/requests`.

The page is static HTML, CSS and JavaScript shipped in this package (no CDN, no
build step); everything it shows comes from the admin API: `/api/report` (the
same query code as `meter report`), `/api/budgets` and `/api/requests` (the
latest rows, selected by the report's own filters).  meter/admin.py lets the
page and its files load without the token (`PAGE_PATHS`: they carry no data);
every data path still needs it, which the page sends as `Authorization: Bearer`.
"""

from __future__ import annotations

from .api import PAGE_PATHS, Console

__all__ = ["PAGE_PATHS", "Console"]

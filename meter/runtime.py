"""The interpreter `meter serve` runs in: its event loop, the GIL's switch interval
and the cyclic garbage collector, each set for a proxy's hot path.

- **uvloop**, the usual loop for aiohttp servers: measured with scripts/bench.py,
  a bare pass-through does more requests per second on it than on asyncio's loop.
- **A 0.5 ms switch interval.**  The ledger writer thread works under the GIL;
  at Python's default of 5 ms a request could wait that long behind it.
- **The collector.**  What start-up built (price tables, settings, modules: ~77k
  objects) lives as long as the process: `gc.freeze()` takes it out of every
  collection (walking it stalled the loop ~40 ms).  The request path makes no
  cyclic garbage (none found over 2 s of full load, with `gc.DEBUG_SAVEALL`), so
  the collector's work there is pure cost: at the default threshold of 700 a
  young collection ran every ~15 requests, ~20 us of CPU per request in all.  A
  young threshold of 50,000 runs one every ~100 requests or more (~3.5 us per
  request) and still bounds what cyclic garbage can pile up (an error path's
  cycles) to that many objects.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any

SWITCH_INTERVAL = 0.0005  # seconds
# Young generation, then how many collections of one generation make one of the next.
GC_THRESHOLDS = (50_000, 20, 10)


def event_loop_factory() -> Callable[[], Any] | None:
    """uvloop's loop where installed (every platform but Windows), else None: asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def tune_interpreter() -> None:
    """Before serving: the GIL's switch interval."""
    sys.setswitchinterval(SWITCH_INTERVAL)


def settle_after_start() -> None:
    """Once start-up is done: freeze what it built, and collect young objects rarely."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)

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
- **One malloc arena** (glibc).  glibc gives each thread that allocates an
  arena of its own (up to eight per core: four after one request), and memory
  freed in one arena serves only the threads on it: the ledger writer, the
  spill thread, the decoding and DNS threads each kept their own high-water mark.
  Nearly every allocation is made under the GIL (Python's own allocator serves
  the small ones), so a shared arena costs no waiting.  Measured with 30,000
  JSON requests at 32 connections (the proxy's VmHWM, five interleaved pairs):
  69.8-71.6 MiB with glibc's default, 67.9-70.3 MiB with one arena, 1.3-2.4 MiB
  less in each pair; requests/s within the machine's spread (eight pairs of
  8 s flat out: one arena at 0.84-1.28 of the default, median 1.03).
  `MALLOC_ARENA_MAX` in the environment, when set, is left to glibc.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Callable
from typing import Any

SWITCH_INTERVAL = 0.0005  # seconds
# Young generation, then how many collections of one generation make one of the next.
GC_THRESHOLDS = (50_000, 20, 10)
M_ARENA_MAX = -8  # glibc's mallopt() parameter: how many malloc arenas at most
MALLOC_ARENAS = 1


def event_loop_factory() -> Callable[[], Any] | None:
    """uvloop's loop where installed (every platform but Windows), else None: asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def tune_interpreter() -> None:
    """Before serving: the GIL's switch interval, and one malloc arena."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    limit_malloc_arenas()


def limit_malloc_arenas() -> bool:
    """One glibc malloc arena for every thread, unless `MALLOC_ARENA_MAX` is set; whether
    it was set here (False without glibc's `mallopt`: musl's ignores it, macOS has none)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, MALLOC_ARENAS))


def settle_after_start() -> None:
    """Once start-up is done: freeze what it built, and collect young objects rarely."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)

"""Reading usage out of the bytes that pass through, without touching them.

Everything here is pure: the proxy hands over copies of request and response
bytes, and gets back an `Observation` (model, response id, served tier, usage,
error, time of the first output token).  Streams are read incrementally, and
what is held is bounded whatever the upstream sends; when usage cannot be
read, `Observation.unmetered` says why, so that it is counted, not lost.

One module per concern: `facts` (what a request asks), `usage` (SPEC §3's
normal form), `objects` (a response, completion or error object),
`responses` (the one reader of Responses API stream events, for SSE and
WebSocket alike), `sse` (an SSE answer, its usual chunks read by shortcuts)
on `sselines` (the line parser for the rest), `bodies` (bounded copies), `ends` (reading what was
too large to hold), `codings` (content codings), `endpoints` (what a request
is, which observer reads it).  `socket` meters a WebSocket's responses; it
makes `Flow`s, so it is imported by the relay, not here (meter.flow imports
this package).  Nothing here imports aiohttp.
"""

from .bodies import BodyCollector, MeteringBudget
from .endpoints import METERED_KIND, endpoint_for, observer_for
from .facts import RequestFacts, request_facts
from .objects import Observation, observe_json_body
from .sse import SSEObserver
from .usage import Usage, unfit_counts, usage_anomalies

__all__ = [
    "METERED_KIND",
    "BodyCollector",
    "MeteringBudget",
    "Observation",
    "RequestFacts",
    "SSEObserver",
    "Usage",
    "endpoint_for",
    "observe_json_body",
    "observer_for",
    "request_facts",
    "unfit_counts",
    "usage_anomalies",
]

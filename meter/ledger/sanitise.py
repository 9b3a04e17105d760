"""One step that makes a record storable by every store (SPEC §2b).

Whatever a client or an upstream sent, a record leaves here with:

- text that is valid UTF-8 without control characters: lone surrogates (which
  is how aiohttp keeps an invalid header byte, and how `json` reads "\\ud800"),
  C0/C1 control characters and DEL become U+FFFD; `tags` stays valid JSON;
- every text column whose value comes from outside (`model`, `model_requested`, the
  ids, `user_id`, `project`, `session_id`, the method and path, the tiers, the error
  type and code, `cache_status`: `bounds.BOUNDED_TEXT`) cut to 256 characters, each
  cut counted per field;
- numbers the ledger's column types cannot hold (BIGINT, INTEGER,
  DECIMAL(18,9): the ranges in `meter.bounds`) set to NULL, counted once per
  record by endpoint.  A record the proxy made has none left (it was held to
  the same ranges when it was built and priced); this is the last guard, for
  every other way a record reaches a store.

It runs in the ledger writer's thread, once per batch, and is idempotent (a
retried batch changes nothing and counts nothing again).  Nearly every record is
clean, so each check starts with a test done in C over the record's text at once
(`str.isprintable`), and only a record that fails it is looked at field by field.
The ledger process goes one step further (`columns_need_nothing`): the same tests
over a whole batch a column at a time, so that the usual batch, which needs nothing,
costs no Python per record at all; any other batch is sanitised record by record.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from itertools import chain
from typing import Any

from ..bounds import BIGINT_MAX, BIGINT_MIN, BOUNDED_TEXT, COST_LIMIT, COST_QUANTUM, INT_MAX, INT_MIN, MAX_TEXT, cut_bounded_text
from ..record import ENDPOINTS, Record

# The other VARCHAR column whose text can come from outside, cleaned but not cut: the
# key's last characters (a few, by construction).  Not checked, because meter makes
# them from its own constants, a hash, its configuration or a number: endpoint,
# transport, outcome, key_id, key_name, trace_id.
OTHER_TEXT: tuple[str, ...] = ("key_hint",)
TEXT = BOUNDED_TEXT + OTHER_TEXT
BIGINT: tuple[str, ...] = (
    "input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "total_tokens", "web_search_calls", "cache_missed_tokens", "request_bytes", "response_bytes",
)  # fmt: skip
INTEGER: tuple[str, ...] = ("status_code",)

_text_and_tags = operator.attrgetter(*TEXT, "tags")
_bigints = operator.attrgetter(*BIGINT)

# A cost as the ledger process receives it (`rows.encode_batch`: `str` of a Decimal) that
# DECIMAL(18,9) holds exactly as it is: finite, under 10**9, at most 9 decimal places.
_EXACT_COST = re.compile(r"-?[0-9]{1,9}(?:\.[0-9]{1,9})?")
_INT_OR_NONE = frozenset((int, type(None)))
_STR_OR_NONE = frozenset((str, type(None)))

# Lone surrogates (a valid pair never reaches a Python str as two code points), C0, DEL, C1.
_BAD_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# In JSON text as `json.dumps(..., ensure_ascii=False)` writes it: an escaped backslash
# (kept), or the escape of a control character, or a raw bad character.
_BAD_JSON = re.compile(r'(\\\\)|\\[bfnrt]|\\u00[01][0-9a-f]|[\x7f-\x9f\ud800-\udfff]')


# Cut before the record was made (`Record.cut`): metadata past OpenAI's limits, a
# request body too large in members to decode, a `Meter-Tag-*` header dropped
# (`meter.attribution.DROPPED_TAG`: a bad name, a value too long, past 16 tags).
CUT_EARLY: tuple[str, ...] = ("tags", "request", "tag_headers")


def new_truncated() -> dict[str, int]:
    """Counters with every key present from the start, so that readers on another
    thread can iterate them while the writer counts (the dict never changes size)."""
    return dict.fromkeys(BOUNDED_TEXT + CUT_EARLY, 0)


def new_overflows() -> dict[str, int]:
    return dict.fromkeys(ENDPOINTS, 0)


def clean_text(value: str) -> str:
    """Bad characters to U+FFFD; `value` itself when there are none."""
    if value.isprintable():
        return value
    return _BAD_CHAR.sub("\ufffd", value)


def _json_escape_to_fffd(match: re.Match[str]) -> str:
    return match.group(1) or "\ufffd"


def clean_tags(text: str) -> str:
    """JSON text with bad characters in its strings replaced; still JSON.  Text that is
    not JSON is left for the store to refuse (and the writer to set aside)."""
    if text.isprintable() and "\\" not in text:
        return text  # nothing escaped, nothing raw: clean
    try:
        value = json.loads(text)
        dumped = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        return json.dumps(clean_text(text), ensure_ascii=False)  # too deep to rebuild: keep it as one string
    except ValueError:
        return text
    if not _BAD_JSON.search(dumped):
        return text if dumped == text else dumped
    return _BAD_JSON.sub(_json_escape_to_fffd, dumped)


def _fits_bigint(value: object) -> bool:
    return type(value) is int and BIGINT_MIN <= value <= BIGINT_MAX


def _clean_cost(value: object) -> Decimal | None:
    if not isinstance(value, Decimal) or not value.is_finite() or not -COST_LIMIT < value < COST_LIMIT:
        return None
    fitted = value.quantize(COST_QUANTUM)  # finer than the column: round, do not refuse
    return value if fitted == value else fitted


def sanitise(record: Record, truncated: dict[str, int], overflows: dict[str, int]) -> None:
    """Make one record storable in place (see the module doc)."""
    if record.cut:
        for name in record.cut:
            truncated[name] = truncated.get(name, 0) + 1
        record.cut = ()  # counted once, however often the batch is retried
    texts = _text_and_tags(record)
    tags = texts[-1]
    try:
        # All text at once: one join and one scan in C for the usual, clean record.
        joined = "".join(filter(None, texts))
        clean = joined.isprintable() and (tags is None or "\\" not in tags)
        short = len(joined) - (len(tags) if tags else 0) <= MAX_TEXT  # no bounded field can be too long
    except TypeError:  # a value that is not text at all
        clean = short = False
    if not clean:
        _clean_fields(record, texts)
    if not short:
        _bound_fields(record, truncated)
    if _numbers_overflow(record):
        endpoint = record.endpoint if record.endpoint in overflows else "other"
        overflows[endpoint] = overflows.get(endpoint, 0) + 1


def _clean_fields(record: Record, texts: tuple[object, ...]) -> None:
    for name, value in zip(TEXT, texts):
        if value is None:
            continue
        text = value if isinstance(value, str) else str(value)
        if text is not value or not text.isprintable():
            setattr(record, name, _BAD_CHAR.sub("\ufffd", text))
    tags = texts[-1]
    if tags is not None:
        record.tags = clean_tags(tags if isinstance(tags, str) else str(tags))


def _bound_fields(record: Record, truncated: dict[str, int]) -> None:
    for name in cut_bounded_text(record, MAX_TEXT):
        truncated[name] = truncated.get(name, 0) + 1


def _numbers_overflow(record: Record) -> bool:
    """Set to NULL the numbers the column types cannot hold; True if there were any."""
    overflow = False
    try:
        # One sum in C bounds every value (None and 0 dropped: they fit); meter's parsers
        # give these as int, never bool or float, so a range is all there is to check.
        fits = sum(map(abs, filter(None, _bigints(record)))) <= BIGINT_MAX
    except TypeError:  # not a number at all
        fits = False
    if not fits:
        for name, value in zip(BIGINT, _bigints(record)):
            if value is not None and not _fits_bigint(value):
                setattr(record, name, None)
                overflow = True
    status = record.status_code
    if status is not None and not (type(status) is int and INT_MIN <= status <= INT_MAX):
        record.status_code = None
        overflow = True
    cost = record.cost_usd
    if cost is not None:
        fitted = _clean_cost(cost)
        if fitted is not cost:
            record.cost_usd = fitted
            overflow = overflow or fitted is None
    return overflow


def columns_need_nothing(columns: Mapping[str, Sequence[Any]]) -> bool:
    """True when `sanitise` would change and count nothing in any record of the batch
    given as one sequence per field (`rows.decode_columns`): its tests of a record, made
    once over the whole batch, in C.  False says only that some record may need
    something; the caller then sanitises record by record, which decides and counts."""
    if any(columns["cut"]):
        return False
    texts = [columns[name] for name in TEXT]
    tags = columns["tags"]
    try:
        # As `sanitise` joins a record's text: all printable, no escape in the tags.
        if not "".join(filter(None, chain(*texts, tags))).isprintable() or "\\" in "".join(filter(None, tags)):
            return False
        if any(max(map(len, filter(None, columns[name])), default=0) > MAX_TEXT for name in BOUNDED_TEXT):
            return False
        # Every record's sum (what `_numbers_overflow` bounds) is at most the batch's.
        if sum(sum(map(abs, filter(None, columns[name]))) for name in BIGINT) > BIGINT_MAX:
            return False
    except TypeError:  # a value of another type: looked at record by record
        return False
    status = columns["status_code"]
    if not _INT_OR_NONE.issuperset(map(type, status)):
        return False
    known = [code for code in status if code is not None]
    if known and (min(known) < INT_MIN or max(known) > INT_MAX):
        return False
    costs = [cost for cost in columns["cost_usd"] if cost is not None]  # as text, see `_EXACT_COST`
    if not _STR_OR_NONE.issuperset(map(type, costs)):
        return False
    return all(_EXACT_COST.fullmatch(cost) or _exact_cost(cost) for cost in costs)


def _exact_cost(text: str) -> bool:
    """A cost in another form (`0E-9`, `1.5E-7`) that `_clean_cost` would keep as it is."""
    try:
        value = Decimal(text)
    except ArithmeticError:
        return False
    return _clean_cost(value) is value


def sanitise_batch(records: Iterable[Record], truncated: dict[str, int], overflows: dict[str, int]) -> None:
    for record in records:
        sanitise(record, truncated, overflows)


# What sanitising a batch cut, as counted by `sanitise`: (values cut per field,
# records with a number too large per endpoint), non-zero counts only.
Cuts = tuple[dict[str, int], dict[str, int]]


def sanitise_counting(records: Iterable[Record]) -> Cuts:
    """Sanitise `records`; what was cut (see `Cuts`)."""
    truncated, overflows = new_truncated(), new_overflows()
    sanitise_batch(records, truncated, overflows)
    return {k: n for k, n in truncated.items() if n}, {k: n for k, n in overflows.items() if n}


def add_cuts(cuts: Cuts, truncated: dict[str, int], overflows: dict[str, int]) -> None:
    """Count `cuts` into the writer's counters (whose keys are all there already)."""
    for counts, into in zip(cuts, (truncated, overflows)):
        for key, n in counts.items():
            if key in into:  # both sides make their counters alike: always
                into[key] += n

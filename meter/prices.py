"""What a request cost, in USD, from its usage, model, served tier and date (SPEC §5).

Prices come from the data snapshot that ships inside the `genai-prices` package
(its auto-updater is never started, so pricing does no I/O).  A `Pricer` is made
once per process: it fixes the provider whose prices apply (from the config's
`[prices] provider`, else from the upstream URL, else per model by name across
providers, where a `vendor/model` prefix names the provider) and the config's
overrides.  `cost()` is on the hot path, once per request: the model/provider/
tier lookup is cached per (model, tier) and the resolved rates per (model, served
tier, UTC day), so a warm call is one dict lookup and a few integer
multiplications, made an exact Decimal once at the end.  The arithmetic is
the package's own (cached reads and cache writes are parts of the input, priced
at their rates when the model has them and at the input rate when it does not;
reasoning tokens are part of the output; a long-context tier applies to all
tokens once the whole input passes its threshold); a test checks it against
the package's calculation for every model in the snapshot.

Rules meter adds on top of the package:

- The served tier picks the price.  `None`, `""`, `auto` and `default` mean
  standard; any other tier needs a price variant of that model for that tier,
  in force on the request's date, or the request is unpriced (`None`), never
  priced at the standard rate.  The package ignores tier variants for a model
  it finds through another provider's list (Azure serving OpenAI's models), so
  such a model is priced only on the standard tier.
- A model without a price, an unknown model, a model whose price has no input
  (or no output) rate while the usage has input (or output) tokens: `None`.
- Hosted web searches are charged per call at the package's per-call price (or
  the override's `web_search_per_call`); a model with no per-call price has
  its searches left out (the tokens are still priced), since a missing per-call
  price is not a missing model price.
- Overrides (`[prices."my-model"]`) win over the package for that model.  The
  name matches case-insensitively, first exactly, then with a trailing date
  stamp removed (`my-model-2024-08-06` or `my-model-20240806` uses
  `my-model`'s override), so one entry covers the snapshots a provider serves
  under an alias.  An override is a standard-tier price: a request served on
  another tier is unpriced.
- The package's own model matching is used as is: a dated snapshot the package
  lists (`gpt-4o-2024-08-06`) is priced; one it does not list is unpriced rather
  than guessed from its alias (snapshots can cost differently, as
  `gpt-4o-2024-05-13` does).
"""

from __future__ import annotations

import functools
import math
import re
from bisect import bisect_left
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from genai_prices import data_snapshot
from genai_prices.types import ModelInfo, ModelPrice, PriceContext, Provider, TieredPrices, TimeOfDateConstraint

from .bounds import COST_LIMIT, note_overflow
from .config import PriceOverride

if TYPE_CHECKING:
    from .record import Record

__all__ = ["STANDARD_TIERS", "Pricer"]

STANDARD_TIERS = frozenset({None, "", "auto", "default"})
_NANO = Decimal("1e-9")
_DAY = 86400
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")
_TIER_KEY = "service_tier"
_DAY_CACHE_MAX = 16384
_EXACT = 10**27  # nano-dollar counts below this make exact Decimals in the default 28-digit context
_COST_LIMIT_NANOS = int(COST_LIMIT / _NANO)
# What `_Rates.price` answers for a cost the ledger's DECIMAL(18,9) cannot hold: no
# price, and an `overflow` anomaly (`price_record`).  Compared by identity.
TOO_LARGE = Decimal("Infinity")


class _Rates:
    """Flat rates of one model on one tier at one moment, ready for integer arithmetic.

    Every rate is kept as an integer count of 10**-scale USD per million tokens
    (a web search or a request as its price times a million), `scale` being the
    most decimal places any rate has, so a cost is a sum of int products turned
    into one exact Decimal at the end.  `bands[i]` holds (input, cache_read,
    cache_write, output, reasoning) for total input tokens above
    `starts[i - 1]` (band 0: up to `starts[0]`); `None` means the unit has no
    price of its own.
    """

    __slots__ = ("bands", "down", "exact_below", "exponent", "fits_below", "request", "starts", "up", "web_call")

    def __init__(
        self,
        bands: list[tuple[Decimal | None, ...]],
        web_call: Decimal | None,
        request: Decimal | None,
        starts: tuple[int, ...] = (),
    ) -> None:
        per_mtok = [p for band in bands for p in band if p is not None]
        per_mtok += [p.scaleb(6) for p in (web_call, request) if p is not None]
        scale = max([0, *(-int(p.normalize().as_tuple().exponent) for p in per_mtok)])

        def scaled(p: Decimal | None) -> int | None:
            return None if p is None else int(p.scaleb(scale))

        self.starts = starts
        self.bands = tuple(tuple(scaled(p) for p in band) for band in bands)
        self.web_call = scaled(None if web_call is None else web_call.scaleb(6))
        self.request = scaled(None if request is None else request.scaleb(6))
        self.exponent = -(scale + 6)
        # A total (in 10**exponent USD) to nano-dollars: times `up` when the rates have
        # at most 3 decimal places per million tokens, else divided by `down`, half-even.
        shift = self.exponent + 9
        self.up = 10**shift if shift >= 0 else 1
        self.down = 10**-shift if shift < 0 else 1
        # Below this total, the nano-dollar count and `_NANO * nanos` stay within the
        # Decimal context's 28 digits, so the product is exact (see `usd`).
        self.exact_below = _EXACT // self.up
        # Below this total, the cost is also one the ledger holds (under COST_LIMIT):
        # `price`'s usual case, where no other test of the cost's size is made.
        self.fits_below = min(self.exact_below, -(-_COST_LIMIT_NANOS // self.up))

    @classmethod
    def from_model_price(cls, mp: ModelPrice) -> _Rates:
        keys = ("input_mtok", "cache_read_mtok", "cache_write_mtok", "output_mtok", "output_reasoning_mtok")
        raw = [getattr(mp, k) for k in keys]
        starts = sorted({t.start for p in raw if isinstance(p, TieredPrices) for t in p.tiers})
        # A tier applies when the total input exceeds its start.
        bands = [tuple(_price_at(p, threshold) for p in raw) for threshold in [0, *(s + 1 for s in starts)]]
        web = mp.web_searches_kcount
        req = mp.requests_kcount
        return cls(
            bands,
            None if web is None else _flat(web).scaleb(-3),
            None if req is None else _flat(req).scaleb(-3),
            tuple(starts),
        )

    @classmethod
    def from_override(cls, o: PriceOverride) -> _Rates:
        return cls([(o.input_mtok, o.cached_mtok, o.cache_write_mtok, o.output_mtok, None)], o.web_search_per_call, None)

    def price(self, inp: int, cached: int, cache_write: int, out: int, reasoning: int, searches: int) -> Decimal | None:
        """The cost of one usage (counts, 0 when absent); `None` for impossible usage
        (SPEC §3 invariants), whatever the rates, or a unit it has but no rate for;
        `TOO_LARGE` for a cost past what the ledger's DECIMAL(18,9) holds."""
        if cached < 0 or cache_write < 0 or reasoning < 0 or searches < 0 or cached + cache_write > inp or reasoning > out:
            return None
        bands = self.bands
        r_in, r_cr, r_cw, r_out, r_rs = bands[0] if len(bands) == 1 else bands[bisect_left(self.starts, inp)]
        total = 0
        if r_cr is not None and cached:
            total += r_cr * cached
            inp -= cached
        if r_cw is not None and cache_write:
            total += r_cw * cache_write
            inp -= cache_write
        if r_rs is not None and reasoning:
            total += r_rs * reasoning
            out -= reasoning
        if inp:
            if r_in is None or inp < 0:
                return None
            total += r_in * inp
        if out:
            if r_out is None or out < 0:
                return None
            total += r_out * out
        if searches and self.web_call is not None:
            total += self.web_call * searches
        if self.request is not None:
            total += self.request
        if self.down == 1 and type(total) is int and 0 <= total < self.fits_below:
            return _NANO * (total * self.up)  # `usd`'s usual case, without the call
        cost = self.usd(total)
        return cost if -COST_LIMIT < cost < COST_LIMIT else TOO_LARGE

    def usd(self, total: int) -> Decimal:
        """`total` (a count of 10**exponent USD) in USD to 9 places, rounded half-even.

        Digit for digit `Decimal(total).scaleb(exponent).quantize(_NANO)` under the
        default context, in one Decimal operation instead of three (the scaleb alone
        was most of a warm call's cost): the rounding is done in integers and the
        nano-dollar count is multiplied by `_NANO`, which is exact below 28 digits.
        A total outside that range (negative, or absurdly large) takes the Decimal
        chain itself, so its rounding and its errors stay the context's.
        """
        if type(total) is int and 0 <= total < self.exact_below:  # a float count (never from observe) takes the chain
            down = self.down
            if down == 1:
                return _NANO * (total * self.up)
            nanos, rest = divmod(total, down)
            half = down >> 1  # down is a power of ten: half is exact
            if rest > half or (rest == half and nanos & 1):
                nanos += 1
            return _NANO * nanos
        return Decimal(total).scaleb(self.exponent).quantize(_NANO)


_UNPRICED = _Rates([(None,) * 5], None, None)  # cached "no price" (compared by identity)


def _flat(price: Decimal | TieredPrices) -> Decimal:
    return price.base if isinstance(price, TieredPrices) else price


def _price_at(price: Decimal | TieredPrices | None, input_tokens: int) -> Decimal | None:
    """The package's rule: the highest tier whose start the total input exceeds, else the base."""
    if price is None or not isinstance(price, TieredPrices):
        return price
    for tier in reversed(price.tiers):
        if input_tokens > tier.start:
            return tier.price
    return price.base


class _Source:
    """Where a (model, tier) gets its price: an override, or a package model."""

    __slots__ = ("context", "granularity", "model", "rates", "tier")

    def __init__(
        self,
        rates: _Rates | None = None,
        model: ModelInfo | None = None,
        context: PriceContext | None = None,
        tier: str | None = None,
        granularity: int = _DAY,
    ) -> None:
        self.rates = rates  # set for overrides: date- and tier-independent
        self.model = model
        self.context = context  # price context given to the package (None: standard prices only)
        self.tier = tier  # non-standard tier that must have a variant in force
        self.granularity = granularity  # seconds within which the price cannot change

    def rates_at(self, when: datetime) -> _Rates | None:
        model, context = self.model, self.context
        assert model is not None
        if self.tier is not None:
            assert context is not None  # a tier is priced only on the provider's own models, which have one
            if not any(
                (v.constraint is None or v.constraint.active(when)) and all(context.get(k) == x for k, x in v.when.items())
                for v in model.price_variants or ()
            ):
                return None
        prices = model.get_prices(when, context)
        if any(getattr(prices, name, None) is not None for name in _MODALITY_PRICES):
            return None
        return _Rates.from_model_price(prices)


# A price per audio or image token (gpt-audio, the realtime and image models): a usage
# block's counts include those tokens, which cost several times a text token, and the
# ledger keeps no count of them (nor could `meter reprice` read one), so such a model
# cannot be priced honestly from the row: it is unpriced (NULL, counted), never priced
# at the text rates (a gpt-audio call: $0.25 instead of $1.818).  An override prices it.
_MODALITY_PRICES = ("input_audio_mtok", "cache_audio_read_mtok", "output_audio_mtok", "input_image_mtok", "cache_image_read_mtok", "output_image_mtok")


class Pricer:
    """Prices requests; one per process, shared by every request (read-only after start)."""

    def __init__(
        self,
        provider_id: str | None = None,
        upstream_url: str = "https://api.openai.com",
        overrides: dict[str, PriceOverride] | None = None,
    ) -> None:
        self._providers: list[Provider] = data_snapshot.get_snapshot().providers
        self.provider: Provider | None = None
        if provider_id:
            self.provider = data_snapshot.find_provider_by_id(self._providers, provider_id)
            if self.provider is None:
                raise ValueError(f"[prices] provider: genai-prices knows no provider {provider_id!r}")
        elif upstream_url:
            self.provider = next((p for p in self._providers if re.match(p.api_pattern, upstream_url)), None)
        self._overrides = {name.lower(): _Rates.from_override(o) for name, o in (overrides or {}).items()}
        # (model, served tier as reported, UTC day number) -> rates; the warm path is this one dict lookup.
        self._by_day: dict[tuple[str, str | None, float], _Rates] = {}
        self._source = functools.lru_cache(maxsize=2048)(self._find_source)
        self._rates = functools.lru_cache(maxsize=4096)(self._find_rates)

    # -- hot path ---------------------------------------------------------------

    def cost(
        self,
        model: str | None,
        service_tier: str | None,
        started_at: float,
        input_tokens: int | None = None,
        cached_tokens: int | None = None,
        cache_write_tokens: int | None = None,
        output_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        web_search_calls: int | None = None,
    ) -> Decimal | None:
        """USD for one request, to 9 decimal places; `None` when it cannot be priced honestly
        (no model; no input count, which every usage has: see `price_record`)."""
        if not model or input_tokens is None:
            return None
        rates = self._day_rates(model, service_tier, started_at)
        if rates is _UNPRICED:
            return None
        cost = rates.price(
            input_tokens or 0, cached_tokens or 0, cache_write_tokens or 0, output_tokens or 0, reasoning_tokens or 0, web_search_calls or 0,
        )
        return None if cost is TOO_LARGE else cost

    def price_record(self, record: Record) -> None:
        """Set `cost_usd` and `priced` on a finished record (skips rows without usage or with anomalies;
        a cost too large for the ledger is none, and an anomaly: `note_overflow`).

        `cost()` on the record's fields, read once each: this runs for every request.
        """
        inp = record.input_tokens
        out = record.output_tokens
        model = record.model or record.model_requested
        # No input count, no price: every usage meter reads has one (embeddings have
        # nothing else), so a row without it is one whose count was too large to keep
        # (`note_overflow`), and priced from its output alone it would cost less than it
        # did; `meter reprice` sees such a row without the anomaly that says so.
        if inp is None or record.anomalies or not model:
            record.cost_usd = None
            record.priced = False
            return
        rates = self._day_rates(model, record.service_tier, record.started_at)
        if rates is _UNPRICED:
            record.cost_usd = None
            record.priced = False
            return
        cost = rates.price(
            inp or 0, record.cached_tokens or 0, record.cache_write_tokens or 0, out or 0, record.reasoning_tokens or 0, record.web_search_calls or 0,
        )
        if cost is TOO_LARGE:
            # Bounded here, not only by the ledger: metrics and budgets add this cost up
            # before the ledger sees it (12.5 billion dollars once, against a NULL row).
            note_overflow(record, "cost_usd")
            cost = None
        record.cost_usd = cost
        record.priced = cost is not None

    # -- cached resolution ------------------------------------------------------

    def _day_rates(self, model: str, service_tier: str | None, started_at: float) -> _Rates:
        """The rates of `model` at `service_tier` on `started_at`'s UTC day (or `_UNPRICED`):
        the warm path is one dict lookup."""
        key = (model, service_tier, started_at // _DAY)
        rates = self._by_day.get(key)
        return rates if rates is not None else self._miss(key, started_at)

    def _miss(self, key: tuple[str, str | None, float], started_at: float) -> _Rates:
        """Rates (or `_UNPRICED`) for a (model, served tier, UTC day) not in the day cache."""
        model, service_tier, _ = key
        tier = None if service_tier in STANDARD_TIERS else service_tier
        source = self._source(model, tier)
        if source is None:
            rates: _Rates | None = None
        elif source.rates is not None:
            rates = source.rates
        else:
            rates = self._rates(model, tier, math.floor(started_at / source.granularity))
            if source.granularity != _DAY:
                return _UNPRICED if rates is None else rates  # time-of-day prices: not cached per day
        if len(self._by_day) >= _DAY_CACHE_MAX:
            self._by_day.clear()
        self._by_day[key] = rates = _UNPRICED if rates is None else rates
        return rates

    def _find_rates(self, model: str, tier: str | None, bucket: int) -> _Rates | None:
        source = self._source(model, tier)
        assert source is not None
        return source.rates_at(datetime.fromtimestamp(bucket * source.granularity, UTC))

    def _find_source(self, model: str, tier: str | None) -> _Source | None:
        override = self._override(model)
        if override is not None:
            return _Source(rates=override) if tier is None else None
        found = self._find_model(model)
        if found is None:
            return None
        provider, info = found
        own = any(info is m for m in provider.models)
        if tier is not None and not own:
            return None  # the package ignores tier variants of a model borrowed from another provider
        context: PriceContext | None = {_TIER_KEY: tier or "default"} if own else None
        return _Source(model=info, context=context, tier=tier, granularity=_granularity(info))

    def _override(self, model: str) -> _Rates | None:
        name = model.lower()
        rates = self._overrides.get(name)
        if rates is None and self._overrides:
            stripped = _DATE_SUFFIX.sub("", name)
            if stripped != name:
                rates = self._overrides.get(stripped)
        return rates

    def _find_model(self, model: str) -> tuple[Provider, ModelInfo] | None:
        ref = model.lower()
        if self.provider is not None:
            info = self.provider.find_model(ref, all_providers=self._providers)
            return None if info is None else (self.provider, info)
        if "/" in ref:
            vendor, rest = ref.split("/", 1)
            provider = data_snapshot.find_provider_by_id(self._providers, vendor)
            if provider is not None:
                info = provider.find_model(rest, all_providers=self._providers)
                return None if info is None else (provider, info)
            return self._find_anywhere(ref) or self._find_anywhere(rest)
        return self._find_anywhere(ref)

    def _find_anywhere(self, ref: str) -> tuple[Provider, ModelInfo] | None:
        """A model name alone: the provider whose names it follows, else the one provider listing it."""
        for provider in self._providers:
            if provider.model_match is not None and provider.model_match.is_match(ref):
                info = provider.find_model(ref, all_providers=self._providers)
                if info is not None:
                    return provider, info
                break
        owners = [(p, m) for p in self._providers if (m := p.find_model(ref)) is not None]
        # A provider that resells another's models (Azure -> OpenAI) yields to the one it resells.
        ids = {p.id for p, _ in owners}
        owners = [(p, m) for p, m in owners if not ids.intersection(p.fallback_model_providers or ())]
        return owners[0] if len(owners) == 1 else None


def _granularity(info: ModelInfo) -> int:
    """Seconds for which a model's price is constant: a UTC day, unless it has time-of-day prices."""
    constraints = [c.constraint for c in info.prices] if isinstance(info.prices, list) else []
    constraints += [v.constraint for v in info.price_variants or ()]
    times = [t for c in constraints if isinstance(c, TimeOfDateConstraint) for t in (c.start_time, c.end_time)]
    if not times:
        return _DAY
    return 60 if all(t.second == 0 and t.microsecond == 0 for t in times) else 1

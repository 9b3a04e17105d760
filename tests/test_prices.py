"""meter.prices: cost of a request from usage, model, served tier and date (SPEC §5).

Expected values are worked out by hand from per-million-token prices, with the
arithmetic written beside them.  The prices are the provider's published rates
as carried by the `genai-prices` 0.2.3 data snapshot (its comments cite
https://developers.openai.com/api/docs/pricing, tier rates "verified on
2026-10-12"; Anthropic: https://www.anthropic.com/pricing#api); each test says
which date it prices at, and `test_snapshot_rates_used_here` pins the rates the
hand arithmetic assumes, so a data update that moves one fails loudly there
rather than as a puzzling arithmetic mismatch.

A cost is (tokens x USD per Mtok) / 1,000,000, written below as a sum in
micro-dollars ("µ$") over 1e6.
"""

from __future__ import annotations

import functools
import random
import timeit
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pydantic
import pytest
from genai_prices import Usage
from genai_prices import calc_price as package_calc_price
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ModelInfo, ModelPrice, Provider

from meter.config import PriceOverride
from meter.prices import Pricer, _Rates
from meter.record import Record

OPENAI = "https://api.openai.com"
AZURE = "https://my-resource.openai.azure.com/openai"
GATEWAY = "https://api.routeway.ai/v1"  # a gateway genai-prices does not know


def at(y: int, m: int, d: int, hour: int = 12, minute: int = 0) -> float:
    return datetime(y, m, d, hour, minute, tzinfo=UTC).timestamp()


NOV = at(2026, 11, 1)  # after the 2026-10-12 tier rates and the 2026-08-21 Sol price cut


def usd(text: str) -> Decimal:
    return Decimal(text)


@pytest.fixture(scope="module")
def openai() -> Pricer:
    return Pricer(provider_id=None, upstream_url=OPENAI, overrides={})


def cost(p: Pricer, model: str | None, tier: str | None = None, when: float = NOV, **usage: int) -> Decimal | None:
    return p.cost(
        model,
        tier,
        when,
        usage.get("input", 0),
        usage.get("cached", 0),
        usage.get("cache_write", 0),
        usage.get("output", 0),
        usage.get("reasoning", 0),
        usage.get("searches", 0),
    )


def _rates(provider: str, model: str) -> ModelPrice | list:
    found = next(p for p in get_snapshot().providers if p.id == provider)
    return next(m for m in found.models if m.id == model).prices


def test_snapshot_rates_used_here() -> None:
    """The per-Mtok rates the hand arithmetic below relies on, as the bundled data has them."""
    gpt4o = _rates("openai", "gpt-4o")
    assert (gpt4o.input_mtok, gpt4o.cache_read_mtok, gpt4o.output_mtok) == (usd("2.5"), usd("1.25"), usd("10"))
    assert gpt4o.web_searches_kcount == usd("10")
    old4o = _rates("openai", "gpt-4o-2024-05-13")
    assert (old4o.input_mtok, old4o.cache_read_mtok, old4o.output_mtok) == (usd("5"), None, usd("15"))
    gpt5 = _rates("openai", "gpt-5")
    assert (gpt5.input_mtok, gpt5.cache_read_mtok, gpt5.output_mtok) == (usd("1.25"), usd("0.125"), usd("10"))
    o3_first, o3_cut = _rates("openai", "o3")
    assert (o3_first.prices.input_mtok, o3_first.prices.output_mtok) == (usd("10"), usd("40"))
    assert str(o3_cut.constraint.start_date) == "2025-06-10"
    assert (o3_cut.prices.input_mtok, o3_cut.prices.cache_read_mtok, o3_cut.prices.output_mtok) == (
        usd("2"),
        usd("0.5"),
        usd("8"),
    )
    gpt54 = _rates("openai", "gpt-5.4")
    assert (gpt54.input_mtok.base, gpt54.input_mtok.tiers[0].start, gpt54.input_mtok.tiers[0].price) == (
        usd("2.5"),
        272_000,
        usd("5"),
    )
    assert (gpt54.cache_read_mtok.base, gpt54.cache_read_mtok.tiers[0].price) == (usd("0.25"), usd("0.5"))
    assert (gpt54.output_mtok.base, gpt54.output_mtok.tiers[0].price) == (usd("15"), usd("22.5"))
    sol_first, sol_cut = _rates("openai", "gpt-5.6-sol")
    assert str(sol_cut.constraint.start_date) == "2026-08-21"
    assert (sol_first.prices.input_mtok.base, sol_first.prices.output_mtok.base) == (usd("5"), usd("30"))
    cut = sol_cut.prices
    assert (cut.input_mtok.base, cut.cache_read_mtok.base, cut.cache_write_mtok.base, cut.output_mtok.base) == (
        usd("4"),
        usd("0.4"),
        usd("5"),
        usd("20"),
    )
    sonnet = _rates("anthropic", "claude-sonnet-4-5")
    assert (sonnet.input_mtok.base, sonnet.cache_read_mtok.base, sonnet.cache_write_mtok.base) == (
        usd("3"),
        usd("0.3"),
        usd("3.75"),
    )
    assert (sonnet.output_mtok.base, sonnet.web_searches_kcount) == (usd("15"), usd("10"))
    assert _rates("openai", "text-embedding-3-small").input_mtok == usd("0.02")


# -- plain, cached, reasoning ------------------------------------------------------


def test_plain_model(openai: Pricer) -> None:
    # gpt-4o, 2026-11-01: $2.50 input, $10 output per Mtok.
    # 1,000 x 2.50 + 500 x 10 = 2,500 + 5,000 = 7,500 µ$
    assert cost(openai, "gpt-4o", input=1000, output=500) == usd("0.0075")


def test_result_is_a_decimal_with_nine_places(openai: Pricer) -> None:
    result = cost(openai, "gpt-4o", input=1000, output=500)
    assert isinstance(result, Decimal)
    assert result.as_tuple().exponent == -9  # the ledger column is DECIMAL(18,9)
    # gpt-5 flex cached input $0.0625/Mtok: 1 token = 0.0625 µ$ = $0.0000000625 -> 9 places, half-even
    assert str(cost(openai, "gpt-5", "flex", input=1, cached=1)) == "6.2E-8"


def test_cached_tokens_at_the_cached_rate(openai: Pricer) -> None:
    # gpt-4o: 10,000 input of which 4,000 cached ($1.25), 1,000 output.
    # 6,000 x 2.50 + 4,000 x 1.25 + 1,000 x 10 = 15,000 + 5,000 + 10,000 = 30,000 µ$
    assert cost(openai, "gpt-4o", input=10_000, cached=4_000, output=1_000) == usd("0.03")


def test_cached_tokens_without_a_cached_rate_pay_the_input_rate(openai: Pricer) -> None:
    # gpt-4o-2024-05-13 has no cached-input price ($5 in, $15 out): all 10,000 input at $5.
    # 10,000 x 5 + 1,000 x 15 = 50,000 + 15,000 = 65,000 µ$
    assert cost(openai, "gpt-4o-2024-05-13", input=10_000, cached=4_000, output=1_000) == usd("0.065")


def test_reasoning_tokens_are_part_of_output_not_added_again(openai: Pricer) -> None:
    # o3 after the 2025-06-10 cut: $2 input, $0.50 cached, $8 output.
    # 5,000 input (1,000 cached); 3,000 output of which 2,000 reasoning (already inside the 3,000).
    # 4,000 x 2 + 1,000 x 0.5 + 3,000 x 8 = 8,000 + 500 + 24,000 = 32,500 µ$
    assert cost(openai, "o3", input=5_000, cached=1_000, output=3_000, reasoning=2_000) == usd("0.0325")
    # Not 5,000 output tokens' worth (which would be 48,500 µ$).


# -- tiers ---------------------------------------------------------------------------

GPT5_USAGE = {"input": 100_000, "cached": 20_000, "output": 10_000, "reasoning": 8_000}


def test_standard_tier_names(openai: Pricer) -> None:
    # gpt-5 standard, 2026-11-01: $1.25 input, $0.125 cached, $10 output.
    # 80,000 x 1.25 + 20,000 x 0.125 + 10,000 x 10 = 100,000 + 2,500 + 100,000 = 202,500 µ$
    for tier in (None, "default", "auto"):
        assert cost(openai, "gpt-5", tier, **GPT5_USAGE) == usd("0.2025"), tier


def test_flex_and_priority_cost_differently(openai: Pricer) -> None:
    # gpt-5 flex (from 2026-10-12): $0.625 input, $0.0625 cached, $5 output.
    # 80,000 x 0.625 + 20,000 x 0.0625 + 10,000 x 5 = 50,000 + 1,250 + 50,000 = 101,250 µ$
    assert cost(openai, "gpt-5", "flex", **GPT5_USAGE) == usd("0.10125")
    # gpt-5 priority (from 2026-10-12): $2.50 input, $0.25 cached, $20 output.
    # 80,000 x 2.5 + 20,000 x 0.25 + 10,000 x 20 = 200,000 + 5,000 + 200,000 = 405,000 µ$
    assert cost(openai, "gpt-5", "priority", **GPT5_USAGE) == usd("0.405")
    # `fast` has the same published rates as priority.
    assert cost(openai, "gpt-5", "fast", **GPT5_USAGE) == usd("0.405")


def test_tier_without_a_variant_is_unpriced_not_standard(openai: Pricer) -> None:
    assert cost(openai, "gpt-5", "scale", **GPT5_USAGE) is None
    assert cost(openai, "gpt-5", "ultrafast", **GPT5_USAGE) is None
    assert cost(openai, "gpt-4o", "flex", input=1000, output=500) is None  # gpt-4o has priority, no flex
    # Before 2026-10-12 the data has no flex rate for gpt-5: unpriced, not the standard rate.
    assert cost(openai, "gpt-5", "flex", at(2026, 9, 1), **GPT5_USAGE) is None
    # ...while standard on that day is priced: 202,500 µ$ as above.
    assert cost(openai, "gpt-5", None, at(2026, 9, 1), **GPT5_USAGE) == usd("0.2025")


# -- model names ---------------------------------------------------------------------


def test_unknown_model_is_unpriced(openai: Pricer) -> None:
    assert cost(openai, "no-such-model", input=1000, output=500) is None
    assert cost(openai, None, input=1000, output=500) is None
    assert cost(openai, "", input=1000, output=500) is None


def test_dated_snapshot_name(openai: Pricer) -> None:
    # gpt-4o-2024-08-06 is listed under gpt-4o: 1,000 x 2.50 + 500 x 10 = 7,500 µ$
    assert cost(openai, "gpt-4o-2024-08-06", input=1000, output=500) == usd("0.0075")
    # gpt-4o-2024-05-13 is its own entry at $5 / $15: 1,000 x 5 + 500 x 15 = 12,500 µ$
    assert cost(openai, "gpt-4o-2024-05-13", input=1000, output=500) == usd("0.0125")
    # Names are matched case-insensitively, as the package does.
    assert cost(openai, "GPT-4o", input=1000, output=500) == usd("0.0075")


# -- dates ---------------------------------------------------------------------------


def test_price_change_by_request_date(openai: Pricer) -> None:
    # o3: $10 / $40 until 2025-06-09, $2 / $8 from 2025-06-10 (UTC dates).
    # 1,000,000 x 10 + 1,000,000 x 40 = 50,000,000 µ$ = $50
    assert cost(openai, "o3", when=at(2025, 6, 9, 23, 59), input=1_000_000, output=1_000_000) == usd("50")
    # 1,000,000 x 2 + 1,000,000 x 8 = 10,000,000 µ$ = $10
    assert cost(openai, "o3", when=at(2025, 6, 10, 0, 1), input=1_000_000, output=1_000_000) == usd("10")


def test_price_change_for_a_dated_snapshot_name(openai: Pricer) -> None:
    # gpt-5.6-sol: $5 in / $30 out before 2026-08-21, $4 / $20 from then on.
    # before: 10,000 x 5 + 1,000 x 30 = 50,000 + 30,000 = 80,000 µ$
    assert cost(openai, "gpt-5.6-sol-2026-07-01", when=at(2026, 8, 1), input=10_000, output=1_000) == usd("0.08")
    # after: 10,000 x 4 + 1,000 x 20 = 40,000 + 20,000 = 60,000 µ$
    assert cost(openai, "gpt-5.6-sol-2026-07-01", when=at(2026, 8, 21), input=10_000, output=1_000) == usd("0.06")


def test_time_of_day_prices() -> None:
    # deepseek-chat on api.deepseek.com: $0.27 in / $1.10 out from 00:30 to 16:30 UTC,
    # $0.135 / $0.55 otherwise.
    p = Pricer(provider_id=None, upstream_url="https://api.deepseek.com", overrides={})
    # 1,000,000 x 0.27 + 1,000,000 x 1.1 = 1,370,000 µ$
    assert cost(p, "deepseek-chat", when=at(2026, 11, 1, 12), input=1_000_000, output=1_000_000) == usd("1.37")
    # 1,000,000 x 0.135 + 1,000,000 x 0.55 = 685,000 µ$ (same day, evening)
    assert cost(p, "deepseek-chat", when=at(2026, 11, 1, 20), input=1_000_000, output=1_000_000) == usd("0.685")
    assert cost(p, "deepseek-chat", when=at(2026, 11, 1, 16, 29), input=1_000_000, output=1_000_000) == usd("1.37")
    assert cost(p, "deepseek-chat", when=at(2026, 11, 1, 16, 30), input=1_000_000, output=1_000_000) == usd("0.685")


# -- long context, cache writes, web searches ---------------------------------------


def test_long_context_tier(openai: Pricer) -> None:
    # gpt-5.4: $2.50 / $0.25 cached / $15 out; past 272,000 input tokens the whole request
    # is priced at $5 / $0.50 / $22.50.
    # 272,000 (not past): 272,000 x 2.5 + 1,000 x 15 = 680,000 + 15,000 = 695,000 µ$
    assert cost(openai, "gpt-5.4", input=272_000, output=1_000) == usd("0.695")
    # 272,001: 272,001 x 5 + 1,000 x 22.5 = 1,360,005 + 22,500 = 1,382,505 µ$
    assert cost(openai, "gpt-5.4", input=272_001, output=1_000) == usd("1.382505")
    # The threshold counts cached input too: 300,000 input of which 100,000 cached.
    # 200,000 x 5 + 100,000 x 0.5 + 2,000 x 22.5 = 1,000,000 + 50,000 + 45,000 = 1,095,000 µ$
    assert cost(openai, "gpt-5.4", input=300_000, cached=100_000, output=2_000) == usd("1.095")


def test_cache_writes_at_their_rate(openai: Pricer) -> None:
    # gpt-5.6-sol from 2026-08-21: $4 input, $0.40 cached, $5 cache write, $20 output.
    # 10,000 input = 5,000 plain + 2,000 read from cache + 3,000 written to it; 1,000 output.
    # 5,000 x 4 + 2,000 x 0.4 + 3,000 x 5 + 1,000 x 20 = 20,000 + 800 + 15,000 + 20,000 = 55,800 µ$
    assert cost(openai, "gpt-5.6-sol", input=10_000, cached=2_000, cache_write=3_000, output=1_000) == usd("0.0558")


def test_cache_writes_without_a_rate_pay_the_input_rate(openai: Pricer) -> None:
    # gpt-4o has no cache-write price: written tokens are ordinary input.
    # 10,000 x 2.5 + 1,000 x 10 = 25,000 + 10,000 = 35,000 µ$
    assert cost(openai, "gpt-4o", input=10_000, cache_write=3_000, output=1_000) == usd("0.035")


def test_web_searches_per_call(openai: Pricer) -> None:
    # gpt-4o: $10 per 1,000 web searches = $0.01 a call.
    # 1,000 x 2.5 + 500 x 10 = 7,500 µ$ = $0.0075, plus 3 x $0.01 = $0.03 -> $0.0375
    assert cost(openai, "gpt-4o", input=1000, output=500, searches=3) == usd("0.0375")
    # gpt-5-search-api has no per-call price: its searches are left out, its tokens priced.
    # $1.25 in / $10 out: 1,000 x 1.25 + 500 x 10 = 1,250 + 5,000 = 6,250 µ$
    assert cost(openai, "gpt-5-search-api", input=1000, output=500, searches=3) == usd("0.00625")


# -- providers -----------------------------------------------------------------------


def test_vendor_prefix_behind_an_unknown_gateway() -> None:
    p = Pricer(provider_id=None, upstream_url=GATEWAY, overrides={})
    # anthropic/claude-sonnet-4.5: $3 input, $0.30 cache read, $3.75 cache write, $15 output,
    # $10 per 1,000 web searches.  10,000 input = 5,000 plain + 2,000 read + 3,000 written.
    # 5,000 x 3 + 2,000 x 0.3 + 3,000 x 3.75 + 1,000 x 15 = 15,000 + 600 + 11,250 + 15,000 = 41,850 µ$
    # plus 2 searches x $0.01 = $0.02 -> $0.06185
    assert cost(p, "anthropic/claude-sonnet-4.5", input=10_000, cached=2_000, cache_write=3_000, output=1_000, searches=2) == usd("0.06185")
    # Without the prefix, the name alone finds the provider: 5,000 x 3 + 1,000 x 15 = 30,000 µ$
    assert cost(p, "claude-sonnet-4.5", input=5_000, output=1_000) == usd("0.03")
    # gpt-4o by name alone is OpenAI's: 7,500 µ$ as above.
    assert cost(p, "gpt-4o", input=1000, output=500) == usd("0.0075")
    assert cost(p, "openai/gpt-4o", input=1000, output=500) == usd("0.0075")
    # A name only one provider lists (Azure resells OpenAI's and yields to it): $0.02 / Mtok.
    # 10,000 x 0.02 = 200 µ$
    assert cost(p, "text-embedding-3-small", input=10_000) == usd("0.0002")
    # A prefix naming a provider that lacks the model, and unknown names, stay unpriced.
    assert cost(p, "anthropic/gpt-4o", input=1000, output=500) is None
    assert cost(p, "acme/secret-model", input=1000, output=500) is None


def test_provider_from_config_beats_an_unknown_url() -> None:
    p = Pricer(provider_id="openai", upstream_url="http://localhost:4000", overrides={})
    assert cost(p, "gpt-4o", input=1000, output=500) == usd("0.0075")  # 7,500 µ$ as above
    assert cost(p, "gpt-5", "priority", **GPT5_USAGE) == usd("0.405")  # 405,000 µ$ as above
    # Only OpenAI's list is searched: an Anthropic model is not OpenAI's.
    assert cost(p, "claude-sonnet-4.5", input=1000, output=500) is None
    with pytest.raises(ValueError, match="no-such-provider"):
        Pricer(provider_id="no-such-provider", upstream_url=OPENAI, overrides={})


def test_azure_prices_openai_models_on_the_standard_tier_only() -> None:
    p = Pricer(provider_id=None, upstream_url=AZURE, overrides={})
    # gpt-4o-2024-08-06 via Azure's fallback to OpenAI's list: 7,500 µ$ as above.
    assert cost(p, "gpt-4o-2024-08-06", input=1000, output=500) == usd("0.0075")
    # genai-prices ignores OpenAI's tier variants for a model Azure borrows: unpriced, never standard.
    assert cost(p, "gpt-4o-2024-08-06", "priority", input=1000, output=500) is None


# -- overrides -----------------------------------------------------------------------


def test_override_prices_a_model_the_package_lacks() -> None:
    # [prices."my-model"] input_mtok = 2.5, cached_mtok = 1.25, output_mtok = 10
    over = {"my-model": PriceOverride.model_validate({"input_mtok": 2.5, "cached_mtok": 1.25, "output_mtok": 10})}
    p = Pricer(provider_id=None, upstream_url=GATEWAY, overrides=over)
    # 6,000 x 2.5 + 4,000 x 1.25 + 1,000 x 10 = 15,000 + 5,000 + 10,000 = 30,000 µ$
    assert cost(p, "my-model", input=10_000, cached=4_000, output=1_000) == usd("0.03")
    # A dated name falls back to the undated entry; names ignore case.
    assert cost(p, "my-model-2024-08-06", input=10_000, cached=4_000, output=1_000) == usd("0.03")
    assert cost(p, "My-Model-20240806", input=10_000, cached=4_000, output=1_000) == usd("0.03")
    assert cost(p, "my-model-x", input=10_000, output=1_000) is None
    # An override is a standard-tier price: another tier is unpriced.
    assert cost(p, "my-model", "flex", input=10_000, output=1_000) is None


def test_override_wins_over_the_package(openai: Pricer) -> None:
    over = {
        "gpt-4o": PriceOverride(input_mtok=Decimal(1), output_mtok=Decimal(2)),
        "gpt-4o-2024-08-06": PriceOverride(input_mtok=Decimal(3), output_mtok=Decimal(4)),
    }
    p = Pricer(provider_id=None, upstream_url=OPENAI, overrides=over)
    # 1,000 x 1 + 500 x 2 = 2,000 µ$ (package: 7,500 µ$)
    assert cost(p, "gpt-4o", input=1000, output=500) == usd("0.002")
    # The exact dated entry beats the undated one: 1,000 x 3 + 500 x 4 = 5,000 µ$
    assert cost(p, "gpt-4o-2024-08-06", input=1000, output=500) == usd("0.005")
    # Dated names not overridden exactly use the alias's override: 2,000 µ$
    assert cost(p, "gpt-4o-2024-11-20", input=1000, output=500) == usd("0.002")
    # Without cached_mtok, cached input pays the override's input rate: 1,000 x 1 + 500 x 2 = 2,000 µ$
    assert cost(p, "gpt-4o", input=1000, cached=600, output=500) == usd("0.002")
    # Other models keep the package price: 1,000 x 1.25 + 500 x 10 = 6,250 µ$ (gpt-5)
    assert cost(p, "gpt-5", input=1000, output=500) == usd("0.00625")
    assert cost(openai, "gpt-4o", input=1000, output=500) == usd("0.0075")  # other Pricers unaffected


def test_override_cache_writes_and_web_searches() -> None:
    over = {
        "house-model": PriceOverride.model_validate(
            {"input_mtok": 2, "cached_mtok": 0.5, "cache_write_mtok": 2.5, "output_mtok": 8, "web_search_per_call": 0.025}
        )
    }
    p = Pricer(provider_id=None, upstream_url=GATEWAY, overrides=over)
    # 10,000 input = 5,000 plain + 2,000 read + 3,000 written; 1,000 output; 4 searches at $0.025.
    # 5,000 x 2 + 2,000 x 0.5 + 3,000 x 2.5 + 1,000 x 8 = 10,000 + 1,000 + 7,500 + 8,000 = 26,500 µ$
    # + 4 x $0.025 = $0.10 -> $0.1265
    assert cost(p, "house-model", input=10_000, cached=2_000, cache_write=3_000, output=1_000, searches=4) == usd("0.1265")


def test_override_validation() -> None:
    o = PriceOverride.model_validate({"input_mtok": 0.1, "output_mtok": 0.3})
    assert (o.input_mtok, o.output_mtok, o.cached_mtok) == (usd("0.1"), usd("0.3"), None)  # floats read as written
    with pytest.raises(pydantic.ValidationError):
        PriceOverride.model_validate({"input_mtok": 1})  # output_mtok is required
    with pytest.raises(pydantic.ValidationError):
        PriceOverride.model_validate({"input_mtok": 1, "output_mtok": 2, "cache_read_mtok": 1})  # a typo
    with pytest.raises(pydantic.ValidationError):
        PriceOverride.model_validate({"input_mtok": -1, "output_mtok": 2})


# -- usage shapes ----------------------------------------------------------------------


def test_usage_shapes(openai: Pricer) -> None:
    # Embeddings: input only.  text-embedding-3-small $0.02: 10,000 x 0.02 = 200 µ$
    assert openai.cost("text-embedding-3-small", None, NOV, 10_000, None, None, None, None, None) == usd("0.0002")
    # No token counts at all: nothing to price.
    assert openai.cost("gpt-4o", None, NOV, None, None, None, None, None, None) is None
    # An embeddings model has no output price: output tokens cannot be priced honestly.
    assert openai.cost("text-embedding-3-small", None, NOV, 10_000, None, None, 5, None, None) is None
    # Impossible usage (more cached than input, reasoning beyond output, negative) is not priced.
    assert cost(openai, "gpt-4o", input=100, cached=200, output=10) is None
    assert cost(openai, "o3", input=100, output=10, reasoning=20) is None
    assert cost(openai, "gpt-4o", input=-1, output=10) is None


# -- records -------------------------------------------------------------------------


def _record(**fields: object) -> Record:
    base: dict[str, object] = {
        "id": "r1",
        "started_at": NOV,
        "finished_at": NOV + 1,
        "method": "POST",
        "path": "/v1/responses",
        "endpoint": "responses",
    }
    base.update(fields)
    return Record(**base)  # type: ignore[arg-type]


def test_price_record(openai: Pricer) -> None:
    r = _record(model="gpt-5-2025-08-07", service_tier="flex", service_tier_requested="auto", **_record_usage())
    openai.price_record(r)
    assert (r.cost_usd, r.priced) == (usd("0.10125"), True)  # the served tier (flex), 101,250 µ$ as above

    r = _record(model_requested="gpt-5", service_tier="priority", **_record_usage())  # no model in the answer
    openai.price_record(r)
    assert (r.cost_usd, r.priced) == (usd("0.405"), True)

    r = _record(model="gpt-5", service_tier="scale", **_record_usage())  # a tier without a price
    openai.price_record(r)
    assert (r.cost_usd, r.priced) == (None, False)

    r = _record(model="gpt-5", anomalies=("total",), **_record_usage())  # invariants broken: never priced
    openai.price_record(r)
    assert (r.cost_usd, r.priced) == (None, False)

    r = _record(model="gpt-5", cost_usd=usd("1"), priced=True)  # no usage: nothing to price
    openai.price_record(r)
    assert (r.cost_usd, r.priced) == (None, False)

    # The request's own date picks the price: o3 on 2025-06-01 at $10 / $40.
    # 1,000 x 10 + 1,000 x 40 = 50,000 µ$
    r = _record(model="o3", started_at=at(2025, 6, 1), input_tokens=1000, output_tokens=1000, total_tokens=2000)
    openai.price_record(r)
    assert (r.cost_usd, r.priced) == (usd("0.05"), True)


def _record_usage() -> dict[str, int]:
    return {
        "input_tokens": 100_000,
        "cached_tokens": 20_000,
        "output_tokens": 10_000,
        "reasoning_tokens": 8_000,
        "total_tokens": 110_000,
    }


# -- agreement with genai-prices, speed ------------------------------------------------

_DATES = [at(2025, 6, 1), at(2026, 9, 1), at(2026, 11, 1, 12), at(2026, 11, 1, 20)]


def _random_usage(rng: random.Random) -> dict[str, int]:
    inp = rng.choice([0, 1, 999, 150_000, 250_000, 300_000, 1_200_000]) + rng.randrange(50)
    cached = rng.randrange(inp // 2 + 1)
    cache_write = rng.randrange((inp - cached) // 2 + 1)
    out = rng.randrange(1, 40_000)
    return {
        "input": inp,
        "cached": cached,
        "cache_write": cache_write,
        "output": out,
        "reasoning": rng.randrange(out + 1),
        "searches": rng.randrange(4),
    }


@functools.cache
def _every_model() -> list[tuple[Provider, Pricer, ModelInfo]]:
    """Each model of the snapshot whose id is one of its own names, with a Pricer for its provider."""
    out = []
    for provider in get_snapshot().providers:
        pricer = Pricer(provider_id=provider.id, upstream_url="", overrides={})
        out += [(provider, pricer, m) for m in provider.models if provider.find_model(m.id) is m]
    return out


def test_agrees_with_genai_prices_for_every_model() -> None:
    """The flattened fast path gives the package's own `calc_price` result, for every model, tier and date."""
    rng = random.Random(7)
    compared = 0
    for provider, pricer, model in _every_model():
        tiers = {None} | {v.when["service_tier"] for v in model.price_variants or () if "service_tier" in v.when}
        for tier in sorted(tiers, key=str):
            for when in _DATES:
                u = _random_usage(rng)
                mine = cost(pricer, model.id, tier, when, **u)
                if mine is None:
                    continue
                usage = Usage(
                    input_tokens=u["input"],
                    cache_read_tokens=u["cached"],
                    cache_write_tokens=u["cache_write"],
                    output_tokens=u["output"],
                    output_reasoning_tokens=u["reasoning"],
                    web_searches=u["searches"],
                )
                theirs = package_calc_price(
                    usage,
                    model.id,
                    provider_id=provider.id,
                    genai_request_timestamp=datetime.fromtimestamp(when, UTC),
                    price_context={"service_tier": tier or "default"},
                ).total_price
                assert mine == theirs.quantize(Decimal("1e-9")), (provider.id, model.id, tier, when, u)
                compared += 1
    assert compared > 2000


def test_unpriced_only_for_a_reason() -> None:
    """Standard-tier `None` for a known model means its price lacks an input or output token
    rate, or has a rate per audio or image token (see the test below)."""
    for provider, pricer, model in _every_model():
        if cost(pricer, model.id, None, NOV, input=1000, output=100) is None:
            prices = model.get_prices(datetime.fromtimestamp(NOV, UTC))
            by_modality = any(getattr(prices, name, None) is not None for name in MODALITY_PRICES)
            assert prices.input_mtok is None or prices.output_mtok is None or by_modality, (provider.id, model.id)


MODALITY_PRICES = ("input_audio_mtok", "cache_audio_read_mtok", "output_audio_mtok", "input_image_mtok", "cache_image_read_mtok", "output_image_mtok")


@pytest.mark.parametrize("model", ["gpt-audio", "gpt-audio-mini-2025-10-06", "gpt-realtime", "gpt-image-1"])
def test_a_model_priced_per_audio_or_image_token_is_unpriced(openai: Pricer, model: str) -> None:
    """A usage block's counts include its audio (or image) tokens, which cost several times
    a text token (gpt-audio: $32 against $2.50 per million in, $64 against $10 out), and
    the ledger keeps no count of them: priced at the text rates, a gpt-audio call with
    44,000 audio tokens of 64,000 in and 5,000 of 9,000 out was $0.25 instead of $1.818.
    Such a model is unpriced (NULL, counted), never priced low; a config override prices it."""
    assert cost(openai, model, None, NOV, input=64_000, output=9_000) is None
    priced = Pricer(provider_id=None, upstream_url=OPENAI, overrides={model: PriceOverride(input_mtok=Decimal(32), output_mtok=Decimal(64))})
    assert cost(priced, model, None, NOV, input=1_000_000, output=0) == Decimal(32)


def test_a_text_model_that_reads_images_is_priced(openai: Pricer) -> None:
    assert cost(openai, "gpt-4o", None, NOV, input=1_000_000, output=0) == Decimal("2.5")


def test_warm_call_is_fast(openai: Pricer) -> None:
    cost(openai, "gpt-5.4", "priority", input=300_000, cached=1000, output=500, reasoning=100, searches=1)
    n = 20_000
    seconds = min(timeit.repeat(lambda: openai.cost("gpt-5.4", "priority", NOV, 300_000, 1000, 0, 500, 100, 1), number=n, repeat=3))
    assert seconds / n < 50e-6  # measured ~1.5 µs; generous for slow CI machines


# -- the fast path against the full Decimal computation --------------------------------

NANO = Decimal("1e-9")


def _rates_of_every_scale() -> list[_Rates]:
    """Rates whose most precise price has 0 to 14 decimal places (per million tokens), plus every
    distinct scale the snapshot's models have."""
    made = [_Rates([(Decimal(1).scaleb(-places), None, None, Decimal(3), None)], None, None) for places in range(15)]
    seen = {r.exponent for r in made}
    for _provider, _pricer, model in _every_model():
        prices = [c.prices for c in model.prices] if isinstance(model.prices, list) else [model.prices]
        for p in prices:
            r = _Rates.from_model_price(p)
            if r.exponent not in seen:
                seen.add(r.exponent)
                made.append(r)
    return made


def test_usd_is_the_decimal_chain_digit_for_digit() -> None:
    """`usd` (integer rounding, one Decimal product) is `Decimal(total).scaleb(e).quantize(1e-9)`, for
    every scale, around every rounding boundary (ties to even), and at and past the exact range."""
    rng = random.Random(16)
    compared = 0
    for rates in _rates_of_every_scale():
        down = rates.down
        totals = {0, 1, 4, 5, 6, 9, 10, 11, 15, 25, 35, 10**12 + 7}
        for k in (0, 1, 2, 3, 7, 10**9 + 1):
            totals |= {k * down + down // 2 + d for d in (-1, 0, 1)}
        totals |= {rng.randrange(10 ** rng.randrange(1, 30)) for _ in range(300)}
        edge = rates.exact_below
        totals |= {edge - 1, edge, edge + 1, 10**27, 10**28 - 1, 10**28, 10**30, -1, -5, -(10**9) - 5}
        for total in sorted(totals):
            try:
                want: Decimal | type = Decimal(total).scaleb(rates.exponent).quantize(NANO)
            except ArithmeticError as e:
                want = type(e)
            try:
                got: Decimal | type = rates.usd(total)
            except ArithmeticError as e:
                got = type(e)
            assert str(got) == str(want), (rates.exponent, total, got, want)
            compared += 1
    assert compared > 5000


def _usage_fields(rng: random.Random) -> dict[str, int | None]:
    """A record's usage fields in every shape: counts or None, cached, cache writes, reasoning, searches,
    now and then an impossible one."""
    u: dict[str, int | None] = {f"{k}_tokens" if k != "searches" else "web_search_calls": v for k, v in _random_usage(rng).items()}
    for name in list(u):
        if rng.random() < 0.15:
            u[name] = None
    if rng.random() < 0.05:
        u[rng.choice(list(u))] = -rng.randrange(1, 5)
    return u


def test_price_record_is_cost_on_every_model_and_usage_shape() -> None:
    """`price_record` (fields read once, inline) prices exactly as `cost()` does: every model of the
    snapshot with each of its tiers and dates, usage shapes with Nones and impossible counts, overrides
    and unknown models; the same Decimal digit for digit."""
    rng = random.Random(4)
    over = {
        "house-model": PriceOverride.model_validate({"input_mtok": 2.0001, "cached_mtok": 0.5, "cache_write_mtok": 2.5, "output_mtok": 8, "web_search_per_call": 0.025}),
        "gpt-4o": PriceOverride(input_mtok=Decimal("1.123456789"), output_mtok=Decimal(2)),
    }
    cases = [(pricer, model.id, tier) for _provider, pricer, model in _every_model()
             for tier in {None, "default", "flex", "priority"} | {v.when["service_tier"] for v in model.price_variants or () if "service_tier" in v.when}]
    overridden = Pricer(provider_id=None, upstream_url=OPENAI, overrides=over)
    cases += [(overridden, m, t) for m in ("house-model", "House-Model-20250101", "gpt-4o", "gpt-4o-2024-08-06", "no-such-model", "") for t in (None, "auto", "flex")]
    compared = priced = 0
    for pricer, model, tier in cases:
        for when in _DATES:
            u = _usage_fields(rng)
            r = _record(model=model if rng.random() < 0.7 else None, model_requested=model, service_tier=tier, started_at=when, cost_usd=usd("9"), priced=True, **u)
            pricer.price_record(r)
            want = pricer.cost(model, tier, when, u["input_tokens"], u["cached_tokens"], u["cache_write_tokens"], u["output_tokens"], u["reasoning_tokens"], u["web_search_calls"])
            assert (str(r.cost_usd), r.priced) == (str(want), want is not None), (model, tier, when, u)
            compared += 1
            priced += want is not None
    assert compared > 5000 and priced > 2000


def test_a_bad_price_override_is_named_as_written(tmp_path: Path) -> None:
    # Only the setting's own name is spelled as its flag is (price-overrides); the model's
    # name after it is the user's text: 'my_model' was shown as 'my-model', a model the
    # config does not name.
    from meter.config import SettingError, load_settings

    config = tmp_path / "meter.toml"
    config.write_text('[prices]\n"my_model_x" = { input = "bad", output = 1 }\n')
    with pytest.raises(SettingError) as refused:
        load_settings({"config": str(config)}, env={})
    assert str(refused.value).startswith("price-overrides.my_model_x."), refused.value

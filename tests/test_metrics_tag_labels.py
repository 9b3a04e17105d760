"""`--metrics-tag-labels`: chosen tags as labels on the request, token and cost metrics (SPEC §6).

A real meter in front of the fake provider; the tags come from the request's
`metadata` and `Meter-Tag-*` headers (merged as the ledger's `tags`), sent by
the official SDK.
What is checked: the counters split by `tag_<name>` add up to what was sent;
each tag's values are bounded like `key` (`--metrics-max-keys`, then `other`,
admitted only from requests the upstream accepted); a bad name stops start-up
with one line naming it (flag, variable, config file); without the setting no
series has a tag label and `done` never reads a record's tags.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from meter.config import SettingError, load_settings
from meter.metrics import Metrics
from meter.record import Record
from meter.tag_labels import tag_label_name, tag_label_names

from .conftest import ROOT
from .test_metrics import GPT4O, U2, U3, fake_usage, scrape, sdk


async def test_counters_split_by_tag_add_up(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, metrics_tag_labels="team,feature-flag", price_provider="openai")
    client = sdk(meter.url)
    sent = [
        ({"team": "search", "feature-flag": "autocomplete"}, U2),
        ({"team": "search", "feature-flag": "autocomplete"}, U2),
        ({"team": "support", "unrelated": "x"}, U3),
        (None, U3),
    ]
    for metadata, usage in sent:
        extra = {"metadata": metadata} if metadata is not None else {}
        await client.responses.create(model="gpt-4o", input="hi", extra_headers=fake_usage(**usage), **extra)
    # A chat stream carries its metadata too.
    chunks = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True},
        metadata={"team": "support"}, store=True, extra_headers={**fake_usage(**U3), "x-fake-deltas": "2"},
    )
    async for _ in chunks:
        pass
    await client.close()

    m = await scrape(meter.admin_url)
    assert m.by("meter_requests_total", "tag_team") == {"search": 2, "support": 2, "": 1}
    assert m.by("meter_requests_total", "tag_feature_flag") == {"autocomplete": 2, "": 3}
    tokens = m.by("meter_tokens_total", "tag_team", type="input")
    assert tokens == {"search": 2 * U2["input_tokens"], "support": 2 * U3["input_tokens"], "": U3["input_tokens"]}
    assert m.by("meter_tokens_total", "tag_feature_flag", type="output") == {
        "autocomplete": 2 * U2["output_tokens"], "": 3 * U3["output_tokens"],
    }
    # Cost by tag sums to the whole; each group is priced (gpt-4o has a price).
    cost = m.by("meter_cost_usd_total", "tag_team")
    assert set(cost) == {"search", "support", ""} and all(v > 0 for v in cost.values())
    assert sum(cost.values()) == pytest.approx(m.value("meter_cost_usd_total"))
    # Other families keep their labels.
    for name, labels, _ in m.samples:
        has_tags = {label for label in labels if label.startswith("tag_")}
        if name.startswith(("meter_requests_total", "meter_tokens_total", "meter_cost_usd_total")):
            assert has_tags == {"tag_team", "tag_feature_flag"}, (name, labels)
        else:
            assert not has_tags, (name, labels)
    assert {labels["model"] for labels, _ in m.select("meter_requests_total")} == {GPT4O}


async def test_tag_values_are_bounded_like_keys(upstream, start_meter) -> None:
    max_values = 3
    meter = await start_meter(upstream.url, metrics_tag_labels=["team"], metrics_max_keys=max_values)
    client = sdk(meter.url)
    # Refused requests come first: their values must not use up the budget.
    for i in range(5):
        with pytest.raises(openai.AuthenticationError):
            await client.responses.create(
                model="gpt-4o", input="hi", metadata={"team": f"refused-{i}"}, extra_headers={"x-fake-scenario": "status:401"},
            )
    n = 12
    for i in range(n):
        await client.responses.create(model="gpt-4o", input="hi", metadata={"team": f"team-{i:02d}"}, extra_headers=fake_usage(**U3))
    await client.responses.create(model="gpt-4o", input="hi", metadata={"team": "t" * 300}, extra_headers=fake_usage(**U3))
    # A value once admitted counts as itself on a refused request too.
    with pytest.raises(openai.AuthenticationError):
        await client.responses.create(model="gpt-4o", input="hi", metadata={"team": "team-00"}, extra_headers={"x-fake-scenario": "status:401"})
    await client.close()

    m = await scrape(meter.admin_url)
    by_team = m.by("meter_requests_total", "tag_team")
    assert set(by_team) == {"team-00", "team-01", "team-02", "other"}, by_team
    assert by_team["other"] == 5 + (n - max_values) + 1  # the refused ones, the late ones, the one too long
    assert by_team["team-00"] == 2
    for name in ("meter_requests_total", "meter_tokens_total", "meter_cost_usd_total"):
        assert len(m.label_values(name, "tag_team") - {"other", ""}) <= max_values, name


async def test_without_the_setting_no_tag_label(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url)
    await sdk(meter.url).responses.create(model="gpt-4o", input="hi", metadata={"team": "search"}, extra_headers=fake_usage(**U2))
    m = await scrape(meter.admin_url)
    assert m.value("meter_requests_total") == 1
    assert not [labels for _, labels, _ in m.samples if any(label.startswith("tag_") for label in labels)]


def _record(tags: str | None) -> Record:
    return Record(
        id=None, started_at=0.0, finished_at=0.0, method="POST", path="/v1/responses", endpoint="responses", status_code=200,
        model="gpt-4o", key_name="team-search", input_tokens=10, output_tokens=5, cost_usd=Decimal("0.001"), tags=tags, duration_ms=5.0,
    )


def _per_record(metrics: Metrics, record: Record, n: int = 2000) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            metrics.done(None, record)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def test_tags_are_read_only_when_tag_labels_are_chosen() -> None:
    """Without the setting a record's tags cost nothing: a 256 KiB tags text is never parsed."""
    big = json.dumps({f"k{i}": "v" * 200 for i in range(1300)})
    assert len(big) > 256_000
    plain = Metrics(types.SimpleNamespace())
    without = _per_record(plain, _record(None))
    with_big_tags = _per_record(plain, _record(big))
    assert with_big_tags < 3 * without + 2e-6, (without, with_big_tags)
    # The same record with tag labels chosen does parse it (so the check above can fail).
    tagged = Metrics(types.SimpleNamespace(metrics_tag_labels=("k1",), metrics_max_keys=10))
    assert _per_record(tagged, _record(big), n=50) > 10 * without
    assert 'tag_k1="' + "v" * 128 not in tagged.render().decode(), "a 200-character value counts as other"
    assert 'tag_k1="other"' in tagged.render().decode()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("team,bad name", "'bad name' is not a tag name"),
        ("x" * 65, "is not a tag name"),
        ("team,Team", "'team' is named twice"),
        ("my-flag,my_flag", "would both be the label tag_my_flag"),
        (",".join(f"t{i}" for i in range(17)), "at most 16"),
    ],
)
def test_bad_names_are_refused_naming_them(value: str, problem: str) -> None:
    with pytest.raises(SettingError) as info:
        load_settings({"metrics_tag_labels": value}, env={})
    assert str(info.value).startswith("metrics-tag-labels: ") and problem in str(info.value)


def test_names_from_every_source(tmp_path: Path) -> None:
    assert load_settings({"metrics_tag_labels": " Team , feature-flag,"}, env={}).metrics_tag_labels == ("team", "feature-flag")
    assert load_settings({}, env={"METER_METRICS_TAG_LABELS": "team"}).metrics_tag_labels == ("team",)
    config = tmp_path / "meter.toml"
    config.write_text('metrics_tag_labels = ["team", "feature"]\n')
    assert load_settings({"config": str(config)}, env={}).metrics_tag_labels == ("team", "feature")
    assert load_settings({}, env={}).metrics_tag_labels == ()
    assert [tag_label_name(n) for n in tag_label_names("a-b,c")] == ["tag_a_b", "tag_c"]


@pytest.mark.parametrize("source", ["flag", "env", "config"])
def test_meter_serve_refuses_a_bad_name_in_one_line(source: str, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "meter", "serve", "--ledger", str(tmp_path / "l.duckdb"), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if source == "flag":
        argv += ["--metrics-tag-labels", "team,bad!"]
    elif source == "env":
        env["METER_METRICS_TAG_LABELS"] = "team,bad!"
    else:
        config = tmp_path / "meter.toml"
        config.write_text('metrics_tag_labels = ["team", "bad!"]\n')
        argv += ["--config", str(config)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    origin = {"flag": "", "env": " (set by METER_METRICS_TAG_LABELS)"}.get(source, f" (set in {tmp_path / 'meter.toml'})")
    assert lines == ["meter: error: metrics-tag-labels: 'bad!' is not a tag name (letters, digits, _ and -, up to 64 characters)" + origin], proc.stderr
    assert not (tmp_path / "l.duckdb").exists(), "nothing started"


async def test_header_tags_label_the_metrics_and_win_over_metadata(upstream, start_meter) -> None:
    meter = await start_meter(upstream.url, metrics_tag_labels="team,feature")
    client = sdk(meter.url)
    # A header tag alone; a header over the same name in metadata; the name's case does not matter.
    await client.responses.create(model="gpt-4o", input="hi", extra_headers={**fake_usage(**U3), "Meter-Tag-Team": "search"})
    await client.responses.create(
        model="gpt-4o", input="hi", metadata={"team": "from-body", "feature": "autocomplete"},
        extra_headers={**fake_usage(**U3), "meter-tag-TEAM": "support"},
    )
    await client.close()
    m = await scrape(meter.admin_url)
    assert m.by("meter_requests_total", "tag_team") == {"search": 1, "support": 1}
    assert m.by("meter_tokens_total", "tag_feature", type="input") == {"": U3["input_tokens"], "autocomplete": U3["input_tokens"]}


async def test_metadata_keys_are_tag_names_in_lower_case_as_reports_and_budgets_read_them(upstream, start_meter) -> None:
    # A report's `tag:Team` is `tag:team` (names are case-insensitive): a metadata key
    # kept as `Team` was reachable by no report, budget or metric label, and beside a
    # `Meter-Tag-Team` header the row held both, the header not winning.
    meter = await start_meter(upstream.url, metrics_tag_labels="team")
    client = sdk(meter.url)
    await client.responses.create(model="gpt-4o", input="hi", metadata={"Team": "search", "APP": "crm", "app": "dropped"})
    await client.responses.create(model="gpt-4o", input="hi", metadata={"Team": "body"}, extra_headers={"Meter-Tag-Team": "header"})
    first, second = await meter.rows()
    assert json.loads(first["tags"]) == {"team": "search", "app": "crm"}  # of two keys one but for case, the first
    assert json.loads(second["tags"]) == {"team": "header"}
    assert (await scrape(meter.admin_url)).by("meter_requests_total", "tag_team") == {"search": 1, "header": 1}
    from .test_admin import arun_meter

    await meter.stop()
    result = await arun_meter("report", "--ledger", str(meter.ledger_path), "--by", "tag:Team", "--format", "json")
    assert result.returncode == 0, result.stderr
    groups = {g["tag:team"]: g["requests"] for g in json.loads(result.stdout) if g.get("tag:team") is not None}
    assert groups == {"search": 1, "header": 1}

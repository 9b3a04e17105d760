"""The Prometheus alerting rules in deploy/prometheus/alerts.yml, checked and unit-tested by promtool.

- `promtool check rules` accepts the file (and refuses a broken copy, so the
  check means something).
- `promtool test rules` runs the cases below: for each alert, input series
  that must fire it (at the right time, with its labels and its annotations
  rendered by Prometheus' own templates) and series that must not. A copy of
  the rules with one threshold changed fails the same cases.
- Every rule has a severity, a summary and a description; its expression uses
  only meter's metric names and labels (SPEC §6, parsed by
  tests/dashboard_queries.py); together they cover what SPEC §11 asks for:
  budget share, error ratio, time-to-first-token p99, a failing ledger,
  unpriced requests.
- The Kubernetes manifest (deploy/k8s/prometheusrule.yaml) holds the same groups.

promtool comes with Debian's `prometheus` package (scripts/test installs it);
without it these tests fail, never skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from meter.reconcile.schedule import ReconcileMetrics, ReconcileSchedule, RunSummary

from .dashboard_queries import analyse
from .test_dashboards import SERIES, SPEC_VALUES

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"

# Prometheus adds these to every scraped series; rules may group by them.
TARGET_LABELS = frozenset({"instance", "job"})
# SPEC §6's series (tests/test_dashboards.py) with the target labels.
SCHEMA = {series: labels | TARGET_LABELS for series, labels in SERIES.items()}


def reconcile_series() -> dict[str, frozenset[str]]:
    """`meter serve --reconcile-every`'s series with their labels, from its real collector after a run."""
    schedule = ReconcileSchedule(lambda: RunSummary({}, 0.0), every=3600)
    schedule.state.last = RunSummary({"match": 1}, 0.0)
    return {s.name: frozenset(s.labels) for family in ReconcileMetrics(schedule).collect() for s in family.samples}


SCHEMA |= {series: labels | TARGET_LABELS for series, labels in reconcile_series().items()}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("`promtool` is not on PATH: apt-get install prometheus (Debian/Ubuntu ship promtool with it)", pytrace=False)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, check=False)


def rules_doc(path: Path = RULES) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def alerts(doc: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    doc = doc or rules_doc()
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule}


def rendered(alert: str, value: str, **labels: str) -> dict[str, str]:
    """The alert's annotations as Prometheus should render them, from the rules file's templates.

    `value` is the text the template's `$value` (with its humanize function) must
    become; `{{ $labels.x }}` becomes `labels[x]`.  promtool renders the real
    templates and compares them with these.
    """
    out = {}
    for name, template in alerts()[alert]["annotations"].items():
        text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)
        text = re.sub(r"\{\{\s*\$value(\s*\|\s*\w+)?\s*\}\}", value, text)
        assert "{{" not in text, f"{alert}: a template this test cannot render: {text}"
        out[name] = text
    return out


def firing(alert: str, value: str, **labels: str) -> dict[str, Any]:
    severity = alerts()[alert]["labels"]["severity"]
    return {"exp_labels": {**labels, "severity": severity}, "exp_annotations": rendered(alert, value, **labels)}


def case(series: dict[str, str], checks: list[tuple[str, str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """One promtool test group: input series (selector -> values) and (eval_time, alert, expected alerts)."""
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [{"eval_time": t, "alertname": a, "exp_alerts": exp} for t, a, exp in checks],
    }


def unit_tests() -> list[dict[str, Any]]:
    near, exhausted = "MeterBudgetNearLimit", "MeterBudgetExhausted"
    ttft = "meter_time_to_first_token_seconds_bucket"
    return [
        # Budget share: the max over replicas (replica b lags behind a); another budget stays quiet.
        case(
            {
                'meter_budget_spend_usd{budget="search",instance="a"}': "0+10x60",
                'meter_budget_spend_usd{budget="search",instance="b"}': "0+9x60",
                'meter_budget_limit_usd{budget="search",instance="a"}': "500x60",
                'meter_budget_limit_usd{budget="search",instance="b"}': "500x60",
                'meter_budget_spend_usd{budget="support",instance="a"}': "0+1x60",
                'meter_budget_limit_usd{budget="support",instance="a"}': "500x60",
            },
            [
                ("30m", near, []),  # 60%
                ("40m", near, [firing(near, "80%", budget="search")]),
                ("40m", exhausted, []),
                ("50m", near, []),  # past the limit: the critical one alone
                ("50m", exhausted, [firing(exhausted, "100%", budget="search")]),
                ("60m", exhausted, [firing(exhausted, "120%", budget="search")]),
            ],
        ),
        # Webhook failures for 15 minutes.
        case(
            {'meter_alert_failures_total{budget="search",instance="a"}': "0+1x40", 'meter_alerts_sent_total{budget="search",instance="a"}': "0x40"},
            [("10m", "MeterBudgetWebhookFailing", []), ("30m", "MeterBudgetWebhookFailing", [firing("MeterBudgetWebhookFailing", "", budget="search")])],
        ),
        # 10% errors over two replicas, for long enough; budget refusals do not dilute them.
        case(
            {
                'meter_requests_total{outcome="rejected",instance="a"}': "0+500x40",
                'meter_requests_total{outcome="completed",instance="a"}': "0+45x40",
                'meter_requests_total{outcome="completed",instance="b"}': "0+45x40",
                'meter_requests_total{outcome="error",instance="a"}': "0+6x40",
                'meter_requests_total{outcome="upstream_timeout",instance="b"}': "0+4x40",
            },
            [("8m", "MeterHighErrorRatio", []), ("25m", "MeterHighErrorRatio", [firing("MeterHighErrorRatio", "10%")])],
        ),
        # Budget refusals and clients hanging up are not errors.
        case(
            {
                'meter_requests_total{outcome="completed",instance="a"}': "0+90x40",
                'meter_requests_total{outcome="rejected",instance="a"}': "0+100x40",
                'meter_requests_total{outcome="client_disconnected",instance="a"}': "0+50x40",
                'meter_requests_total{outcome="error",instance="a"}': "0+3x40",
            },
            [("25m", "MeterHighErrorRatio", [])],
        ),
        # Half the requests fail, but there are too few of them to page anyone.
        case(
            {'meter_requests_total{outcome="completed",instance="a"}': "0+1x40", 'meter_requests_total{outcome="error",instance="a"}': "0+1x40"},
            [("25m", "MeterHighErrorRatio", [])],
        ),
        # Time to first token: gpt-5's first tokens come after 30-60 s, gpt-4o's within a second.
        case(
            {
                **{f'{ttft}{{model="gpt-5",le="{le}",instance="a"}}': "0x40" for le in ("1.0", "10.0", "30.0")},
                **{f'{ttft}{{model="gpt-5",le="{le}",instance="a"}}': "0+10x40" for le in ("60.0", "+Inf")},
                **{f'{ttft}{{model="gpt-4o",le="{le}",instance="a"}}': "0+10x40" for le in ("1.0", "10.0", "30.0", "60.0", "+Inf")},
            },
            [
                ("10m", "MeterTimeToFirstTokenP99High", []),
                ("30m", "MeterTimeToFirstTokenP99High", [firing("MeterTimeToFirstTokenP99High", "59.7s", model="gpt-5")]),
            ],
        ),
        # An unpriced request alerts at once and for the 15 minutes after it; so does a model's
        # first one, whose series appears at 1 (meter creates it at its first count).
        case(
            {
                'meter_unpriced_requests_total{model="acme-model",instance="a"}': "0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
                'meter_unpriced_requests_total{model="new-model",instance="a"}': "_ _ _ 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
            },
            [
                ("2m", "MeterUnpricedRequests", []),
                (
                    "5m", "MeterUnpricedRequests",
                    [firing("MeterUnpricedRequests", "", model="acme-model"), firing("MeterUnpricedRequests", "", model="new-model")],
                ),
                ("25m", "MeterUnpricedRequests", []),
            ],
        ),
        # Ledger: replica a fails with records waiting; replica b had errors but its backlog is gone.
        case(
            {
                'meter_ledger_write_errors_total{instance="a"}': "0+1x30",
                'meter_ledger_pending_records{instance="a"}': "0+100x30",
                'meter_ledger_written_records_total{instance="a"}': "0x30",
                'meter_ledger_write_errors_total{instance="b"}': "0+1x30",
                'meter_ledger_pending_records{instance="b"}': "0x30",
                'meter_ledger_written_records_total{instance="b"}': "0+500x30",
            },
            [("3m", "MeterLedgerFailing", []), ("15m", "MeterLedgerFailing", [firing("MeterLedgerFailing", "", instance="a")])],
        ),
        # A stuck writer: records wait, none are written, no errors.
        case(
            {
                'meter_ledger_pending_records{instance="a"}': "50x40",
                'meter_ledger_written_records_total{instance="a"}': "1000x40",
                'meter_ledger_write_errors_total{instance="a"}': "0x40",
                'meter_ledger_pending_records{instance="b"}': "50x40",
                'meter_ledger_written_records_total{instance="b"}': "1000+100x40",
            },
            [
                ("8m", "MeterLedgerStalled", []),
                ("30m", "MeterLedgerStalled", [firing("MeterLedgerStalled", "50", instance="a")]),
                ("30m", "MeterLedgerFailing", []),
            ],
        ),
        # The books drift on replica a (2 groups differ from 30 minutes on) for 2 hours; replica b,
        # not reconciling, has no series; meter_missing stays 0 and matches are no drift.
        case(
            {
                'meter_reconcile_groups{verdict="differs",instance="a"}': "0x30 2x200",
                'meter_reconcile_groups{verdict="meter_missing",instance="a"}': "0x230",
                'meter_reconcile_groups{verdict="match",instance="a"}': "40x230",
            },
            [
                ("20m", "MeterBooksDrift", []),
                ("140m", "MeterBooksDrift", []),  # pending: under 2 hours
                ("160m", "MeterBooksDrift", [firing("MeterBooksDrift", "2", verdict="differs")]),
            ],
        ),
        # Records the store refused.
        case(
            {'meter_ledger_rejected_records_total{instance="a"}': "0 0 0 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5"},
            [("2m", "MeterLedgerRejectedRecords", []), ("4m", "MeterLedgerRejectedRecords", [firing("MeterLedgerRejectedRecords", "", instance="a")])],
        ),
        # Records dropped: neither the ledger nor the spool took them.
        case(
            {'meter_ledger_dropped_records_total{instance="a"}': "0 0 0 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7"},
            [("2m", "MeterLedgerDroppedRecords", []), ("4m", "MeterLedgerDroppedRecords", [firing("MeterLedgerDroppedRecords", "", instance="a")])],
        ),
    ]


def write_tests(tmp_path: Path, rules: Path) -> Path:
    path = tmp_path / "alerts.test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": unit_tests()}, sort_keys=False))
    return path


# promtool ----------------------------------------------------------------------------------------


def test_promtool_check_rules_accepts_the_rules() -> None:
    result = run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_check_rules_refuses_a_broken_copy(tmp_path: Path) -> None:
    doc = rules_doc()
    doc["groups"][0]["rules"][0]["expr"] = "sum by (budget) (meter_budget_spend_usd"
    broken = tmp_path / "alerts.yml"
    broken.write_text(yaml.safe_dump(doc))
    result = run("check", "rules", str(broken))
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    result = run("test", "rules", str(write_tests(tmp_path, RULES)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("MeterBudgetNearLimit", ">= 0.8 < 1", ">= 0.9 < 1"),
        ("MeterHighErrorRatio", 'outcome!="rejected"}[5m]))\n', "}[5m]))\n"),
        ("MeterHighErrorRatio", 'outcome=~"error|failed|upstream_unreachable|upstream_timeout"', 'outcome!~"completed|in_progress|incomplete"'),
        ("MeterTimeToFirstTokenP99High", "> 30", "> 60"),
        ("MeterLedgerFailing", "and meter_ledger_pending_records > 0", "or meter_ledger_pending_records > 0"),
        ("MeterBooksDrift", 'verdict!="match"', 'verdict!="differs"'),
        ("MeterBooksDrift", "> 0", "> 2"),
        ("MeterUnpricedRequests", "\nor sum by (model) (meter_unpriced_requests_total unless meter_unpriced_requests_total offset 15m) > 0", ""),
    ],
)
def test_unit_tests_fail_when_a_rule_changes(tmp_path: Path, alert: str, old: str, new: str) -> None:
    """The cases bite: each of these changes to one rule makes promtool report that rule."""
    doc = rules_doc()
    rule = alerts(doc)[alert]
    assert old in rule["expr"], (alert, rule["expr"])
    rule["expr"] = rule["expr"].replace(old, new, 1)
    changed = tmp_path / "alerts.yml"
    changed.write_text(yaml.safe_dump(doc))
    result = run("test", "rules", str(write_tests(tmp_path, changed)))
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr, result.stdout + result.stderr


# the rules themselves ----------------------------------------------------------------------------


def test_every_rule_says_how_bad_and_what_happened() -> None:
    for name, rule in alerts().items():
        assert re.fullmatch(r"Meter[A-Z]\w+", name), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, name
    assert len(alerts()) == sum(len(g["rules"]) for g in rules_doc()["groups"]), "alerting rules only (no recording rules to keep in step)"


@pytest.mark.parametrize("name", sorted(alerts()))
def test_rule_uses_only_meter_metrics_and_labels(name: str) -> None:
    rule = alerts()[name]
    analysis = analyse(rule["expr"], SCHEMA)
    assert not analysis.problems, f"{name}: {rule['expr']}\n" + "\n".join(analysis.problems)
    assert analysis.selectors and all(s.metric in SCHEMA for s in analysis.selectors), name
    for sel in analysis.selectors:  # matchers on fixed labels name values meter really uses
        for label, op, value in sel.matchers:
            if label in SPEC_VALUES:
                values = value.split("|") if op in ("=~", "!~") else [value]
                assert set(values) <= SPEC_VALUES[label], f"{name}: {label}{op}{value!r}: {set(values) - SPEC_VALUES[label]}"
    templated = set(re.findall(r"\$labels\.(\w+)", " ".join(rule["annotations"].values())))
    assert templated <= (analysis.labels or frozenset()) | TARGET_LABELS, f"{name}: annotations name labels the alert does not have"


SPEC_TOPICS = {
    "budget share": lambda e: "meter_budget_spend_usd" in e and "/" in e and "meter_budget_limit_usd" in e,
    "error ratio": lambda e: "meter_requests_total{outcome=~" in e and "/" in e,
    "time to first token p99": lambda e: "histogram_quantile(0.99" in e and "meter_time_to_first_token_seconds_bucket" in e,
    "ledger failing": lambda e: "meter_ledger_write_errors_total" in e,
    "unpriced requests": lambda e: "meter_unpriced_requests_total" in e,
}


@pytest.mark.parametrize("topic", sorted(SPEC_TOPICS))
def test_every_spec_topic_has_a_rule(topic: str) -> None:
    assert any(SPEC_TOPICS[topic](rule["expr"]) for rule in alerts().values()), f"no alerting rule for {topic}"


def test_kubernetes_rule_holds_the_same_groups() -> None:
    manifest = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1" and manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/name"] == "meter"
    assert manifest["spec"]["groups"] == rules_doc()["groups"], "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/alerts.yml"

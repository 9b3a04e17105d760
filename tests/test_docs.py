"""The repository's own reference is complete: users read the README, not SPEC.

Every `meter serve` flag and its environment variable, every metric meter
exposes and every ledger column is named in the README; a new one that is not
fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meter.cli import build_parser
from meter.config import ENV_PREFIX, load_settings
from meter.ledger import COLUMN_TYPES
from meter.metrics import Metrics

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def serve_flags() -> list[str]:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001 - argparse has no public walk
    return sorted(opt for action in serve._actions for opt in action.option_strings if opt.startswith("--") and opt != "--help")  # noqa: SLF001


def settings_section() -> str:
    return README.split("## Settings", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("flag", serve_flags())
def test_every_serve_flag_and_its_variable_is_in_the_settings_table(flag: str) -> None:
    section = settings_section()
    assert f"`{flag}`" in section, f"{flag} is missing from the README's settings table"
    env = ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
    assert f"`{env}`" in section, f"{env} is missing from the README's settings table"


class _Ledger:
    pending = 0
    stats = None


def exposed_metrics() -> list[str]:
    text = Metrics(load_settings({}, env={}), _Ledger()).render().decode()
    return sorted(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))


@pytest.mark.parametrize("metric", exposed_metrics())
def test_every_metric_is_in_the_readme(metric: str) -> None:
    assert re.search(rf"`{re.escape(metric)}[`{{]", README), f"{metric} is missing from the README"


@pytest.mark.parametrize("column", list(COLUMN_TYPES))
def test_every_ledger_column_is_in_the_readme(column: str) -> None:
    section = README.split("## What is recorded", 1)[1].split("\n## ", 1)[0]
    assert f"`{column}`" in section, f"ledger column {column} is missing from the README's 'What is recorded'"

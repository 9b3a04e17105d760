"""Tags as metric labels (`--metrics-tag-labels team,feature`, SPEC §6).

A tag chosen in the setting becomes the label `tag_<name>` (a `-` in the name
becomes `_`: Prometheus label names have no `-`) on `meter_requests_total`,
`meter_tokens_total` and `meter_cost_usd_total`.  Its value is the record's tag
of that name (`record.tags`, the JSON text of the request's merged tags), `""`
when the request has none.

Why a module of its own: the names are checked where settings are read
(`meter.config`), the values are read on the request path (`meter.metrics`),
and both must agree on what a name and a label are.

Cost: nothing unless the setting names a tag.  Then the tags' JSON is parsed
once per record (`TagReader.raw`), and `meter.metrics` puts each value through
a bound like `key`'s: `metrics_max_keys` distinct values per tag, admitted
only from requests the upstream accepted, then `other`.  A value longer than a
label may be, or that is not a string, counts as `other` before it is ever
hashed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import orjson

from .ledger.sanitise import clean_text

# SPEC §10: a tag name is letters, digits, `_` and `-`, up to 64 characters.
TAG_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TAG_LABELS = 16  # a request carries at most 16 tags (SPEC §10)
LABEL_PREFIX = "tag_"


def tag_label_name(tag: str) -> str:
    """The label a tag's value goes under: `team` -> `tag_team`, `my-feature` -> `tag_my_feature`."""
    return LABEL_PREFIX + tag.replace("-", "_")


def tag_label_names(value: str | Iterable[str]) -> tuple[str, ...]:
    """The tag names of the setting (a comma-separated string or a list), checked and lower-cased.

    Raises `ValueError` naming the first bad entry: not a tag name, named twice
    (after lower-casing, and `-` and `_` being one label), or more than
    `MAX_TAG_LABELS` of them.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    labels: dict[str, str] = {}
    for item in items:
        name = item.strip() if isinstance(item, str) else None  # a TOML list may hold a number
        if name == "" and isinstance(value, str):
            continue  # "team,,feature" or a trailing comma
        if name is None or not TAG_NAME.fullmatch(name):
            shown = item if name is None else name
            raise ValueError(f"{shown!r} is not a tag name (letters, digits, _ and -, up to 64 characters)")
        name = name.lower()  # tag names are case-insensitive, stored lower-case
        label = tag_label_name(name)
        if labels.get(label) == name:
            raise ValueError(f"{name!r} is named twice")
        if label in labels:
            raise ValueError(f"{name!r} and {labels[label]!r} would both be the label {label}")
        labels[label] = name
        names.append(name)
    if len(names) > MAX_TAG_LABELS:
        raise ValueError(f"{len(names)} tags; at most {MAX_TAG_LABELS} can be labels")
    return tuple(names)


class TagReader:
    """Reads the chosen tags' values out of a record's `tags` JSON, for `meter.metrics`.

    `raw(tags_json)` is what the request sent, already cut to label-sized
    strings: `""` for a missing tag (or tags that are not a JSON object),
    `other` for a value too long or not a string, and a lone surrogate or a
    control character as U+FFFD, as the ledger stores it.  `meter.metrics` then maps
    each through its tag's bound of distinct values.
    """

    __slots__ = ("_max_chars", "_other", "names", "none")

    def __init__(self, names: Iterable[str], other: str, max_chars: int) -> None:
        self.names = tuple(names)
        self._other = other
        self._max_chars = max_chars
        self.none = ("",) * len(self.names)

    def raw(self, tags_json: str | None) -> tuple[str, ...]:
        if not tags_json:
            return self.none
        try:
            tags = orjson.loads(tags_json)
        except orjson.JSONDecodeError:
            # orjson refuses a lone surrogate, which tags may hold until the ledger cleans
            # them (`meter.observe.facts.tags_json`); json reads it, so no other tag is lost.
            try:
                tags = json.loads(tags_json)
            except (ValueError, RecursionError):
                return self.none
        if not isinstance(tags, dict) or not tags:
            return self.none
        other, max_chars = self._other, self._max_chars
        out = []
        for name in self.names:
            value = tags.get(name)
            if value is None:
                out.append("")
            elif not isinstance(value, str) or len(value) > max_chars:
                out.append(other)
            else:
                out.append(clean_text(value))  # the value the ledger stores, always valid UTF-8
        return tuple(out)

"""Pure helpers over the Grafana dashboards in `dashboards/` (no Grafana, no Prometheus needed).

- `load_dashboards(dir)`: every `*.json` dashboard in a directory, parsed.
- `panel_queries(dashboard)`: `(panel title, expr)` for every Prometheus target,
  walking rows (collapsed rows keep their panels inside the row) and nested panels.
- `variables(dashboard)` / `all_values(dashboard)`: the templating variables, and
  the values Grafana uses when every variable is left at "All".
- `label_names_match(variable)` / `pick_label_name(variable, names)`: for a
  variable listing label names (`label_names(metric)`), the series it asks
  Prometheus about, and the value Grafana picks from the answer.
- `substitute(expr, values)`: what Grafana sends to Prometheus: `$var`, `${var}`,
  `${var:format}`, `[[var]]` and the built-ins `$__rate_interval`, `$__interval`,
  `$__range` (and their `_ms`/`_s` forms) replaced.
- `analyse(expr, schema)`: a small PromQL parser that lists the selectors of an
  expression and reports labels that cannot exist (a matcher or a `by (...)`
  naming a label the metric does not have, vector matching whose sides cannot
  meet, ...).  `schema` maps each exposed series name to its label names.

A real-Prometheus test can combine them:

    for board in load_dashboards(ROOT / "dashboards"):
        values = all_values(board)
        for title, expr in panel_queries(board):
            query = substitute(expr, values, rate_interval="1m", time_range="5m")
            ...  # GET /api/v1/query?query=...  -> at least one series
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Analysis",
    "PromQLError",
    "Selector",
    "all_values",
    "analyse",
    "grafana_regex_escape",
    "iter_panels",
    "label_names_match",
    "load_dashboards",
    "panel_queries",
    "pick_label_name",
    "substitute",
    "variables",
]


# dashboards -------------------------------------------------------------------------------------


def load_dashboards(directory: str | Path) -> list[dict[str, Any]]:
    """Every `*.json` file directly in `directory`, parsed, in file name order."""
    boards = []
    for path in sorted(Path(directory).glob("*.json")):
        board = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(board, dict):
            raise TypeError(f"{path}: a dashboard is a JSON object")
        boards.append(board)
    return boards


def iter_panels(container: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard (or of a row), depth first, rows included."""
    for panel in container.get("panels") or []:
        yield panel
        yield from iter_panels(panel)


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`(panel title, expr)` for every enabled target with an `expr`, in dashboard order."""
    out: list[tuple[str, str]] = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets") or []:
            expr = target.get("expr")
            if isinstance(expr, str) and expr.strip() and not target.get("hide"):
                out.append((str(panel.get("title", "")), expr))
    return out


def variables(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's templating variables."""
    return list((dashboard.get("templating") or {}).get("list") or [])


def all_values(dashboard: Mapping[str, Any], datasource: str = "prometheus") -> dict[str, str]:
    """Variable values with every selector left at "All" (its `allValue`, else `.*`).

    A `datasource` variable gets `datasource` (a data source uid); constants and
    custom/textbox variables get their current (else first, else query) value.
    """
    values: dict[str, str] = {}
    for var in variables(dashboard):
        name, kind = var["name"], var.get("type")
        if kind == "datasource":
            values[name] = datasource
        elif var.get("includeAll"):
            values[name] = var.get("allValue") or ".*"
        else:
            current = (var.get("current") or {}).get("value")
            if isinstance(current, list):
                current = current[0] if current else None
            if current is None and var.get("options"):
                current = var["options"][0].get("value")
            if current is None:
                query = var.get("query")
                current = query if isinstance(query, str) else ""
            values[name] = str(current)
    return values


_LABEL_NAMES = re.compile(r"^label_names\((.*)\)\s*$")


def label_names_match(var: Mapping[str, Any]) -> str | None:
    """The series selector of a `label_names(...)` query variable (Grafana's "Label names"
    query type, `/api/v1/labels?match[]=...`); None for any other variable."""
    if var.get("type") != "query":
        return None
    query = var.get("query")
    if isinstance(query, dict):
        if query.get("qryType") == 0 and query.get("match"):
            return str(query["match"])
        query = query.get("query")
    found = _LABEL_NAMES.match(query) if isinstance(query, str) else None
    return found.group(1).strip() if found and found.group(1).strip() else None


def pick_label_name(var: Mapping[str, Any], names: Sequence[str]) -> str | None:
    """What Grafana selects on load from the label names Prometheus answered: the names the
    variable's `/regex/` keeps (its first capture group, if any), sorted, the first one."""
    regex = str(var.get("regex") or "")
    if regex.startswith("/") and regex.rfind("/") > 0:
        regex = regex[1 : regex.rfind("/")]
    pattern = re.compile(regex) if regex else None
    kept = []
    for name in names:
        if pattern is None:
            kept.append(name)
            continue
        found = pattern.search(name)
        if found:
            kept.append(found.group(1) if found.groups() else name)
    return min(kept) if kept else None


# variable substitution --------------------------------------------------------------------------

_REGEX_SPECIALS = re.compile(r"([$^*{}\[\]'+?.()|])")


def grafana_regex_escape(value: str) -> str:
    r"""How Grafana's Prometheus data source escapes a value for a regex matcher.

    Like Grafana's `prometheusSpecialRegexEscape`: regex specials get a doubled
    backslash, because the regex sits in a PromQL string literal (`gpt-4.1` ->
    `gpt-4\\.1` in the query text, the regex `gpt-4\.1` once PromQL reads the string).
    """
    return _REGEX_SPECIALS.sub(r"\\\\\1", value.replace("\\", "\\\\\\\\"))


_VAR = re.compile(
    r"\$\{(?P<b_name>\w+)(?::(?P<b_fmt>[\w-]+))?\}"  # ${var} ${var:fmt}
    r"|\[\[(?P<s_name>\w+)(?::(?P<s_fmt>[\w-]+))?\]\]"  # [[var]] [[var:fmt]]
    r"|\$(?P<d_name>\w+)"  # $var
)

_DURATION = re.compile(r"^(?:\d+(?:ms|[smhdwy]))+$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000, "y": 31_536_000_000}


def _duration_ms(text: str) -> int:
    if not _DURATION.match(text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNIT_MS[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", text))


def _format(name: str, value: str | Sequence[str], fmt: str | None) -> str:
    multi = not isinstance(value, str)
    items = list(value) if multi else [value]  # type: ignore[arg-type]
    if fmt is None:
        # Grafana's Prometheus data source: a multi-value selection becomes a regex group.
        if multi:
            escaped = [grafana_regex_escape(v) for v in items]
            return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        return items[0]
    if fmt == "regex":
        escaped = [grafana_regex_escape(v) for v in items]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    if fmt in ("raw", "text"):
        return ",".join(items) if fmt == "raw" else " + ".join(items)
    if fmt == "pipe":
        return "|".join(items)
    if fmt == "csv":
        return ",".join(items)
    if fmt == "glob":
        return items[0] if len(items) == 1 else "{" + ",".join(items) + "}"
    if fmt == "doublequote":
        return ",".join(f'"{v}"' for v in items)
    if fmt == "singlequote":
        return ",".join(f"'{v}'" for v in items)
    raise KeyError(f"unknown variable format ${{{name}:{fmt}}}")


def substitute(
    expr: str,
    variables: Mapping[str, str | Sequence[str]],
    *,
    rate_interval: str = "1m",
    interval: str = "15s",
    time_range: str = "1h",
    strict: bool = True,
) -> str:
    """`expr` as Grafana would send it, with `variables` (name -> value or list of values).

    Built-ins: `$__rate_interval` -> `rate_interval`, `$__interval` -> `interval`,
    `$__interval_ms`, `$__range` -> `time_range`, `$__range_s`, `$__range_ms`.
    Names made only of digits (`$1` in a `label_replace` replacement) are left alone.
    With `strict`, an unknown variable raises `KeyError`; otherwise it is left as written
    (what Grafana does).
    """
    builtins: dict[str, str] = {
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__interval_ms": str(_duration_ms(interval)),
        "__range": time_range,
        "__range_s": str(_duration_ms(time_range) // 1000),
        "__range_ms": str(_duration_ms(time_range)),
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group("b_name") or match.group("s_name") or match.group("d_name")
        fmt = match.group("b_fmt") or match.group("s_fmt")
        if name.isdigit():
            return match.group(0)
        if name in builtins:
            return builtins[name]
        if name in variables:
            return _format(name, variables[name], fmt)
        if strict:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return match.group(0)

    return _VAR.sub(replace, expr)


# PromQL analysis --------------------------------------------------------------------------------


class PromQLError(ValueError):
    """The expression does not parse."""


@dataclass
class Selector:
    metric: str | None
    matchers: list[tuple[str, str, str]]  # (label, op, value)
    range: str | None = None


@dataclass
class Analysis:
    selectors: list[Selector] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    labels: frozenset[str] | None = None  # labels the result can carry; None for a scalar

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors if s.metric}


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<dur>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
  | (?P<num>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
  | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=(){}\[\],:@])
    """,
    re.VERBOSE,
)

AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}
_AGG_WITH_PARAM = {"count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
_AGG_KEEPS_LABELS = {"bottomk", "topk", "limitk", "limit_ratio"}
_SCALAR_FUNCS = {"time", "pi", "scalar", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "hour", "minute", "month", "year"}
FUNCTIONS = {
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "deg",
    "delta",
    "deriv",
    "double_exponential_smoothing",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_by_label",
    "sort_by_label_desc",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "timestamp",
    "vector",
} | _SCALAR_FUNCS
_RANGE_FUNCS = {
    "absent_over_time",
    "avg_over_time",
    "changes",
    "count_over_time",
    "delta",
    "deriv",
    "double_exponential_smoothing",
    "holt_winters",
    "idelta",
    "increase",
    "irate",
    "last_over_time",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rate",
    "resets",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless", "atan2"}
_BINARY = {
    "or": 1,
    "and": 2,
    "unless": 2,
    "==": 3,
    "!=": 3,
    "<=": 3,
    "<": 3,
    ">=": 3,
    ">": 3,
    "+": 4,
    "-": 4,
    "*": 5,
    "/": 5,
    "%": 5,
    "atan2": 5,
    "^": 6,
}
_COMPARISONS = {"==", "!=", "<=", "<", ">=", ">"}
_SET_OPS = {"and", "or", "unless"}


@dataclass
class _Tok:
    kind: str
    text: str
    pos: int


@dataclass
class _Val:
    labels: frozenset[str] | None  # None: a scalar (or string)
    is_range: bool = False
    is_string: bool = False
    string: str | None = None
    selector: Selector | None = None  # set when the value is a bare selector (a range may follow)


def _tokenize(expr: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise PromQLError(f"unexpected {expr[pos : pos + 20]!r} at {pos} in {expr!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            tokens.append(_Tok(kind, m.group(0), pos))
        pos = m.end()
    tokens.append(_Tok("eof", "", len(expr)))
    return tokens


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    return bytes(text[1:-1], "utf-8").decode("unicode_escape")


class _Parser:
    def __init__(self, expr: str, schema: Mapping[str, frozenset[str] | set[str] | Sequence[str]]) -> None:
        self.expr = expr
        self.tokens = _tokenize(expr)
        self.i = 0
        self.schema = {k: frozenset(v) for k, v in schema.items()}
        self.out = Analysis()

    # token helpers
    def peek(self, ahead: int = 0) -> _Tok:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def next(self) -> _Tok:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def accept(self, text: str) -> bool:
        tok = self.peek()
        if tok.kind in ("op", "ident") and tok.text == text:
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> _Tok:
        tok = self.next()
        if tok.text != text or tok.kind not in ("op", "ident"):
            raise PromQLError(f"expected {text!r} at {tok.pos}, found {tok.text!r} in {self.expr!r}")
        return tok

    def problem(self, text: str) -> None:
        self.out.problems.append(text)

    # grammar
    def parse(self) -> Analysis:
        val = self.binary(0)
        if self.peek().kind != "eof":
            tok = self.peek()
            raise PromQLError(f"unexpected {tok.text!r} at {tok.pos} in {self.expr!r}")
        if val.is_range:
            self.problem("the expression is a range vector (a dashboard query needs an instant vector or scalar)")
        self.out.labels = val.labels
        return self.out

    def binary_op(self) -> str | None:
        tok = self.peek()
        if tok.kind == "op" and tok.text in _BINARY:
            return tok.text
        if tok.kind == "ident" and tok.text.lower() in _SET_OPS | {"atan2"}:
            return tok.text.lower()
        return None

    def binary(self, min_prec: int) -> _Val:
        left = self.unary()
        while True:
            op = self.binary_op()
            if op is None or _BINARY[op] < min_prec:
                return left
            self.next()
            is_bool = self.accept("bool")
            on: tuple[str, ...] | None = None
            ignoring: tuple[str, ...] | None = None
            group: tuple[str, tuple[str, ...]] | None = None
            if self.accept("on"):
                on = self.label_list()
            elif self.accept("ignoring"):
                ignoring = self.label_list()
            for side in ("group_left", "group_right"):
                if self.accept(side):
                    group = (side, self.label_list() if self.peek().text == "(" else ())
            # ^ is right-associative, everything else left-associative
            right = self.binary(_BINARY[op] if op == "^" else _BINARY[op] + 1)
            left = self.combine(op, left, right, is_bool, on, ignoring, group)

    def combine(
        self,
        op: str,
        left: _Val,
        right: _Val,
        is_bool: bool,
        on: tuple[str, ...] | None,
        ignoring: tuple[str, ...] | None,
        group: tuple[str, tuple[str, ...]] | None,
    ) -> _Val:
        if left.is_range or right.is_range:
            self.problem(f"binary {op!r} on a range vector")
        if left.is_string or right.is_string:
            self.problem(f"binary {op!r} on a string")
        if op in _SET_OPS:
            if left.labels is None or right.labels is None:
                self.problem(f"set operator {op!r} needs vectors on both sides")
                return _Val(left.labels if left.labels is not None else right.labels)
            if on is not None:
                for side, labels in (("left", left.labels), ("right", right.labels)):
                    missing = set(on) - labels
                    if missing and on:
                        self.problem(f"{op} on({', '.join(on)}): the {side} side has no {sorted(missing)}")
            if op == "or":
                return _Val(left.labels | right.labels)
            return _Val(left.labels)
        if left.labels is None and right.labels is None:
            if on is not None or ignoring is not None or group is not None:
                self.problem(f"vector matching modifiers on scalars around {op!r}")
            return _Val(None)
        if left.labels is None or right.labels is None:
            if on is not None or ignoring is not None or group is not None:
                self.problem(f"vector matching modifiers with a scalar side around {op!r}")
            return _Val(left.labels if left.labels is not None else right.labels)
        # vector op vector
        if on is not None:
            for side, labels in (("left", left.labels), ("right", right.labels)):
                missing = set(on) - labels
                if missing:
                    self.problem(f"{op!r} on({', '.join(on)}): the {side} side has no {sorted(missing)}")
            sig_l = sig_r = frozenset(on)
        elif ignoring is not None:
            unknown = set(ignoring) - (left.labels | right.labels)
            if unknown:
                self.problem(f"{op!r} ignoring({', '.join(ignoring)}): neither side has {sorted(unknown)}")
            sig_l, sig_r = left.labels - set(ignoring), right.labels - set(ignoring)
        else:
            sig_l, sig_r = left.labels, right.labels
        if sig_l != sig_r:
            self.problem(
                f"{op!r} matches {sorted(sig_l)} against {sorted(sig_r)}: the sides never meet "
                "(aggregate both sides by the same labels, or use on()/ignoring())"
            )
        if group is not None:
            side, extra = group
            one = right if side == "group_left" else left
            many = left if side == "group_left" else right
            missing = set(extra) - one.labels
            if missing:
                self.problem(f"{side}({', '.join(extra)}): the 'one' side has no {sorted(missing)}")
            return _Val(many.labels | set(extra))
        return _Val(left.labels)

    def unary(self) -> _Val:
        if self.peek().kind == "op" and self.peek().text in ("+", "-"):
            self.next()
            return self.unary()
        return self.postfix(self.primary())

    def postfix(self, val: _Val) -> _Val:
        while True:
            tok = self.peek()
            if tok.kind == "op" and tok.text == "[":
                self.next()
                rng = self.duration()
                if self.accept(":"):
                    if self.peek().text != "]":
                        self.duration()
                    if val.is_range or val.labels is None:
                        self.problem("a subquery needs an instant vector")
                    self.expect("]")
                    val = _Val(val.labels, is_range=True)
                    continue
                self.expect("]")
                if val.selector is None or val.is_range:
                    self.problem(f"range [{rng}] applied to something that is not a selector (use a subquery [{rng}:])")
                else:
                    val.selector.range = rng
                val = _Val(val.labels, is_range=True)
                continue
            if tok.kind == "ident" and tok.text == "offset":
                self.next()
                self.accept("-")
                self.duration()
                continue
            if tok.kind == "op" and tok.text == "@":
                self.next()
                if not (self.accept("start") or self.accept("end")):
                    self.next()
                if self.peek().text == "(":
                    self.expect("(")
                    self.expect(")")
                continue
            return val

    def duration(self) -> str:
        tok = self.next()
        if tok.kind != "dur":
            raise PromQLError(f"expected a duration at {tok.pos}, found {tok.text!r} in {self.expr!r}")
        return tok.text

    def label_list(self) -> tuple[str, ...]:
        self.expect("(")
        labels: list[str] = []
        while not self.accept(")"):
            tok = self.next()
            if tok.kind not in ("ident", "str"):
                raise PromQLError(f"expected a label name at {tok.pos}, found {tok.text!r} in {self.expr!r}")
            labels.append(tok.text if tok.kind == "ident" else _unquote(tok.text))
            if not self.accept(","):
                self.expect(")")
                break
        return tuple(labels)

    def primary(self) -> _Val:
        tok = self.peek()
        if tok.kind == "num":
            self.next()
            return _Val(None)
        if tok.kind == "str":
            self.next()
            return _Val(None, is_string=True, string=_unquote(tok.text))
        if tok.kind == "op" and tok.text == "(":
            self.next()
            val = self.binary(0)
            self.expect(")")
            return _Val(val.labels, is_range=val.is_range, is_string=val.is_string, string=val.string)
        if tok.kind == "op" and tok.text == "{":
            return self.selector(None)
        if tok.kind == "ident":
            name = tok.text
            low = name.lower()
            if low in ("inf", "nan"):
                self.next()
                return _Val(None)
            if low in AGGREGATIONS and (self.peek(1).text == "(" or self.peek(1).text in ("by", "without")):
                return self.aggregation()
            if self.peek(1).kind == "op" and self.peek(1).text == "(":
                return self.function()
            if name in _KEYWORDS:
                raise PromQLError(f"unexpected keyword {name!r} at {tok.pos} in {self.expr!r}")
            return self.selector(name)
        raise PromQLError(f"unexpected {tok.text!r} at {tok.pos} in {self.expr!r}")

    def selector(self, name: str | None) -> _Val:
        if name is not None:
            self.next()
        matchers: list[tuple[str, str, str]] = []
        if self.accept("{"):
            while not self.accept("}"):
                label = self.next()
                if label.kind not in ("ident", "str"):
                    raise PromQLError(f"expected a label name at {label.pos}, found {label.text!r} in {self.expr!r}")
                op = self.next()
                if op.kind != "op" or op.text not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"expected a matcher operator at {op.pos}, found {op.text!r} in {self.expr!r}")
                value = self.next()
                if value.kind != "str":
                    raise PromQLError(f"expected a quoted value at {value.pos}, found {value.text!r} in {self.expr!r}")
                label_name = label.text if label.kind == "ident" else _unquote(label.text)
                matchers.append((label_name, op.text, _unquote(value.text)))
                if not self.accept(","):
                    self.expect("}")
                    break
        if name is None:
            names = [v for lbl, o, v in matchers if lbl == "__name__" and o == "="]
            name = names[0] if names else None
        sel = Selector(name, matchers)
        self.out.selectors.append(sel)
        if name is None:
            self.problem(f"a selector without a metric name: {{{matchers}}}")
            labels: frozenset[str] = frozenset(m[0] for m in matchers)
        elif name not in self.schema:
            self.problem(f"unknown metric {name}")
            labels = frozenset(m[0] for m in matchers)
        else:
            labels = self.schema[name]
            for label, op, value in matchers:
                if label == "__name__":
                    continue
                if label not in labels:
                    self.problem(f"{name} has no label {label!r} (matcher {label}{op}{value!r})")
                if op in ("=~", "!~"):
                    try:
                        re.compile(value)
                    except re.error as exc:
                        self.problem(f"{name}{{{label}{op}{value!r}}}: bad regex: {exc}")
        return _Val(labels, selector=sel)

    def aggregation(self) -> _Val:
        op = self.next().text.lower()
        grouping: tuple[str, tuple[str, ...]] | None = None
        if self.peek().text in ("by", "without"):
            grouping = (self.next().text, self.label_list())
        self.expect("(")
        param: _Val | None = None
        if op in _AGG_WITH_PARAM:
            param = self.binary(0)
            self.expect(",")
        inner = self.binary(0)
        self.accept(",")
        self.expect(")")
        if self.peek().text in ("by", "without"):
            if grouping is not None:
                raise PromQLError(f"{op}: two grouping clauses in {self.expr!r}")
            grouping = (self.next().text, self.label_list())
        if inner.labels is None or inner.is_range:
            self.problem(f"{op}(...) needs an instant vector")
            return _Val(frozenset())
        if grouping is not None:
            kind, labels = grouping
            missing = set(labels) - inner.labels
            if missing:
                self.problem(f"{op} {kind} ({', '.join(labels)}): the aggregated series have no {sorted(missing)}")
        if op in _AGG_KEEPS_LABELS:
            return _Val(inner.labels)
        if grouping is None:
            result: frozenset[str] = frozenset()
        elif grouping[0] == "by":
            result = frozenset(grouping[1])
        else:
            result = inner.labels - set(grouping[1])
        if op == "count_values" and param is not None and param.string:
            result |= {param.string}
        return _Val(result)

    def function(self) -> _Val:
        name = self.next().text
        if name not in FUNCTIONS:
            raise PromQLError(f"unknown function {name}() in {self.expr!r}")
        self.expect("(")
        args: list[_Val] = []
        while not self.accept(")"):
            args.append(self.binary(0))
            if not self.accept(","):
                self.expect(")")
                break
        if name in _RANGE_FUNCS:
            ranges = [a for a in args if a.is_range]
            if not ranges:
                self.problem(f"{name}() needs a range vector")
                return _Val(frozenset())
            if name == "absent_over_time":
                return _Val(frozenset())
            return _Val(ranges[0].labels)
        for a in args:
            if a.is_range and name not in ("absent_over_time",):
                self.problem(f"{name}() given a range vector")
        if name in ("time", "pi", "scalar"):
            return _Val(None)
        if name in _SCALAR_FUNCS and not args:
            return _Val(frozenset())
        if name == "vector":
            return _Val(frozenset())
        if name == "absent":
            return _Val(frozenset())
        if name == "histogram_quantile":
            if len(args) != 2 or args[1].labels is None:
                self.problem("histogram_quantile(φ, buckets) needs two arguments")
                return _Val(frozenset())
            if "le" not in args[1].labels:
                self.problem("histogram_quantile() over series without 'le' (keep le in the sum by)")
            return _Val(args[1].labels - {"le"})
        if name in ("label_replace", "label_join"):
            if len(args) < 3 or args[0].labels is None:
                self.problem(f"{name}() needs a vector and label arguments")
                return _Val(frozenset())
            dst = args[1].string or ""
            if name == "label_replace":
                sources = [args[3].string] if len(args) > 3 and args[3].string else []
            else:
                sources = [a.string for a in args[3:] if a.string]
            for src in sources:
                if src not in args[0].labels:
                    self.problem(f"{name}(): the series have no source label {src!r}")
            return _Val(args[0].labels | ({dst} if dst else set()))
        vectors = [a for a in args if a.labels is not None]
        if not vectors:
            return _Val(None)
        return _Val(vectors[0].labels)


def analyse(expr: str, schema: Mapping[str, Any]) -> Analysis:
    """Parse a (substituted) PromQL expression against `schema` (series name -> label names).

    Raises `PromQLError` when the expression does not parse; label problems are
    listed in `Analysis.problems` (empty when every label can exist and every
    vector match can meet).
    """
    return _Parser(expr, schema).parse()

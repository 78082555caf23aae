"""The Prometheus alert rules and the Grafana dashboard in deploy/ stay true to the gateway.

The rules file must have the structure Prometheus loads (rule groups), every PromQL expression
(rules and dashboard panels) must parse, and every metric they name must be one the gateway's
``/metrics`` really exports, so renaming a metric in serving/metrics.py breaks this test.

No PromQL parser is installed in the environment (none is packaged for Python besides clients
and query builders), so this file holds a small recursive-descent parser of PromQL's grammar
(selectors with matchers, range and subquery brackets, offset/@ modifiers, functions,
aggregations with by/without, binary operators with precedence, bool, on/ignoring and
group_left/group_right) that also checks argument types (``rate`` wants a range vector,
``histogram_quantile`` a scalar and a vector, ...). It is not Prometheus's parser: it accepts
the language these files use and refuses malformed or ill-typed expressions.

The metric list comes from a real :class:`serving.metrics.GatewayMetrics` rendered as the
gateway renders ``/metrics``, with one sample in every labelled metric and one engine row. No
GPU exists here: NVML is faked (a stand-in module with one GPU) so the GPU metrics appear.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import GatewayMetrics

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "kiln-alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "kiln-dashboard.json"

# --- a PromQL parser (see the module docstring)
AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "group",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
}
PARAM_AGGREGATIONS = {
    "topk": "scalar",
    "bottomk": "scalar",
    "quantile": "scalar",
    "count_values": "string",
    "limitk": "scalar",
    "limit_ratio": "scalar",
}
_OVER_TIME = ("avg", "min", "max", "sum", "count", "stddev", "stdvar", "last", "present")
# function -> argument types ("?" marks optional ones) and its result
FUNCTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    **{
        f: (("matrix",), "vector")
        for f in (
            "rate",
            "irate",
            "increase",
            "delta",
            "idelta",
            "deriv",
            "changes",
            "resets",
            "absent_over_time",
        )
    },
    **{f"{f}_over_time": (("matrix",), "vector") for f in _OVER_TIME},
    "quantile_over_time": (("scalar", "matrix"), "vector"),
    "predict_linear": (("matrix", "scalar"), "vector"),
    "histogram_quantile": (("scalar", "vector"), "vector"),
    **{
        f: (("vector",), "vector")
        for f in (
            "abs",
            "ceil",
            "floor",
            "exp",
            "ln",
            "log2",
            "log10",
            "sqrt",
            "absent",
            "timestamp",
            "sgn",
        )
    },
    "round": (("vector", "scalar?"), "vector"),
    "clamp": (("vector", "scalar", "scalar"), "vector"),
    "clamp_min": (("vector", "scalar"), "vector"),
    "clamp_max": (("vector", "scalar"), "vector"),
    "scalar": (("vector",), "scalar"),
    "vector": (("scalar",), "vector"),
    "time": ((), "scalar"),
    "label_replace": (("vector", "string", "string", "string", "string"), "vector"),
}
_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0[xX][0-9a-fA-F]+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|==|!=|>=|<=|[-+*/%^<>=(){}\[\],:@])
""",
    re.VERBOSE,
)
_PRECEDENCE = [
    {"or"},
    {"and", "unless"},
    {"==", "!=", ">", "<", ">=", "<="},
    {"+", "-"},
    {"*", "/", "%", "atan2"},
    {"^"},
]


class PromQLError(ValueError):
    pass


@dataclass
class Token:
    kind: str
    text: str
    at: int


def tokenize(text: str) -> list[Token]:
    tokens, at = [], 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            raise PromQLError(f"unexpected character {text[at]!r} at {at}")
        kind = match.lastgroup or ""
        if kind != "ws":
            tokens.append(Token(kind, match.group(), at))
        at = match.end()
    return tokens


class Parser:
    """``Parser(text).parse()`` -> the expression's type; ``metrics``: the names it selects."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0
        self.metrics: set[str] = set()

    def parse(self) -> str:
        kind = self.expr(0)
        if self.pos != len(self.tokens):
            self.fail("unexpected trailing input")
        return kind

    # helpers
    def peek(self, offset: int = 0) -> Token | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def take(self, text: str | None = None, kind: str | None = None) -> Token:
        token = self.peek()
        if (
            token is None
            or (text is not None and token.text != text)
            or (kind is not None and token.kind != kind)
        ):
            self.fail(f"expected {text or kind}")
        self.pos += 1
        return token  # type: ignore[return-value]

    def at(self, text: str) -> bool:
        token = self.peek()
        return token is not None and token.text == text and token.kind in ("op", "ident")

    def fail(self, why: str) -> None:
        token = self.peek()
        where = f"at {token.text!r} (offset {token.at})" if token else "at the end"
        raise PromQLError(f"{why} {where} in: {self.text}")

    # grammar
    def expr(self, level: int) -> str:
        if level == len(_PRECEDENCE):
            return self.unary()
        left = self.expr(level + 1)
        while (
            (token := self.peek()) is not None
            and token.text in _PRECEDENCE[level]
            and token.kind in ("op", "ident")
        ):
            op = self.take().text
            comparison = level == 2
            is_bool = comparison and self.at("bool")
            if is_bool:
                self.take()
            if self.at("on") or self.at("ignoring"):
                self.take()
                self.labels()
                if self.at("group_left") or self.at("group_right"):
                    self.take()
                    if self.at("("):
                        self.labels()
            # ^ is right-associative; the rest left
            right = self.expr(level if op == "^" else level + 1)
            if op in ("and", "or", "unless") and "vector" not in (left, right):
                self.fail(f"{op} needs vectors on both sides")
            if "matrix" in (left, right) or "string" in (left, right):
                self.fail(f"operator {op} on a range vector or a string")
            left = "vector" if "vector" in (left, right) else "scalar"
            if is_bool and left == "scalar" and not comparison:
                self.fail("bool outside a comparison")
        return left

    def labels(self) -> list[str]:
        self.take("(")
        names = []
        while not self.at(")"):
            names.append(self.take(kind="ident").text)
            if not self.at(")"):
                self.take(",")
        self.take(")")
        return names

    def unary(self) -> str:
        if self.at("-") or self.at("+"):
            self.take()
            kind = self.unary()
            if kind not in ("scalar", "vector"):
                self.fail("unary sign on a range vector or a string")
            return kind
        return self.postfix()

    def postfix(self) -> str:
        kind, selector = self.primary()
        if self.at("["):
            self.take("[")
            self.take(kind="duration")
            if self.at(":"):  # subquery: [range:step]
                self.take(":")
                if not self.at("]"):
                    self.take(kind="duration")
                if kind != "vector":
                    self.fail("a subquery needs an instant vector")
            elif not selector:
                self.fail("a range needs a vector selector (or use a subquery [range:step])")
            self.take("]")
            kind = "matrix"
        while self.at("offset") or self.at("@"):
            modifier = self.take().text
            if modifier == "offset":
                if self.at("-"):
                    self.take()
                self.take(kind="duration")
            else:
                self.take(kind="number")
        return kind

    def primary(self) -> tuple[str, bool]:
        token = self.peek()
        if token is None:
            self.fail("expected an expression")
        assert token is not None
        if token.kind == "number":
            self.take()
            return "scalar", False
        if token.kind == "string":
            self.take()
            return "string", False
        if token.text == "(":
            self.take("(")
            kind = self.expr(0)
            self.take(")")
            return kind, False
        if token.text == "{":
            self.matchers()
            return "vector", True
        if token.kind != "ident":
            self.fail("expected an expression")
        name = token.text
        following = self.peek(1)
        if (
            name in AGGREGATIONS
            and following is not None
            and following.text in ("(", "by", "without")
        ):
            return self.aggregation(), False
        if following is not None and following.text == "(":
            return self.call(), False
        if name in ("Inf", "NaN", "inf", "nan"):
            self.take()
            return "scalar", False
        if name in (
            "by",
            "without",
            "on",
            "ignoring",
            "bool",
            "offset",
            "and",
            "or",
            "unless",
            "group_left",
            "group_right",
        ):
            self.fail(f"keyword {name!r} where an expression belongs")
        self.take()
        self.metrics.add(name)
        if self.at("{"):
            self.matchers()
        return "vector", True

    def matchers(self) -> None:
        self.take("{")
        while not self.at("}"):
            self.take(kind="ident")
            op = self.take().text
            if op not in ("=", "!=", "=~", "!~"):
                self.fail(f"label matcher operator {op!r}")
            value = self.take(kind="string").text
            if op in ("=~", "!~"):
                try:
                    re.compile(value[1:-1])
                except re.error as exc:
                    self.fail(f"bad regular expression ({exc})")
            if not self.at("}"):
                self.take(",")
        self.take("}")

    def aggregation(self) -> str:
        name = self.take().text
        grouped = False
        if self.at("by") or self.at("without"):
            self.take()
            self.labels()
            grouped = True
        self.take("(")
        if name in PARAM_AGGREGATIONS:
            if self.expr(0) != PARAM_AGGREGATIONS[name]:
                self.fail(f"{name}'s parameter must be a {PARAM_AGGREGATIONS[name]}")
            self.take(",")
        if self.expr(0) != "vector":
            self.fail(f"{name} aggregates an instant vector")
        self.take(")")
        if not grouped and (self.at("by") or self.at("without")):
            self.take()
            self.labels()
        return "vector"

    def call(self) -> str:
        name = self.take().text
        if name not in FUNCTIONS:
            self.fail(f"unknown function {name!r}")
        wanted, result = FUNCTIONS[name]
        self.take("(")
        got = []
        while not self.at(")"):
            got.append(self.expr(0))
            if not self.at(")"):
                self.take(",")
        self.take(")")
        required = [w for w in wanted if not w.endswith("?")]
        if not len(required) <= len(got) <= len(wanted):
            self.fail(f"{name} takes {len(wanted)} arguments, got {len(got)}")
        for want, kind in zip(wanted, got, strict=False):
            if want.rstrip("?") != kind:
                self.fail(f"{name} wants a {want.rstrip('?')} argument, got a {kind}")
        return result


def parse_promql(text: str) -> tuple[str, set[str]]:
    parser = Parser(text)
    return parser.parse(), parser.metrics


# --- what the gateway exports
def exported_metric_names() -> set[str]:
    """Every sample name the gateway's /metrics shows once each metric has a sample."""
    metrics = GatewayMetrics()
    metrics.watch_engines(
        lambda: [
            {
                "model": "m",
                "version": "1",
                "replica": 0,
                "ready": True,
                "outstanding": 0,
                "rss_bytes": 1,
            }
        ]
    )
    # faked NVML with one GPU: no GPU exists here (the hardware edge, the one allowed fake)
    handle = object()
    metrics.gpu._nvml = SimpleNamespace(
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: handle,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=50),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=1),
    )
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
        if metric._type == "histogram":
            child.observe(0.1)
        elif metric._type == "counter":
            child.inc()
        else:
            child.set(1)
    text = metrics.render().decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_metric_names()


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _panel_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def _grafana(expr: str) -> str:
    """Grafana's variables as Prometheus sees them after substitution."""
    return expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")


# --- the parser itself, on known good and bad expressions
@pytest.mark.parametrize(
    "expr",
    [
        'histogram_quantile(0.99, sum by (le) (rate(x_bucket{a="b", c=~"5.."}[5m])))',
        "sum(rate(x[1m])) by (model) / ignoring(code) group_left sum(rate(y[1m])) > bool 0.5",
        "-x offset 5m + 2 ^ 3 ^ 2",
        "topk(3, x) or vector(1)",
        "max_over_time(x[10m:1m])",
        "avg by (gpu) (avg_over_time(g[30m])) < 0.1",
        'count_values("v", x)',
    ],
)
def test_parser_accepts_promql(expr: str) -> None:
    parse_promql(expr)


@pytest.mark.parametrize(
    "expr",
    [
        "rate(x)",  # rate wants a range vector
        "sum(x[5m])",  # an aggregation wants an instant vector
        "histogram_quantile(x, 0.9)",  # arguments swapped
        "sum by (a (x)",
        "x{a=b}",
        'x{a~"b"}',
        "rate(x[5])",
        "(x + )",
        "nosuchfunc(x)",
        "x[5m] + 1",
        "1 and 2",
        '{a="b"',
    ],
)
def test_parser_refuses_bad_promql(expr: str) -> None:
    with pytest.raises(PromQLError):
        parse_promql(expr)


# --- the assets
def test_rules_file_has_prometheus_rule_group_structure() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"} and doc["groups"]
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"
    duration = re.compile(r"^(\d+(ms|[smhdwy]))+$")
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group.keys()
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            assert set(rule) <= {
                "alert",
                "record",
                "expr",
                "for",
                "keep_firing_for",
                "labels",
                "annotations",
            }, rule.keys()
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            for key in ("for", "keep_firing_for"):
                if key in rule:
                    assert duration.match(str(rule[key])), (rule["alert"], rule[key])
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(key, {}).values()), rule
            assert parse_promql(rule["expr"])[0] in ("vector", "scalar"), rule["alert"]


def test_rules_mirror_kilns_own_alert_kinds() -> None:
    from kiln.monitor.alerts import KINDS

    kinds = {rule.get("labels", {}).get("kiln_kind") for rule in _rules()}
    assert set(KINDS) <= kinds


def test_every_metric_the_rules_name_is_exported(exported: set[str]) -> None:
    for rule in _rules():
        _, names = parse_promql(rule["expr"])
        assert names, rule["alert"]
        missing = names - exported
        assert not missing, f"{rule['alert']} names metrics /metrics lacks: {missing}"


def test_dashboard_panels_parse_and_name_exported_metrics(exported: set[str]) -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["panels"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for expr in _panel_exprs():
        kind, names = parse_promql(_grafana(expr))
        assert kind in ("vector", "scalar"), expr
        missing = names - exported
        assert not missing, f"panel query {expr!r} names metrics /metrics lacks: {missing}"
        used |= names
    # what the dashboard is for: latency, throughput and errors, in-flight, engines, cache,
    # batching, GPU and open alerts
    assert {
        "kiln_request_duration_seconds_bucket",
        "kiln_requests_total",
        "kiln_inflight_requests",
        "kiln_engine_up",
        "kiln_engine_resident_memory_bytes",
        "kiln_result_cache_hits_total",
        "kiln_batch_size_bucket",
        "kiln_gpu_utilization_ratio",
        "kiln_alerts_open",
    } <= used


def test_a_renamed_metric_would_be_caught(exported: set[str]) -> None:
    _, names = parse_promql('rate(kiln_request_seconds_count{stage="gateway"}[5m])')
    assert names - exported == {"kiln_request_seconds_count"}

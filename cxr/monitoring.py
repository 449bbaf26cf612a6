"""What the deployed monitoring asks of the services: the PromQL expressions of the Grafana dashboard and of the
Prometheus rules under ``deploy/monitoring``, the metric names they read, and the names a service exposes.

Plain text processing (json, yaml, regular expressions): no network, no Prometheus. The tests hold the dashboard
and the rules to ``promtool`` and to the services' real ``/metrics`` output with these helpers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

# Grafana's built-in variables and the dashboard's own, with a value that makes a valid PromQL expression.
SAMPLE_VARIABLES: Mapping[str, str] = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "prevalence_window": "6h",
    "label": ".+",
    "datasource": "prometheus",
}
# Series Prometheus itself makes (not in any service's /metrics).
PROMETHEUS_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped"})

_KEYWORDS = frozenset(
    "and or unless by without on ignoring group_left group_right offset bool inf nan "
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile".split()
)
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


def variables(expr: str) -> set[str]:
    """Names of the Grafana variables in ``expr`` (``$name``, ``${name}``, ``${name:format}``)."""
    return {a or b for a, b in _VARIABLE.findall(expr)}


def substitute(expr: str, values: Mapping[str, str] = SAMPLE_VARIABLES) -> str:
    """``expr`` with every Grafana variable replaced by its value in ``values``. Raises KeyError for an unknown one."""
    return _VARIABLE.sub(lambda m: values[m.group(1) or m.group(2)], expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (function, aggregation and label names are left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(r"\1", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        if name in _KEYWORDS or re.match(r"\s*\(", text[match.end() :]):
            continue
        names.add(name)
    return names


def _panels(panels: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside a collapsed row


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every panel of a dashboard, rows' nested panels included."""
    return list(_panels(dashboard.get("panels", [])))


def dashboard_expressions(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """``"<panel title> / <refId>"`` -> PromQL expression, for every query of every panel."""
    found = {}
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found[f"{panel.get('title', '?')} / {target.get('refId', '?')}"] = str(target["expr"])
    return found


def variable_metric_names(dashboard: Mapping[str, Any]) -> set[str]:
    """Metric names read by the dashboard's query variables (``label_values(metric, label)``)."""
    names = set()
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, Mapping) else str(query or "")
        if m := re.match(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,", text):
            names.add(m.group(1))
    return names


def load_dashboard(path: Path) -> dict[str, Any]:
    """A dashboard JSON file as a dict."""
    return dict(json.loads(path.read_text()))


def rule_expressions(path: Path) -> dict[str, str]:
    """``alert`` or ``record`` name -> expression, for every rule of a Prometheus rule file."""
    doc = yaml.safe_load(path.read_text())
    return {
        str(rule.get("alert") or rule.get("record")): str(rule["expr"])
        for group in doc.get("groups", [])
        for rule in group.get("rules", [])
    }


def recorded_names(paths: Iterable[Path]) -> set[str]:
    """Names of the series that the recording rules of ``paths`` make."""
    names: set[str] = set()
    for path in paths:
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            names.update(str(r["record"]) for r in group.get("rules", []) if "record" in r)
    return names


def exposed_names(family_name: str, family_type: str) -> set[str]:
    """The sample names a metric family of the Prometheus text format exposes (``_total``, ``_bucket`` ...)."""
    base = family_name.removesuffix("_total") if family_type == "counter" else family_name
    return {base + suffix for suffix in _SUFFIXES.get(family_type, ("",))}


def as_recording_rules(expressions: Mapping[str, str]) -> dict[str, Any]:
    """A rule file (as a dict) with one recording rule per expression, for ``promtool check rules``."""
    rules = [{"record": f"cxr:dashboard_check:{i}", "expr": e} for i, e in enumerate(expressions.values())]
    return {"groups": [{"name": "dashboard-expressions", "rules": rules}]}

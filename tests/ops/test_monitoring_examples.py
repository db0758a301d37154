"""docs/monitoring: every alert rule and dashboard query names metrics (and labels) the service really exports, and
what it exports follows the Prometheus naming guide (nova_ prefix, _total counters, base units, 0-1 ratios,
bounded labels).

The exported series come from real collections: the database gauges from the test database with a backfill in
progress, the Nylas series from a recorded call, the intake's from an observed request. Dramatiq's own actor metrics
are named in its Prometheus middleware."""

from __future__ import annotations

import json
import re
import uuid
from collections import defaultdict
from pathlib import Path

import dramatiq.middleware.prometheus
import psycopg
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from nova_email.intake.metrics import IntakeMetrics
from nova_email.nylas.metrics import ApiCallCounter
from nova_email.ops.metrics import DatabaseCollector, export_api_calls

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "docs" / "monitoring" / "alerts.yml"
DASHBOARD = ROOT / "docs" / "monitoring" / "grafana-dashboard.json"

#: PromQL words that look like metric names but are not.
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "sum", "min", "max", "avg", "count", "rate", "irate", "delta", "increase", "absent", "histogram_quantile",
    "topk", "bottomk", "quantile", "stddev", "le",
}  # fmt: skip
_METRIC = re.compile(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()")


def _families(db_url: str) -> list[Metric]:
    families: list[Metric] = []
    collector = DatabaseCollector(lambda: psycopg.connect(db_url, autocommit=True), interval_s=0)
    try:
        families += collector.collect()
    finally:
        collector.close()
    nylas = CollectorRegistry()
    counter = ApiCallCounter()
    export_api_calls(counter, nylas)
    counter.record("threads.get", 200, seconds=0.2)
    families += nylas.collect()
    intake = IntakeMetrics()
    intake.observe("/webhooks/nylas", "accepted", 200, 0.002)
    families += [*intake.requests.collect(), *intake.latency.collect()]
    return families


@pytest.fixture
def exported(db_url: str, thread_sync_backfill: uuid.UUID) -> dict[str, set[str]]:
    """Every series name the service exports, with the label names it carries."""
    series: dict[str, set[str]] = defaultdict(set)
    for family in _families(db_url):
        for sample in family.samples:
            series[sample.name] |= set(sample.labels)
    source = Path(dramatiq.middleware.prometheus.__file__).read_text()
    for name in re.findall(r'"(dramatiq_[a-z_]+)"', source):
        suffixes = ["_bucket", "_count", "_sum"] if name.endswith("_milliseconds") else [""]
        for suffix in suffixes:
            series[name + suffix] |= {"queue_name", "actor_name"} | ({"le"} if suffix == "_bucket" else set())
    return dict(series)


def _expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert alerts and queries
    return alerts + queries


def _metrics_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    without_groupings = re.sub(r"\b(by|without)\s*\([^)]*\)", "", without_ranges)
    without_matchers = re.sub(r"\{[^}]*\}", "", without_groupings)
    return {word for word in _METRIC.findall(without_matchers) if word not in _PROMQL_WORDS and "_" in word}


def test_the_alert_rules_cover_what_operators_must_hear_about() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    by_name = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert "nova_queue_oldest_message_age_seconds" in by_name["NovaQueueMessageTooOld"]["expr"]
    assert "nova_queue_dead_letters" in by_name["NovaDeadLettersGrowing"]["expr"]
    assert "nova_database_up" in by_name["NovaDatabaseDown"]["expr"]
    assert "nova_backfill_longest_idle_seconds" in by_name["NovaBackfillStalled"]["expr"]
    for rule in by_name.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_expression_names_exported_metrics_and_their_labels(exported: dict[str, set[str]]) -> None:
    for expr in _expressions():
        metrics = _metrics_in(expr)
        assert metrics, expr
        unknown = metrics - set(exported)
        assert not unknown, (expr, unknown)
        labels = set().union(*(exported[m] for m in metrics))
        for matcher in re.findall(r"\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*[=!~]", matcher):
                assert label in labels, (expr, label)
        for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (name.strip() for name in grouping.split(",")):
                assert label in labels | {"le"} and (label != "le" or "_bucket" in expr), (expr, label)


def test_the_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "nova-email" and dashboard["panels"]
    (variable,) = dashboard["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])


def test_exported_metrics_follow_the_prometheus_naming_guide(db_url: str, thread_sync_backfill: uuid.UUID) -> None:
    uuid_like = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    for family in _families(db_url):
        assert family.name.startswith("nova_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram" or {"duration", "age"} & set(family.name.split("_")):
            assert family.name.endswith("_seconds"), family.name
        assert not family.name.endswith(("_percent", "_percent_complete", "_milliseconds", "_ms")), family.name
        for sample in family.samples:
            if family.name.endswith("_ratio"):
                assert 0 <= sample.value <= 1, sample
            for value in sample.labels.values():
                assert not uuid_like.search(value), (family.name, sample.labels)
        # one label name per idea: lifecycle stages are `state`, never `status`
        assert all("status" not in s.labels for s in family.samples), family.name


def test_a_queue_is_labelled_queue_name_by_every_series_on_the_endpoint(exported: dict[str, set[str]]) -> None:
    # Dramatiq's actor series and ours share one endpoint: one label name for one idea, so queries can join them.
    labels = set().union(*exported.values())
    assert "queue_name" in exported["nova_queue_messages"] and "queue_name" in exported["dramatiq_messages_total"]
    assert "queue" not in labels

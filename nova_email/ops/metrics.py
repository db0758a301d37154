"""Prometheus metrics of a worker group: Dramatiq's actor metrics plus queue and backfill gauges.

Dramatiq's own ``Prometheus`` middleware counts messages, errors, retries, dead letters, in-progress
messages and durations per actor, in prometheus-client's multiprocess files (one per worker process).
Its exposition server, though, serves only those files, so this module keeps the middleware and swaps the
server: one HTTP process per worker group (a Dramatiq "fork", started by the ``dramatiq`` command next to
the workers) serves the actor metrics together with gauges read from Postgres **on each scrape**: queue depth,
delayed and in-flight messages, oldest message age and dead letters per queue, and thread counts, messages
and percent complete per active backfill. A database outage turns ``nova_database_up`` to 0; the scrape
still answers. Each worker process also counts its Nylas API calls, retried attempts included, as
``nylas_api_calls_total{endpoint,status}`` (status 0: no HTTP answer), in the same multiprocess files, so the
scrape adds up every process.

Wiring: ``add_metrics(broker, settings)`` in ``nova_email.worker.build_broker``. Configuration: METRICS_PORT
(unset: no metrics) and METRICS_HOST (default 127.0.0.1; 0.0.0.0 in containers). Each worker group on one
host needs its own port; its multiprocess files live in a directory named after the port.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import attrs
import psycopg
from dramatiq.middleware.prometheus import Prometheus
from loguru import logger

from ..config import Settings
from ..nylas.metrics import ApiCallCounter, process_counter
from . import queries
from .progress import fetch_progress

if TYPE_CHECKING:
    import dramatiq
    from prometheus_client import Counter
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "DEFAULT_METRICS_HOST",
    "DatabaseCollector",
    "MetricsOptions",
    "WorkerMetrics",
    "add_metrics",
    "build_registry",
    "export_api_calls",
    "make_metrics_server",
    "remove_stale_counts",
    "serve_metrics",
]

log = logger.bind(component="Metrics")

#: Interface the exposition server listens on unless METRICS_HOST says otherwise (containers need 0.0.0.0).
DEFAULT_METRICS_HOST = "127.0.0.1"
#: Seconds a scrape waits for a database connection before reporting ``nova_database_up 0``.
SCRAPE_CONNECT_TIMEOUT_S = 5
_MULTIPROC_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
#: prometheus-client names its files <kind>_<pid>.db (e.g. counter_812.db, gauge_livesum_812.db).
_PID_SUFFIX = re.compile(r"_(\d+)\.db$")


@attrs.frozen(kw_only=True)
class MetricsOptions:
    """Where a worker group's metrics are served and where its processes keep their counts."""

    port: int
    host: str = DEFAULT_METRICS_HOST
    directory: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> MetricsOptions | None:
        """The options from METRICS_PORT / METRICS_HOST, or None when METRICS_PORT is unset (metrics off)."""
        if settings.metrics_port is None:
            return None
        directory = Path(tempfile.gettempdir()) / f"nova-email-metrics-{settings.metrics_port}"
        return cls(port=settings.metrics_port, host=settings.metrics_host, directory=directory)


class DatabaseCollector:
    """A prometheus-client collector that reads queue and backfill gauges from Postgres at each scrape."""

    def __init__(self, connect: Callable[[], AbstractContextManager[psycopg.Connection]]) -> None:
        self._connect = connect

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering the collector does not query the database.
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        up = families["nova_database_up"]
        try:
            with self._connect() as conn:
                queues = conn.execute(queries.QUEUE_METRICS).fetchall()
                statuses = conn.execute(queries.BACKFILL_STATUS_COUNTS).fetchall()
                backfills = fetch_progress(conn)
        except psycopg.Error as exc:
            log.warning("Database unavailable during a scrape: {}", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for queue_name, queued, delayed, in_flight, oldest_age_ms, dead in queues:
            families["nova_queue_messages"].add_metric([queue_name, "ready"], queued)
            families["nova_queue_messages"].add_metric([queue_name, "delayed"], delayed)
            families["nova_queue_messages"].add_metric([queue_name, "in_flight"], in_flight)
            families["nova_queue_oldest_message_age_seconds"].add_metric([queue_name], oldest_age_ms / 1000)
            families["nova_queue_dead_letters"].add_metric([queue_name], dead)
        for status, count in statuses:
            families["nova_backfills"].add_metric([status], count)
        for b in backfills:
            labels = [str(b.config_id), str(b.inbox_id)]
            for state, value in (
                ("queued", b.threads_queued),
                ("processing", b.threads_processing),
                ("completed", b.threads_completed),
                ("failed", b.threads_failed),
            ):
                families["nova_backfill_threads"].add_metric([*labels, state], value)
            families["nova_backfill_messages_synced"].add_metric(labels, b.messages_synced)
            families["nova_backfill_percent_complete"].add_metric(labels, float(b.percent_complete))
        yield from families.values()

    @staticmethod
    def _families() -> dict[str, Any]:
        from prometheus_client.core import GaugeMetricFamily

        backfill = ["config_id", "inbox_id"]
        families = [
            GaugeMetricFamily("nova_database_up", "1 when the last scrape could read the database, else 0."),
            GaugeMetricFamily(
                "nova_queue_messages",
                "Messages in a PGMQ queue by state (ready, delayed, in_flight).",
                labels=["queue", "state"],
            ),
            GaugeMetricFamily(
                "nova_queue_oldest_message_age_seconds",
                "Age of the oldest ready message (0 when none).",
                labels=["queue"],
            ),
            GaugeMetricFamily("nova_queue_dead_letters", "Dead letters recorded for a queue.", labels=["queue"]),
            GaugeMetricFamily("nova_backfills", "Inbox configurations by backfill status.", labels=["status"]),
            GaugeMetricFamily(
                "nova_backfill_threads", "Threads of an active backfill by status.", labels=[*backfill, "status"]
            ),
            GaugeMetricFamily(
                "nova_backfill_messages_synced", "Messages synced by an active backfill.", labels=backfill
            ),
            GaugeMetricFamily(
                "nova_backfill_percent_complete", "Percent of an active backfill's threads finished.", labels=backfill
            ),
        ]
        return {family.name: family for family in families}


def _enable_multiprocess(directory: Path) -> None:
    """Make every prometheus-client metric created from now on in this process write to `directory`."""
    from prometheus_client import values

    directory.mkdir(parents=True, exist_ok=True)
    for variable in _MULTIPROC_VARIABLES:
        os.environ[variable] = str(directory)
    # prometheus-client picks its value class on first import, which may have happened before the variable
    # was set; metrics made afterwards must still go to the shared files.
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def export_api_calls(counter: ApiCallCounter, registry: CollectorRegistry | None = None) -> Counter:
    """Count every attempt `counter` records from now on in the Prometheus counter ``nylas_api_calls_total``.

    ``WorkerMetrics`` calls it in each worker process once multiprocess mode is on, so the counts land in the
    group's shared files and the exposition process adds them up.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client import Counter as PrometheusCounter

    calls = PrometheusCounter(
        "nylas_api_calls",
        "Nylas API calls by endpoint and HTTP status, retried attempts included (status 0: no answer).",
        ["endpoint", "status"],
        registry=registry if registry is not None else CollectorRegistry(),
    )

    def count(endpoint: str, status: int) -> None:
        calls.labels(endpoint, str(status)).inc()

    counter.add_listener(count)
    return calls


class WorkerMetrics(Prometheus):
    """Dramatiq's Prometheus middleware, counting into `options.directory` and served by `serve_metrics`."""

    def __init__(self, options: MetricsOptions) -> None:
        super().__init__()
        self.options = options
        self._api_calls: Counter | None = None

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [serve_metrics]

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        from dramatiq.middleware import prometheus
        from prometheus_client import multiprocess

        _enable_multiprocess(self.options.directory)
        # Dramatiq reads its directory from a module constant (set from dramatiq_prom_db at import time).
        prometheus.DB_PATH = str(self.options.directory)
        # A process of an earlier run with the same pid (containers reuse pids) may have left live gauges.
        multiprocess.mark_process_dead(os.getpid(), str(self.options.directory))  # type: ignore[no-untyped-call]
        super().after_process_boot(broker)  # type: ignore[no-untyped-call]
        if self._api_calls is None:
            self._api_calls = export_api_calls(process_counter())


def add_metrics(broker: dramatiq.Broker, settings: Settings) -> bool:
    """Add the worker metrics middleware when METRICS_PORT is set; returns whether it did.

    Call it from ``build_broker``: the ``dramatiq`` command then starts the exposition server next to the
    workers, on METRICS_HOST:METRICS_PORT.
    """
    options = MetricsOptions.from_settings(settings)
    if options is None:
        return False
    broker.add_middleware(WorkerMetrics(options))
    return True


def build_registry(
    options: MetricsOptions, connect: Callable[[], AbstractContextManager[psycopg.Connection]]
) -> CollectorRegistry:
    """A registry with the worker processes' actor metrics (from `options.directory`) and the database gauges."""
    from prometheus_client import CollectorRegistry, multiprocess

    options.directory.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(options.directory))  # type: ignore[no-untyped-call]
    collector: Collector = DatabaseCollector(connect)
    registry.register(collector)
    return registry


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        log.trace("HTTP {}", format % args)


def make_metrics_server(options: MetricsOptions, settings: Settings) -> WSGIServer:
    """The HTTP server of a worker group's metrics, bound to `options.host`:`options.port` (not yet serving)."""
    from prometheus_client import make_wsgi_app

    from .. import db

    def connect() -> psycopg.Connection:
        return db.connect(settings, autocommit=True, connect_timeout=SCRAPE_CONNECT_TIMEOUT_S)

    registry = build_registry(options, connect)
    return make_server(options.host, options.port, make_wsgi_app(registry), handler_class=_QuietHandler)


def remove_stale_counts(directory: Path) -> list[Path]:
    """Delete the count files of processes that no longer run (an earlier run of the group); returns them.

    Called when the exposition process starts, which the dramatiq command does only once every worker process
    has booted, so every live worker's files are already there and kept.
    """
    removed = []
    for path in directory.glob("*.db"):
        match = _PID_SUFFIX.search(path.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except PermissionError:
            pass  # alive, under another user
    return removed


def serve_metrics() -> int:
    """Serve the metrics until stopped. Dramatiq runs this in its own process (a "fork") next to the workers."""
    from ..config import load_settings
    from ..log import setup_logging

    settings = load_settings()
    setup_logging(settings)
    options = MetricsOptions.from_settings(settings)
    if options is None:
        log.error("METRICS_PORT is not set in the exposition process; not serving metrics")
        return 1
    try:
        server = make_metrics_server(options, settings)
    except OSError as exc:
        log.error(
            "Cannot listen on {}:{}: {}; give each worker group its own METRICS_PORT", options.host, options.port, exc
        )
        return 1
    stale = remove_stale_counts(options.directory)
    if stale:
        log.info("Removed {} count file(s) of processes from an earlier run", len(stale))
    log.info("Serving worker metrics on http://{}:{}/metrics", options.host, options.port)
    with server:
        server.serve_forever()
    return 0

"""Prometheus metrics of a worker group: Dramatiq's actor metrics, Nylas API calls, and queue and backfill gauges.

Dramatiq's own ``Prometheus`` middleware counts messages, errors, retries, dead letters, in-progress
messages and durations per actor, in prometheus-client's multiprocess files (one per worker process).
Its exposition server, though, serves only those files, so this module keeps the middleware and swaps the
server: one threaded HTTP process per worker group (a Dramatiq "fork", started by the ``dramatiq`` command next to
the workers; concurrent scrapes are served side by side) serves the actor metrics together with gauges read from
Postgres. Each worker process also counts its Nylas API calls, retried attempts included, as
``nova_nylas_api_calls_total{endpoint,code}`` (code 0: no HTTP answer) and times each call in the histogram
``nova_nylas_api_call_duration_seconds{endpoint}``, in the same multiprocess files, so the scrape adds up every
process.

The database gauges describe the whole deployment, not one worker group, so they are collected by one exposition
process at a time and at most once per `DATABASE_INTERVAL_S`: the process holding a Postgres advisory lock
(`DATABASE_COLLECTOR_LOCK`) on its own connection collects them; the others report only ``nova_database_up`` and
``nova_metrics_database_collector 0``, and take over when the holder's connection goes away. Sum or max them
across instances in queries (``max by (queue) (...)``): during a hand-over two instances may briefly report them.
Labels are bounded: queue names, states, endpoints and status codes; per-configuration detail (config ids,
inboxes) stays in ``nova-email status``. A database outage turns ``nova_database_up`` to 0; the scrape still answers.

Wiring: ``add_metrics(broker, settings)`` in ``nova_email.worker.build_broker``. Configuration: METRICS_PORT
(unset: no metrics) and METRICS_HOST (default 127.0.0.1; 0.0.0.0 in containers). Each worker group on one
host needs its own port; its multiprocess files live in a directory named after the port.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import attrs
import psycopg
from dramatiq.middleware.prometheus import Prometheus
from loguru import logger
from prometheus_client.exposition import ThreadingWSGIServer

from ..config import Settings
from ..nylas.metrics import ApiCallCounter, process_counter
from . import queries
from .progress import BackfillProgress, fetch_progress

if TYPE_CHECKING:
    import dramatiq
    from prometheus_client import Counter, Histogram
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "DATABASE_COLLECTOR_LOCK",
    "DATABASE_INTERVAL_S",
    "DEFAULT_METRICS_HOST",
    "NYLAS_LATENCY_BUCKETS_S",
    "DatabaseCollector",
    "MetricsOptions",
    "MetricsServer",
    "NylasCallMetrics",
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
#: Seconds the database gauges are reused for: Prometheus's default scrape interval.
DATABASE_INTERVAL_S = 15.0
#: Session advisory lock held by the exposition process that collects the database gauges ("novametr").
DATABASE_COLLECTOR_LOCK = 0x6E6F76616D657472
#: Seconds buckets of a Nylas call, in-call retries included: tens of milliseconds to the 30 s timeout and beyond.
NYLAS_LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_MULTIPROC_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
#: prometheus-client names its files <kind>_<pid>.db (e.g. counter_812.db, gauge_livesum_812.db).
_PID_SUFFIX = re.compile(r"_(\d+)\.db$")
#: Thread states of a backfill, as the gauge's ``state`` label names them.
_THREAD_STATES = ("queued", "processing", "completed", "failed")


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


def _families() -> dict[str, Any]:
    from prometheus_client.core import GaugeMetricFamily

    families = [
        GaugeMetricFamily("nova_database_up", "1 when the last collection could read the database, else 0."),
        GaugeMetricFamily(
            "nova_metrics_database_collector",
            "1 when this process collects the database gauges for the whole deployment (one process does).",
        ),
        GaugeMetricFamily(
            "nova_queue_messages",
            "Messages in a PGMQ queue by state (ready, delayed, in_flight).",
            labels=["queue", "state"],
        ),
        GaugeMetricFamily(
            "nova_queue_oldest_message_age_seconds",
            "Age of the oldest ready message of a queue (0 when none).",
            labels=["queue"],
        ),
        GaugeMetricFamily("nova_queue_dead_letters", "Dead letters recorded for a queue.", labels=["queue"]),
        GaugeMetricFamily("nova_backfills", "Inbox configurations by backfill state.", labels=["state"]),
        GaugeMetricFamily(
            "nova_backfill_threads", "Threads of the active backfills by state, summed.", labels=["state"]
        ),
        GaugeMetricFamily("nova_backfill_messages_synced", "Messages synced by the active backfills, summed."),
        GaugeMetricFamily(
            "nova_backfill_completion_ratio",
            "Threads finished (completed or failed) over threads found, across the active backfills (0 to 1).",
        ),
        GaugeMetricFamily(
            "nova_backfill_longest_idle_seconds",
            "Longest time an active backfill has gone without progress (a thread finished, or its run started).",
        ),
    ]
    return {family.name: family for family in families}


def _add_backfill_gauges(families: dict[str, Any], backfills: Sequence[BackfillProgress]) -> None:
    active = [b for b in backfills if not b.finished]
    threads = {
        "queued": sum(b.threads_queued for b in active),
        "processing": sum(b.threads_processing for b in active),
        "completed": sum(b.threads_completed for b in active),
        "failed": sum(b.threads_failed for b in active),
    }
    for state in _THREAD_STATES:
        families["nova_backfill_threads"].add_metric([state], threads[state])
    families["nova_backfill_messages_synced"].add_metric([], sum(b.messages_synced for b in active))
    total = sum(b.threads_total for b in active)
    done = threads["completed"] + threads["failed"]
    families["nova_backfill_completion_ratio"].add_metric([], min(1.0, done / total) if total else 0.0)
    idle = 0.0
    for b in active:
        moments = [b.last_thread_at, b.sync_started_at, b.backfill_started_at, b.backfill_requested_at]
        last = max((m for m in moments if m is not None), default=None)
        if last is not None:
            idle = max(idle, (b.observed_at - last).total_seconds())
    families["nova_backfill_longest_idle_seconds"].add_metric([], idle)


class DatabaseCollector:
    """A prometheus-client collector of the deployment's queue and backfill gauges (module docstring).

    `connect` opens a new autocommit connection; the collector keeps it between scrapes, since the advisory lock
    that elects the collecting process lives as long as its session.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection], *, interval_s: float = DATABASE_INTERVAL_S) -> None:
        self._connect = connect
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._holds_lock = False
        self._cached: list[Metric] = []
        self._cached_at = float("-inf")

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering the collector does not query the database.
        return list(_families().values())

    def collect(self) -> Iterator[Metric]:
        # Concurrent scrapes share one collection; within the interval they reuse it.
        with self._lock:
            if time.monotonic() - self._cached_at >= self.interval_s:
                self._cached = list(self._collect())
                self._cached_at = time.monotonic()
            cached = self._cached
        yield from cached

    def close(self) -> None:
        """Close the connection (and so give up collecting the database gauges)."""
        with self._lock:
            if self._conn is None:
                return
            if self._holds_lock and not self._conn.closed:
                # Released here rather than when the server notices the session ended, which happens a moment
                # after close() returns: another group may take over at once.
                with contextlib.suppress(psycopg.Error):
                    self._conn.execute(queries.RELEASE_COLLECTOR_LOCK, {"key": DATABASE_COLLECTOR_LOCK})
            self._conn.close()
            self._conn = None
            self._holds_lock = False

    def _collect(self) -> Iterator[Metric]:
        families = _families()
        try:
            conn = self._collecting_connection()
            if conn is not None:
                queues = conn.execute(queries.QUEUE_METRICS).fetchall()
                states = conn.execute(queries.BACKFILL_STATUS_COUNTS).fetchall()
                backfills = fetch_progress(conn)
        except psycopg.Error as exc:
            log.warning("Database unavailable during a scrape: {}", exc)
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            families["nova_database_up"].add_metric([], 0)
            yield families["nova_database_up"]
            return
        families["nova_database_up"].add_metric([], 1)
        families["nova_metrics_database_collector"].add_metric([], 0 if conn is None else 1)
        yield families.pop("nova_database_up")
        yield families.pop("nova_metrics_database_collector")
        if conn is None:
            return
        for queue_name, queued, delayed, in_flight, oldest_age_ms, dead in queues:
            families["nova_queue_messages"].add_metric([queue_name, "ready"], queued)
            families["nova_queue_messages"].add_metric([queue_name, "delayed"], delayed)
            families["nova_queue_messages"].add_metric([queue_name, "in_flight"], in_flight)
            families["nova_queue_oldest_message_age_seconds"].add_metric([queue_name], oldest_age_ms / 1000)
            families["nova_queue_dead_letters"].add_metric([queue_name], dead)
        for state, count in states:
            families["nova_backfills"].add_metric([state], count)
        _add_backfill_gauges(families, backfills)
        yield from families.values()

    def _collecting_connection(self) -> psycopg.Connection | None:
        """This process's connection when it holds the collector's lock (taken if free), else None.

        Opens the connection if needed; either way the database has answered.
        """
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
            self._holds_lock = False
        if not self._holds_lock:
            row = self._conn.execute(queries.TRY_COLLECTOR_LOCK, {"key": DATABASE_COLLECTOR_LOCK}).fetchone()
            self._holds_lock = bool(row and row[0])
        return self._conn if self._holds_lock else None


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


@attrs.frozen
class NylasCallMetrics:
    """The Prometheus series of Nylas API calls: a counter of attempts and a histogram of call durations."""

    calls: Counter
    duration: Histogram


def export_api_calls(counter: ApiCallCounter, registry: CollectorRegistry | None = None) -> NylasCallMetrics:
    """Export every attempt `counter` records from now on as ``nova_nylas_api_calls_total{endpoint,code}`` and
    every call's duration as ``nova_nylas_api_call_duration_seconds{endpoint}``.

    ``WorkerMetrics`` calls it in each worker process once multiprocess mode is on, so the values land in the
    group's shared files and the exposition process adds them up.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client import Counter as PrometheusCounter
    from prometheus_client import Histogram as PrometheusHistogram

    registry = registry if registry is not None else CollectorRegistry()
    metrics = NylasCallMetrics(
        PrometheusCounter(
            "nova_nylas_api_calls",
            "Nylas API calls by endpoint and HTTP status code, retried attempts included (code 0: no answer).",
            ["endpoint", "code"],
            registry=registry,
        ),
        PrometheusHistogram(
            "nova_nylas_api_call_duration_seconds",
            "Duration of a Nylas API call by endpoint, its in-call retries included.",
            ["endpoint"],
            buckets=NYLAS_LATENCY_BUCKETS_S,
            registry=registry,
        ),
    )

    def count(endpoint: str, status: int, seconds: float | None) -> None:
        metrics.calls.labels(endpoint, str(status)).inc()
        if seconds is not None:
            metrics.duration.labels(endpoint).observe(seconds)

    counter.add_listener(count)
    return metrics


class WorkerMetrics(Prometheus):
    """Dramatiq's Prometheus middleware, counting into `options.directory` and served by `serve_metrics`."""

    def __init__(self, options: MetricsOptions) -> None:
        super().__init__()
        self.options = options
        self._api_calls: NylasCallMetrics | None = None

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


def build_registry(options: MetricsOptions, database: DatabaseCollector) -> CollectorRegistry:
    """A registry with the worker processes' actor metrics (from `options.directory`) and the database gauges."""
    from prometheus_client import CollectorRegistry, multiprocess

    options.directory.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(options.directory))  # type: ignore[no-untyped-call]
    collector: Collector = database
    registry.register(collector)
    return registry


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        log.trace("HTTP {}", format % args)


class MetricsServer(ThreadingWSGIServer):
    """The exposition server: a thread per request, so a slow or stalled client never holds up another scrape.

    Closing it closes the database collector's connection, which hands the collection to another group.
    """

    database: DatabaseCollector | None = None

    def server_close(self) -> None:
        super().server_close()
        if self.database is not None:
            self.database.close()


def make_metrics_server(options: MetricsOptions, settings: Settings) -> MetricsServer:
    """The HTTP server of a worker group's metrics, bound to `options.host`:`options.port` (not yet serving)."""
    from prometheus_client import make_wsgi_app

    from .. import db

    def connect() -> psycopg.Connection:
        return db.connect(settings, autocommit=True, connect_timeout=SCRAPE_CONNECT_TIMEOUT_S)

    database = DatabaseCollector(connect)
    server = make_server(
        options.host,
        options.port,
        make_wsgi_app(build_registry(options, database)),
        server_class=MetricsServer,
        handler_class=_QuietHandler,
    )
    assert isinstance(server, MetricsServer)
    server.database = database
    return server


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

"""The intake's own metrics, in Prometheus text format: requests by route, outcome and status code, and latency.

Under gunicorn every worker is its own process, so the numbers live in prometheus-client's multiprocess
files (`enable_multiprocess`, called by the server before any worker starts) and `/metrics` adds up all workers.
In a single process (the app driven directly) they live in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client import multiprocess as prometheus_multiprocess

__all__ = ["LATENCY_BUCKETS_S", "IntakeMetrics", "enable_multiprocess", "forget_process"]

#: Latency buckets in seconds: the endpoint is meant to answer in a few milliseconds, so resolution is there.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0)

_MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: The folder `enable_multiprocess` chose for this process (and the workers it forks); None: counts in memory.
_multiprocess_directory: Path | None = None


def enable_multiprocess(directory: Path) -> None:
    """Keep metric values in files under `directory` so that every process's counts are reported together.

    Call it in the parent before any worker process starts. Stale files from an earlier run are removed.
    """
    global _multiprocess_directory
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    _multiprocess_directory = directory
    # prometheus-client's multiprocess values find their folder there.
    os.environ[_MULTIPROC_VARIABLE] = str(directory)
    # prometheus-client picks its value class when it is first imported; it may have been imported before the
    # variable was set (e.g. by the CLI), and metrics made afterwards must still write to the shared files.
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def forget_process(pid: int) -> None:
    """Drop a dead worker's live-gauge files (its counters stay counted). Call it when a worker exits."""
    if _multiprocess_directory is not None:
        prometheus_multiprocess.mark_process_dead(pid, str(_multiprocess_directory))  # type: ignore[no-untyped-call]


class IntakeMetrics:
    """Counters and a latency histogram for the intake's HTTP routes."""

    def __init__(self) -> None:
        # A private registry, so that several apps in one process (tests) do not collide on metric names.
        self._registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "nova_intake_requests",
            "HTTP requests answered by the webhook intake, by route, outcome (a name: accepted, unauthorized, ...; "
            "other when the app named none) and HTTP status code.",
            ["route", "outcome", "code"],
            registry=self._registry,
        )
        self.latency = Histogram(
            "nova_intake_request_duration_seconds",
            "Time from the start of a request to its response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self._registry,
        )

    def observe(self, route: str, outcome: str, code: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        self.requests.labels(route, outcome, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The current values in Prometheus text format, and the content type to serve them with."""
        directory = _multiprocess_directory
        if directory is not None and getattr(values.ValueClass, "_multiprocess", False):
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

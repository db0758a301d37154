"""Counts of Nylas API calls per (endpoint, status), for benchmarks, logs and the workers' Prometheus metrics.

Every HTTP attempt is counted, including those urllib3 retried, so "API calls per 1,000 messages synced" includes
the cost of faults. Status ``0`` means no HTTP answer (connection error or timeout). A call's final attempt also
carries the call's duration (its in-call retries included). Listeners added with ``ApiCallCounter.add_listener``
see each attempt too (``nova_email.ops.metrics`` forwards them to Prometheus).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

__all__ = ["NO_RESPONSE", "ApiCallCounter", "CallListener", "endpoint_of", "process_counter"]

#: Called with ``(endpoint, status, seconds)`` for every attempt a counter records; `seconds` is the whole call's
#: duration on its final attempt, None on the attempts urllib3 retried.
CallListener = Callable[[str, int, float | None], None]

#: Status recorded for an attempt that got no HTTP answer.
NO_RESPONSE = 0

_ENDPOINT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^/v3/grants/[^/]+/threads/?$"), "threads.list"),
    (re.compile(r"^/v3/grants/[^/]+/threads/[^/]+/?$"), "threads.get"),
    (re.compile(r"^/v3/grants/[^/]+/messages/?$"), "messages.list"),
    (re.compile(r"^/v3/grants/[^/]+/messages/[^/]+/?$"), "messages.get"),
)


def endpoint_of(url: str | None) -> str:
    """Name the endpoint of a URL or path (``threads.list``, ``messages.get``...), ``other`` when unknown."""
    path = urlsplit(url or "").path
    for pattern, name in _ENDPOINT_PATTERNS:
        if pattern.match(path):
            return name
    return "other"


class ApiCallCounter:
    """A thread-safe tally of API calls keyed by ``(endpoint, status)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self._listeners: tuple[CallListener, ...] = ()

    def add_listener(self, listener: CallListener) -> None:
        """Call `listener(endpoint, status, seconds)` for every attempt recorded from now on; adding it twice does nothing.

        Use it to export the counts elsewhere (a Prometheus counter) without the client knowing about it.
        """
        with self._lock:
            if listener not in self._listeners:
                self._listeners = (*self._listeners, listener)

    def record(self, endpoint: str, status: int, *, seconds: float | None = None) -> None:
        """Count one HTTP attempt (the last of a call with the call's duration) and tell the listeners."""
        with self._lock:
            self._counts[(endpoint, status)] += 1
            listeners = self._listeners
        for listener in listeners:
            listener(endpoint, status, seconds)

    def snapshot(self) -> dict[tuple[str, int], int]:
        """A copy of the counts, safe to read while calls continue."""
        with self._lock:
            return dict(self._counts)

    def total(self, *, endpoint: str | None = None) -> int:
        """Number of attempts, for one endpoint or all."""
        with self._lock:
            return sum(n for (name, _), n in self._counts.items() if endpoint is None or name == endpoint)

    def reset(self) -> None:
        """Forget every count (e.g. between benchmark phases)."""
        with self._lock:
            self._counts.clear()


_process_counter = ApiCallCounter()


def process_counter() -> ApiCallCounter:
    """The counter clients use by default: one per process, so benchmarks read every client's calls at once."""
    return _process_counter

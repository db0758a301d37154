"""The worker threads of a process free to start a message, shared by all its consumers.

A fetch counts each lease towards ``max_deliveries`` (``brokers/sql/052_fenced_settlements.sql``), so a process
leases only what its worker threads can start at once: a job that kills its process then costs nothing to the
messages fetched with it, since each of them was running too, and no message waits in a buffer while its count
rises. Dramatiq's worker adds its thread count when it boots (``brokers.consumer.WorkerThreads``); without a worker
(a consumer used on its own) only the consumer's prefetch limits a fetch.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

__all__ = ["Slots", "Wakeable"]


class Wakeable(Protocol):
    """A consumer waiting for a free thread."""

    def wake(self) -> None: ...


class Slots:
    """Free worker threads: a consumer takes some before a fetch and gives back what it did not lease.

    Each leased message gives its slot back when it is settled. A consumer that got fewer than it wanted, and whose
    queue has more to give, is woken when a slot is given back.
    """

    def __init__(self) -> None:
        #: Worker threads of this process, or None without a worker.
        self.threads: int | None = None
        #: Slots taken: messages leased and not settled yet, and fetches under way.
        self.taken = 0
        self._waiting: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add_threads(self, count: int) -> None:
        with self._lock:
            self.threads = (self.threads or 0) + count
        self._wake_waiting()

    def remove_threads(self, count: int) -> None:
        with self._lock:
            remaining = (self.threads or 0) - count
            self.threads = remaining if remaining > 0 else None

    def take(self, wanted: int, waker: Wakeable | None) -> int:
        """Take up to `wanted` slots; how many. `waker` is woken when a slot is given back if it got fewer."""
        with self._lock:
            granted = wanted if self.threads is None else max(0, min(wanted, self.threads - self.taken))
            self.taken += granted
            if granted < wanted and waker is not None:
                self._waiting.add(waker)
        return granted

    def give_back(self, count: int) -> None:
        """`count` slots are free again: their messages were settled, or a fetch did not lease them."""
        if count <= 0:
            return
        with self._lock:
            self.taken -= count
        self._wake_waiting()

    def _wake_waiting(self) -> None:
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for waker in waiting:
            waker.wake()

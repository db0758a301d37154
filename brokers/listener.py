"""One LISTEN connection per process, waking idle consumers when PGMQ announces an insert.

Channel ``pgmq.q_<queue>.INSERT`` is notified after a committed insert into a queue whose notifications were
enabled (by a migration calling ``pgmq_broker.enable_notify``, or PGMQ's throttled ``pgmq.enable_notify_insert``;
workers never enable them). Notifications can be throttled or lost while disconnected, and say nothing about
delayed messages becoming due, so consumers poll as well: a notification only shortens their wait. Where
LISTEN is impossible (transaction-mode poolers) the broker runs with ``listen=False``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg import sql

from . import queries
from .background import BackgroundThread
from .database import Backoff, Outage

__all__ = ["Listener", "channel_name"]

#: How long one wait for notifications lasts before new subscriptions are applied, in seconds.
WAIT_S = 0.25
#: Reconnection backoff bounds, in seconds.
MIN_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0


def channel_name(queue_name: str) -> str:
    """The channel PGMQ notifies on after an insert into `queue_name`."""
    return f"pgmq.q_{queue_name}.INSERT"


class Listener(BackgroundThread):
    """A daemon thread holding the process's LISTEN connection.

    Parameters:
        conninfo: Connection string of the database.
        connect_kwargs: Extra ``psycopg.connect`` keyword arguments.
        on_notify: Called with the queue name on every notification, and each time LISTEN on the queue's channel
            is put in place (on subscribing, and again after a reconnection): an insert committed before it, while
            subscribing or disconnected, was announced to no one.
        outage: The database's outage log: a lost LISTEN connection is part of the same outage, logged once; the
            database's next successful call ends it (a LISTEN reconnect alone proves nothing of the pool's connections).
    """

    thread_name = "pgmq-listener"

    def __init__(
        self,
        *,
        conninfo: str,
        connect_kwargs: Mapping[str, Any],
        on_notify: Callable[[str], None],
        outage: Outage,
    ) -> None:
        super().__init__()
        self._outage = outage
        self._conninfo = conninfo
        self._connect_kwargs = {k: v for k, v in connect_kwargs.items() if k != "autocommit"}
        self._on_notify = on_notify
        self._queues: set[str] = set()
        self._listening: set[str] = set()
        self._lock = threading.Lock()
        self.connected = threading.Event()

    def subscribe(self, queue_name: str) -> None:
        """Listen to `queue_name`'s inserts from the next wait on (within ``WAIT_S``), then have it looked at again."""
        with self._lock:
            self._queues.add(queue_name)

    def _run(self) -> None:
        backoff = Backoff(min_s=MIN_BACKOFF_S, max_s=MAX_BACKOFF_S)
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, **self._connect_kwargs) as conn:
                    self._listening = set()
                    backoff.reset()
                    self.connected.set()
                    self._listen_loop(conn)
            except psycopg.Error as exc:
                self.connected.clear()
                self._outage.lost(exc)
                self._stop.wait(backoff.next_s())

    def _listen_loop(self, conn: psycopg.Connection) -> None:
        prefix, suffix = "pgmq.q_", ".INSERT"
        while not self._stop.is_set():
            with self._lock:
                pending = self._queues - self._listening
            for queue_name in sorted(pending):
                conn.execute(sql.SQL(queries.LISTEN).format(channel=sql.Identifier(channel_name(queue_name))))
                self._listening.add(queue_name)
                # An insert committed before this LISTEN announced itself to no one: the queue's consumers look again.
                self._on_notify(queue_name)
            for notify in conn.notifies(timeout=WAIT_S):
                channel = notify.channel
                if channel.startswith(prefix) and channel.endswith(suffix):
                    self._on_notify(channel[len(prefix) : -len(suffix)])

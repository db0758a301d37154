"""The broker's threads in one process: the lease keeper and the LISTEN connection, started by the first consumer.

Threads do not survive a ``fork()``: a process that inherits the objects of its parent's threads starts its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .database import Database, PerProcess
from .lease import LeaseKeeper
from .listener import Listener
from .settlement import Settlement

__all__ = ["ProcessThreads"]


class ProcessThreads:
    """This process's :class:`LeaseKeeper` (held by the settlement, which tracks leases with it) and :class:`Listener`.

    Parameters:
        database: Where the queues are.
        settlement: The broker's settlement; its ``keeper`` is set here.
        visibility_timeout_ms, max_lease_s, async_commit, on_tick: The ``LeaseKeeper``'s.
        listen: Start a listener (off behind transaction-mode poolers).
        on_notify: Called by the listener with the queue of each insert notification.
    """

    def __init__(
        self,
        database: Database,
        settlement: Settlement,
        *,
        visibility_timeout_ms: int,
        max_lease_s: float,
        async_commit: bool,
        on_tick: Callable[[], None] | None,
        listen: bool,
        on_notify: Callable[[str], None],
    ) -> None:
        self.database = database
        self.settlement = settlement
        self.visibility_timeout_ms = visibility_timeout_ms
        self.max_lease_s = max_lease_s
        self.async_commit = async_commit
        self.on_tick = on_tick
        self.listen = listen
        self.on_notify = on_notify
        self._keeper: PerProcess[LeaseKeeper] = PerProcess(self._new_keeper)
        self._listener: PerProcess[Listener] = PerProcess(self._new_listener)
        self._lock = threading.Lock()

    @property
    def listener(self) -> Listener | None:
        """This process's LISTEN thread, once a consumer started (None with ``listen=False``)."""
        return self._listener.get() if self._listener.made_here() else None

    def start(self, queue_name: str) -> None:
        """Start the threads unless running, and subscribe to `queue_name`'s inserts."""
        with self._lock:
            keeper = self.settlement.keeper = self._keeper.get()
            keeper.start()
            if self.listen:
                listener = self._listener.get()
                listener.subscribe(queue_name)
                listener.start()

    def stop(self) -> None:
        """Stop the threads this process started (its leases lapse unless settled first)."""
        with self._lock:
            listener, keeper = self._listener.take(), self._keeper.take()
            if listener is not None:
                listener.stop()
            if keeper is not None:
                keeper.stop()
            self.settlement.keeper = None

    def _new_keeper(self) -> LeaseKeeper:
        return LeaseKeeper(
            database=self.database,
            visibility_timeout_ms=self.visibility_timeout_ms,
            max_lease_s=self.max_lease_s,
            async_commit=self.async_commit,
            on_tick=self.on_tick,
        )

    def _new_listener(self) -> Listener:
        conninfo, kwargs = self.database.dsn_and_kwargs()
        return Listener(conninfo=conninfo, connect_kwargs=kwargs, on_notify=self.on_notify, outage=self.database.outage)

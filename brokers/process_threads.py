"""The broker's threads in one process: the lease keeper and the LISTEN connection, started by the first consumer.

Threads do not survive a ``fork()``: a process that inherits the objects of its parent's threads starts its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from .database import Database
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
        #: This process's LISTEN thread, once a consumer started (None with ``listen=False``).
        self.listener: Listener | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def start(self, queue_name: str) -> None:
        """Start the threads unless running, and subscribe to `queue_name`'s inserts."""
        with self._lock:
            if self._pid != os.getpid():
                self.settlement.keeper = None
                self.listener = None
                self._pid = os.getpid()
            if self.settlement.keeper is None:
                self.settlement.keeper = LeaseKeeper(
                    database=self.database,
                    visibility_timeout_ms=self.visibility_timeout_ms,
                    max_lease_s=self.max_lease_s,
                    async_commit=self.async_commit,
                    on_tick=self.on_tick,
                )
            self.settlement.keeper.start()
            if self.listen:
                if self.listener is None:
                    conninfo, kwargs = self.database.dsn_and_kwargs()
                    self.listener = Listener(conninfo=conninfo, connect_kwargs=kwargs, on_notify=self.on_notify)
                self.listener.subscribe(queue_name)
                self.listener.start()

    def stop(self) -> None:
        """Stop the threads this process started (its leases lapse unless settled first)."""
        with self._lock:
            if self._pid == os.getpid():
                if self.listener is not None:
                    self.listener.stop()
                if self.settlement.keeper is not None:
                    self.settlement.keeper.stop()
            self.listener = None
            self.settlement.keeper = None

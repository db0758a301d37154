"""Visibility leases: keep every fetched, unsettled message hidden from other workers while this process has it.

A PGMQ read hides a message for the visibility timeout. One :class:`LeaseKeeper` thread per process extends
that timeout for every message the process holds, buffered or running, a third of the way into each period.
So a job that runs longer than the timeout is never handed to a second live worker, while the messages of a
process that died come back within one timeout. A lease held longer than ``max_lease_s`` is given up (the job
is presumed stuck) and the message is allowed to lapse and be redelivered.

A delivery is identified by ``(msg_id, token)`` where the token is PGMQ's ``last_read_at`` of that read, so a
lease that lapsed and was re-read elsewhere is never extended by its former holder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime

import attrs
from loguru import logger
from psycopg.rows import scalar_row

from . import queries
from .background import BackgroundThread
from .database import Database
from .errors import DatabaseUnavailable

__all__ = ["Lease", "LeaseKeeper"]

log = logger.bind(component="LeaseKeeper")

#: Extend leases this many times per visibility timeout.
EXTENSIONS_PER_TIMEOUT = 3


@attrs.define(eq=False)
class Lease:
    """One delivery of one PGMQ message to this process, and how far it is settled.

    The settlement's state is public: the consumer, the broker's retry and the lease keeper all read it.
    """

    queue_name: str
    msg_id: int
    token: datetime
    #: Leases of the message so far, this one included (what counts towards max_deliveries).
    read_ct: int
    fetched_at: float = attrs.field(factory=time.monotonic)
    #: The Dramatiq message id, once the body is decoded (for log lines).
    message_id: str | None = None
    #: Set before a settlement deletes the message (an ack, which stays leased until its deferred delete, a dead
    #: letter, a retry's resend); the settlement forgets the lease only after the delete.
    settling: bool = False
    #: Set once the delivery is settled (acked, nacked, requeued or resent): later settlements are no-ops.
    settled: bool = False
    #: Set while a retry's re-enqueue is under way; still set at ack time means the re-enqueue failed.
    resend_pending: bool = False
    #: Set once this delivery's dead letter is recorded (it still held its message): what must happen only when a
    #: message is given up waits for it, since a stale holder's nack changes nothing.
    dead_lettered: bool = False

    @property
    def runs_before(self) -> int:
        """Leases of the message before this one: runs that ended without a settlement (a worker died)."""
        return max(self.read_ct - 1, 0)


class LeaseKeeper(BackgroundThread):
    """The per-process thread that extends the visibility of every tracked lease.

    Once stopped, the leases it held lapse after the visibility timeout unless settled first.

    Parameters:
        database: The broker's database.
        visibility_timeout_ms: How long each extension hides a message for.
        max_lease_s: Give up extending a lease after this many seconds.
        async_commit: Commit extensions without waiting for the WAL flush (see ``PGMQBroker``).
        on_tick: Called after every round of extensions (the broker purges archives from it).
    """

    thread_name = "pgmq-lease-keeper"

    def __init__(
        self,
        *,
        database: Database,
        visibility_timeout_ms: int,
        max_lease_s: float,
        async_commit: bool = True,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._database = database
        self._vt_ms = visibility_timeout_ms
        self._max_lease_s = max_lease_s
        self._async_commit = async_commit
        self._on_tick = on_tick
        self._leases: dict[str, dict[int, Lease]] = {}
        self._lock = threading.Lock()

    @property
    def interval_s(self) -> float:
        return self._vt_ms / 1000 / EXTENSIONS_PER_TIMEOUT

    def track(self, leases: Iterable[Lease]) -> None:
        """Start extending these leases."""
        with self._lock:
            for lease in leases:
                self._leases.setdefault(lease.queue_name, {})[lease.msg_id] = lease

    def forget(self, leases: Iterable[Lease]) -> None:
        """Stop extending these leases (call it before making a message visible again)."""
        with self._lock:
            for lease in leases:
                held = self._leases.get(lease.queue_name)
                if held is not None and held.get(lease.msg_id) is lease:
                    del held[lease.msg_id]

    def is_tracked(self, lease: Lease) -> bool:
        with self._lock:
            return self._leases.get(lease.queue_name, {}).get(lease.msg_id) is lease

    def tracked_count(self) -> int:
        with self._lock:
            return sum(len(held) for held in self._leases.values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.extend_all()
            except Exception:  # a bug here must not end the thread: every lease in the process depends on it
                log.opt(exception=True).critical("Unexpected failure while extending leases")
            if self._on_tick is not None:
                try:
                    self._on_tick()
                except Exception:
                    log.opt(exception=True).critical("Unexpected failure in the periodic hook")

    def extend_all(self) -> int:
        """Extend every tracked lease now; returns how many are still held."""
        now = time.monotonic()
        expired: list[Lease] = []
        with self._lock:
            snapshot: dict[str, list[Lease]] = {}
            for queue_name, held in self._leases.items():
                for lease in list(held.values()):
                    if now - lease.fetched_at > self._max_lease_s:
                        expired.append(lease)
                        del held[lease.msg_id]
                    else:
                        snapshot.setdefault(queue_name, []).append(lease)
        for lease in expired:
            log.bind(event="lease_given_up").warning(
                "Gave up message {} of queue {!r} after {:.0f} s (max lease); it will be redelivered",
                lease.msg_id,
                lease.queue_name,
                now - lease.fetched_at,
            )
        held_count = 0
        for queue_name, leases in snapshot.items():
            params = {
                "queue": queue_name,
                "ids": [lease.msg_id for lease in leases],
                "tokens": [lease.token for lease in leases],
                "vt_ms": self._vt_ms,
                "async_commit": self._async_commit,
            }
            try:
                rows = self._database.execute(queries.EXTEND, params, row_factory=scalar_row)
            except DatabaseUnavailable:
                continue  # the database logged the outage once; the next round tries again
            extended = set(rows)
            held_count += len(extended)
            lost = [lease for lease in leases if lease.msg_id not in extended and self.is_tracked(lease)]
            if lost:
                self.forget(lost)
                # A settling lease's row is gone because its settlement deleted it, not because it was lost.
                lost = [lease for lease in lost if not lease.settling]
            if lost:
                log.bind(event="lease_lost").warning(
                    "Lost the lease of {} messages of queue {!r} (settled or re-read elsewhere): {}",
                    len(lost),
                    queue_name,
                    _some_ids(lost),
                )
        return held_count


#: Most message ids a "Lost the lease" line names; the rest are counted.
MAX_LOGGED_IDS = 20


def _some_ids(leases: list[Lease]) -> str:
    """The message ids of `leases` (the PGMQ id where there is none yet), at most ``MAX_LOGGED_IDS`` of them."""
    ids = ", ".join(str(lease.message_id or lease.msg_id) for lease in leases[:MAX_LOGGED_IDS])
    more = len(leases) - MAX_LOGGED_IDS
    return f"{ids} and {more} more" if more > 0 else ids

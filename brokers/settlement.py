"""How deliveries end: the commands a consumer calls on the database, each fenced by the delivery's lease.

A delivery is ``(msg_id, token)``, the token being what its fetch wrote in ``last_read_at`` (see
``brokers/sql/052_fenced_settlements.sql``). Acknowledging, retrying (resend), dead-lettering, releasing and
extending all match both, so a worker whose lease lapsed while another worker took the message changes nothing;
such a stale settlement is logged once, at warning, with the message id.

Acks are deferred: they are deleted by the next fetch of a consumer of the queue in this process, so the ack path
costs no round trip of its own while the worker is busy. The per-queue :class:`QueueState` holds them, shared by the
queue's consumers (Dramatiq may replace a consumer while messages it fetched are still running).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, LiteralString, Protocol

import attrs
import psycopg
from loguru import logger
from psycopg.rows import class_row, scalar_row

from . import dead_letters, queries
from .database import Database, fetch_scalar
from .dead_letters import DeadLetterReason
from .fairness import fair_fetch_query, is_fair
from .lease import Lease, LeaseKeeper
from .slots import Slots

__all__ = ["Fetched", "QueueState", "Settlement", "Waker"]

log = logger.bind(component="PGMQBroker")

#: How often, in seconds, a consumer asks again whether its queue is in fairness mode (to take up a change).
FAIRNESS_RECHECK_S = 5.0

#: The shortest idle wait, in seconds: stops a consumer from spinning on a visible message another reader holds.
MIN_IDLE_WAIT_S = 0.005


class Waker(Protocol):
    """A consumer as its queue's state sees it: it can be woken, and says whether it is iterating right now."""

    @property
    def iterating(self) -> bool: ...

    def wake(self) -> None: ...


@attrs.define(eq=False)
class QueueState:
    """Per-process state of one queue: its deferred acks and its consumers."""

    name: str
    pending_acks: list[Lease] = attrs.field(factory=list)
    consumers: weakref.WeakSet[Any] = attrs.field(factory=weakref.WeakSet)
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    #: The statement that fetches from this queue: ``queries.FETCH``, or its own in fairness mode (asked again
    #: every ``FAIRNESS_RECHECK_S``, and at once when the queue's own fetch is gone).
    fetch_query: LiteralString | bytes | None = None
    #: When `fetch_query` was chosen (``time.monotonic()``).
    fetch_query_at: float = 0.0

    def add_ack(self, lease: Lease) -> None:
        with self.lock:
            self.pending_acks.append(lease)

    def take_acks(self) -> list[Lease]:
        with self.lock:
            acks, self.pending_acks = self.pending_acks, []
        return acks

    def return_acks(self, acks: list[Lease]) -> None:
        with self.lock:
            self.pending_acks[:0] = acks

    def iterating_consumers(self) -> list[Waker]:
        """The consumers fetching right now, one of which deletes a deferred ack with its next fetch."""
        return [consumer for consumer in list(self.consumers) if consumer.iterating]


@attrs.frozen
class Fetched:
    """One row of ``pgmq_broker.fetch``: a leased message, or (``stale``) an ack whose delivery was no longer held."""

    msg_id: int
    #: Leases of the message so far, this one included.
    read_ct: int | None
    enqueued_at: datetime | None
    last_read_at: datetime | None
    message: str | None
    stale: bool
    #: The message's fairness key, on a queue in fairness mode ('' for the group of messages without one).
    fairness_key: str | None


class Settlement:
    """The broker's commands that lease and end deliveries.

    The consumer holds one (the broker's) and calls it; the state of each delivery is public on its
    :class:`~brokers.lease.Lease`. ``keeper`` is this process's lease keeper, set by the broker once it consumes.

    Parameters:
        database: Where the queues are.
        visibility_timeout_ms: How long a fetch hides a message (the keeper extends it while held).
        poll_interval_ms: Longest idle wait of a consumer.
        archive_on_ack: Archive acknowledged messages instead of deleting them.
        async_commit: Commit the bookkeeping without waiting for the WAL flush (see ``PGMQBroker``).
    """

    def __init__(
        self,
        database: Database,
        *,
        visibility_timeout_ms: int,
        poll_interval_ms: int,
        archive_on_ack: bool,
        async_commit: bool,
    ) -> None:
        self.database = database
        self.visibility_timeout_ms = visibility_timeout_ms
        self.poll_interval_ms = poll_interval_ms
        self.archive_on_ack = archive_on_ack
        self.async_commit = async_commit
        self.keeper: LeaseKeeper | None = None
        self.states: dict[str, QueueState] = {}
        #: The worker threads free to start a message, shared by every consumer of this broker in this process.
        self.slots = Slots()
        self._lock = threading.Lock()

    def queue_state(self, queue_name: str) -> QueueState:
        state = self.states.get(queue_name)
        if state is None:
            with self._lock:
                state = self.states.setdefault(queue_name, QueueState(queue_name))
        return state

    def track(self, leases: Iterable[Lease]) -> None:
        if self.keeper is not None:
            self.keeper.track(leases)

    def forget(self, leases: Iterable[Lease]) -> None:
        if self.keeper is not None:
            self.keeper.forget(leases)

    # -- fetching ---------------------------------------------------------------------------------------------

    def fetch(self, state: QueueState, qty: int) -> list[Fetched]:
        """Delete the queue's deferred acks and lease up to `qty` messages, in one round trip.

        Raises:
            DatabaseUnavailable: The acks are put back for the next fetch.
        """
        acks = state.take_acks()
        params = {
            "queue": state.name,
            "ack_ids": [lease.msg_id for lease in acks],
            "ack_tokens": [lease.token for lease in acks],
            "archive": self.archive_on_ack,
            "qty": qty,
            "vt_ms": self.visibility_timeout_ms,
            "async_commit": self.async_commit,
        }
        try:
            rows = self._fetch_rows(state, params)
        except BaseException:
            state.return_acks(acks)
            raise
        if not acks:
            return rows
        self.forget(acks)
        stale = {row.msg_id for row in rows if row.stale}
        if not stale:
            return rows
        for lease in acks:
            if lease.msg_id in stale:
                log_stale("ack", lease)
        return [row for row in rows if not row.stale]

    def _fetch_rows(self, state: QueueState, params: dict[str, Any]) -> list[Fetched]:
        query = self._fetch_query(state, recheck=False)
        try:
            return self.database.execute(query, params, row_factory=class_row(Fetched))
        except psycopg.errors.UndefinedFunction:
            if query is queries.FETCH:
                raise
            # The queue left fairness mode (disable_fairness drops its own fetch): nothing was fetched or settled.
            log.info("Queue {!r} left fairness mode; its consumers fetch its oldest messages", state.name)
            return self.database.execute(self._fetch_query(state, recheck=True), params, row_factory=class_row(Fetched))

    def _fetch_query(self, state: QueueState, *, recheck: bool) -> LiteralString | bytes:
        now = time.monotonic()
        if not recheck and state.fetch_query is not None and now - state.fetch_query_at < FAIRNESS_RECHECK_S:
            return state.fetch_query
        with self.database.connection() as conn:
            fair = is_fair(conn, state.name)
        state.fetch_query = fair_fetch_query(state.name) if fair else queries.FETCH
        state.fetch_query_at = now
        return state.fetch_query

    def flush_acks(self, state: QueueState) -> None:
        """Delete the queue's deferred acks now (no consumer of it is fetching)."""
        if state.pending_acks:
            self.fetch(state, 0)

    def idle_wait_s(self, queue_name: str) -> float:
        """How long an idle consumer may wait: until the next delayed message is due, at most the poll interval."""
        wait_s = self.poll_interval_ms / 1000
        [due_in_ms] = self.database.execute(queries.NEXT_VISIBLE_IN_MS, {"queue": queue_name}, row_factory=scalar_row)
        if due_in_ms is not None:
            wait_s = min(wait_s, max(due_in_ms / 1000, 0.0))
        return max(wait_s, MIN_IDLE_WAIT_S)

    # -- settling ---------------------------------------------------------------------------------------------

    def ack(self, lease: Lease) -> None:
        """Defer the delete of an acknowledged delivery to the queue's next fetch."""
        lease.settling = True
        self.queue_state(lease.queue_name).add_ack(lease)

    def keep(self, lease: Lease) -> None:
        """Leave a processed message where it is: it comes back after a visibility timeout, its lease uncounted."""
        self.forget([lease])
        self.release([lease], uncount=True, delay_ms=self.visibility_timeout_ms, settlement="keep")

    def requeue(self, leases: Sequence[Lease]) -> None:
        """Make deliveries that never started visible again at once, their leases uncounted."""
        self.forget(leases)
        self.release(leases, uncount=True, settlement="requeue")

    def release(
        self, leases: Sequence[Lease], *, uncount: bool, delay_ms: int = 0, settlement: str = "release"
    ) -> None:
        """Make held deliveries visible again after `delay_ms`; with `uncount`, their lease is not counted.

        A delivery no longer held is left alone, and logged once as a stale `settlement`.
        """
        by_queue: dict[str, list[Lease]] = {}
        for lease in leases:
            by_queue.setdefault(lease.queue_name, []).append(lease)
        for queue_name, group in by_queue.items():
            params = {
                "queue": queue_name,
                "ids": [lease.msg_id for lease in group],
                "tokens": [lease.token for lease in group],
                "delay_ms": delay_ms,
                "uncount": uncount,
            }
            released = set(self.database.execute(queries.RELEASE, params, row_factory=scalar_row))
            for lease in group:
                if lease.msg_id not in released:
                    log_stale(settlement, lease)

    def dead_letter(
        self, lease: Lease, why: DeadLetterReason, *, message: str | None = None, actor_name: str | None = None
    ) -> bool:
        """Record the delivery as a dead letter and delete it, if it still holds its message (else False)."""
        lease.settling = True
        with self.database.connection() as conn:
            recorded = dead_letters.dead_letter(
                conn,
                queue_name=lease.queue_name,
                msg_id=lease.msg_id,
                token=lease.token,
                message=message,
                message_id=lease.message_id if message is not None else None,
                actor_name=actor_name,
                why=why,
            )
        self.forget([lease])
        if not recorded:
            log_stale("dead-letter", lease)
            return False
        log.bind(event="dead_lettered").warning(
            "Dead-lettered message {} of queue {!r} ({}: {})",
            lease.message_id if message is not None else lease.msg_id,
            lease.queue_name,
            why.reason,
            why.error_type,
        )
        return True

    def resend(self, lease: Lease, params: dict[str, Any], connection: psycopg.Connection[Any] | None) -> bool:
        """Replace the delivery by its retry (`params` of ``RESEND``), if it still holds its message (else False).

        With `connection`, in the caller's transaction.
        """
        lease.settling = True
        params = {**params, "old_queue": lease.queue_name, "old_msg_id": lease.msg_id, "old_token": lease.token}
        if connection is not None:
            sent = fetch_scalar(connection, queries.RESEND, params)
        else:
            [sent] = self.database.execute(queries.RESEND, params, row_factory=scalar_row)
        self.forget([lease])
        if sent is None:
            log_stale("retry", lease)
            return False
        return True


def log_stale(settlement: str, lease: Lease) -> None:
    """Say, once per stale settlement, that a delivery which lost its lease changed nothing."""
    log.bind(event="stale_settlement").warning(
        "Did not {} message {} (delivery {} of queue {!r}): it is no longer held by this worker, whose lease lapsed;"
        " another worker may be running it, so it was left alone",
        settlement,
        lease.message_id or lease.msg_id,
        lease.msg_id,
        lease.queue_name,
    )

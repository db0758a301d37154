"""The consumer and message proxy of the PGMQ broker (reached through ``PGMQBroker.consume``).

One consumer serves one queue in one process. Each database round trip deletes the messages acknowledged since
the last one and leases as many new messages as the prefetch allows (:meth:`Settlement.fetch`), so the ack path
costs no round trip of its own while the worker is busy. An idle consumer waits for a PGMQ insert notification,
an acknowledgement that frees prefetch room, the next delayed message's due time, or the poll interval,
whichever comes first, and returns ``None`` by its timeout so that the worker can notice a shutdown.

A consumer rides out a database outage by itself: a fetch that fails keeps its acknowledgements for the next one
and waits with a growing pause, still returning ``None`` by its timeout, instead of raising ``ConnectionClosed``
to Dramatiq's consumer thread (which would log a critical line and rebuild the consumer every few seconds). The
database logs the outage once when it starts and once when it ends.

A fetched row is decoded only after its lease is tracked, one row at a time: a row that cannot become a message
is dead-lettered with its reason and costs the rows fetched with it nothing. A fetch counts each lease towards
``max_deliveries``; the consumers of a process lease together no more messages than it has worker threads free
(:class:`~brokers.slots.Slots`, sized by :class:`WorkerThreads`), so every leased message starts at once and a
job that kills its process burns no count of a message that never ran.

Dramatiq calls ``ack``/``nack`` from worker threads while the consumer thread iterates, so everything shared is
guarded by a lock or an :class:`threading.Event`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import dramatiq
import psycopg
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.errors import ActorNotFound
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from loguru import logger

from .database import Backoff
from .dead_letters import DeadLetterReason, reason_from_exception
from .envelope import MAX_COUNT_OPTION, Undecodable, decode_body
from .errors import DatabaseUnavailable
from .fairness import FAIRNESS_KEY_OPTION
from .lease import Lease
from .settlement import Fetched, Settlement
from .slots import Slots

__all__ = ["KEEP_ON_ACK_OPTION", "PGMQConsumer", "PGMQMessageProxy", "WorkerThreads"]

log = logger.bind(component="PGMQBroker")

#: Message option: an ack leaves the message on the queue (it reappears after its visibility timeout) instead of
#: deleting it. Set it from a middleware's ``before_process_message``.
KEEP_ON_ACK_OPTION = "pgmq_keep_on_ack"
#: First pause, in seconds, of a consumer whose fetch failed because the database is unavailable; doubled on each
#: further failure.
OUTAGE_MIN_BACKOFF_S = 0.5
#: Longest pause, in seconds, between two fetch attempts of a consumer during a database outage.
OUTAGE_MAX_BACKOFF_S = 5.0


class PGMQMessageProxy(MessageProxy):
    """A message leased from PGMQ, settled exactly once by ack, nack, requeue or a retry's resend."""

    def __init__(self, message: Message[Any], *, lease: Lease, consumer: PGMQConsumer) -> None:
        super().__init__(message)
        #: The delivery, with its settlement's state.
        self.lease = lease
        #: The consumer that fetched the message (Dramatiq may settle it through a newer one).
        self.consumer = consumer
        #: The actor's exception, as Dramatiq stuffed it (a nack records it in the dead letter).
        self.exception: BaseException | None = None

    @property
    def pgmq_msg_id(self) -> int:
        """The PGMQ ``msg_id`` of this delivery."""
        return self.lease.msg_id

    def stuff_exception(self, exception: BaseException) -> None:
        super().stuff_exception(exception)
        self.exception = exception

    def clear_exception(self) -> None:
        super().clear_exception()
        self.exception = None


class PGMQConsumer(Consumer):
    """Dramatiq's consumer of one queue: fetches through the broker's :class:`Settlement` and settles through it.

    Parameters:
        settlement: The broker's commands.
        queue_name: The queue.
        prefetch: Most messages held at once, buffered or running.
        timeout: Milliseconds an idle iteration waits before returning ``None``.
        max_deliveries: Deliveries without a settlement after which a message is dead-lettered as poison.
        handlers: The actor of each queue that takes its foreign messages (the broker's, kept up to date).
    """

    def __init__(
        self,
        settlement: Settlement,
        queue_name: str,
        prefetch: int,
        timeout: int,
        *,
        max_deliveries: int,
        handlers: Mapping[str, str],
    ) -> None:
        self.settlement = settlement
        self.state = settlement.queue_state(queue_name)
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.timeout = timeout
        self.max_deliveries = max_deliveries
        self.handlers = handlers
        self._buffer: deque[PGMQMessageProxy] = deque()
        #: The deliveries fetched here and not settled, as (msg_id, token): the same message leased again after its
        #: lease lapsed is another delivery.
        self._outstanding: set[tuple[int, datetime]] = set()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._iterating = False
        self._closed = False
        self._backoff = Backoff(min_s=OUTAGE_MIN_BACKOFF_S, max_s=OUTAGE_MAX_BACKOFF_S)
        self._retry_at = 0.0
        #: Whether the queue may hold more visible messages than the last fetch took: only then does the consumer
        #: ask to be woken when a busy thread frees up (an idle queue waits for a notification or its poll).
        self._backlog = True
        self.state.consumers.add(self)

    @property
    def iterating(self) -> bool:
        """Whether this consumer is inside ``next()`` now, and so deletes deferred acks with its next fetch."""
        return self._iterating and not self._closed

    def wake(self) -> None:
        """End an idle wait now (an ack that frees prefetch room, a free worker thread)."""
        self._wakeup.set()

    def notify(self) -> None:
        """A message was sent to the queue: fetch now."""
        self._backlog = True
        self._wakeup.set()

    def discharge(self, lease: Lease) -> None:
        """Free the prefetch room and the thread's slot of a settled delivery this consumer fetched (once)."""
        with self._lock:
            held = (lease.msg_id, lease.token) in self._outstanding
            self._outstanding.discard((lease.msg_id, lease.token))
        if held:
            self.settlement.slots.give_back(1)
        self._wakeup.set()

    @property
    def outstanding_count(self) -> int:
        """Messages fetched by this consumer and not settled yet (buffered or running)."""
        with self._lock:
            return len(self._outstanding)

    # -- settling (Dramatiq's worker calls these with messages of this queue, maybe fetched by an older consumer) --

    def ack(self, message: MessageProxy) -> None:
        proxy = _own(message)
        lease = proxy.lease
        if not lease.settled:
            lease.settled = True
            if lease.resend_pending:
                self._keep_original(proxy)
                return
            proxy.consumer.discharge(lease)
            if proxy.options.get(KEEP_ON_ACK_OPTION):
                # Processed but kept: a dry-run mode for consumers that must not delete. The run is not counted,
                # or the message would be dead-lettered after max_deliveries runs.
                self.settlement.keep(lease)
                return
            self.settlement.ack(lease)
        state = self.settlement.queue_state(lease.queue_name)
        iterating = state.iterating_consumers()
        for consumer in iterating:
            consumer.wake()
        if not iterating:
            self.settlement.flush_acks(state)

    def _keep_original(self, proxy: PGMQMessageProxy) -> None:
        """A retry's re-enqueue failed: make the original visible again rather than delete it."""
        lease = proxy.lease
        lease.resend_pending = False
        self.settlement.forget([lease])
        proxy.consumer.discharge(lease)
        # In an outage the database has logged it once already; one line per message would be noise.
        level = "DEBUG" if self.settlement.database.outage.ongoing else "WARNING"
        log.log(level, "Re-enqueueing message {} failed; its original delivery will run again", proxy.message_id)
        try:
            self.settlement.release([lease], uncount=False)
        except DatabaseUnavailable:
            # Not raised to the worker, which would retry the ack every 5 s: nothing holds the lease any more, so
            # the original comes back by itself once it lapses.
            log.debug("Message {} will run again once its lease lapses", proxy.message_id)

    def nack(self, message: MessageProxy) -> None:
        proxy = _own(message)
        lease = proxy.lease
        if lease.settled:
            return
        reason = "unknown_actor" if isinstance(proxy.exception, ActorNotFound) else "failed"
        try:
            why = reason_from_exception(
                proxy.exception, attempts=_attempts(proxy.options.get("retries")), reason=reason
            )
            lease.dead_lettered = self.settlement.dead_letter(
                lease, why, message=proxy.encode().decode("utf-8"), actor_name=proxy.actor_name
            )
        except DatabaseUnavailable:
            # Raised to the worker, which retries the nack until the database is back; the lease stays held.
            raise
        except Exception as exc:
            # Not raised: Dramatiq would only log it as its own bug. The lease is let go, so the message runs again
            # once it lapses and is dead-lettered as poison after max_deliveries runs.
            self.settlement.forget([lease])
            log.opt(exception=exc).error(
                "Could not dead-letter message {} ({}: {}); it runs again once its lease lapses",
                proxy.message_id,
                type(exc).__name__,
                exc,
            )
        lease.settled = True
        proxy.consumer.discharge(lease)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        self._requeue([_own(m) for m in messages])

    def _requeue(self, proxies: Iterable[PGMQMessageProxy]) -> None:
        leases = []
        for proxy in proxies:
            if not proxy.lease.settled:
                proxy.lease.settled = True
                leases.append(proxy.lease)
                proxy.consumer.discharge(proxy.lease)
        self.settlement.requeue(leases)

    def resend(
        self, proxy: PGMQMessageProxy, params: dict[str, Any], connection: psycopg.Connection[Any] | None
    ) -> bool:
        """Replace the delivery by its retry (the broker's ``enqueue`` of a message this broker delivered).

        False when the delivery was no longer held, and nothing was sent. The broker sets ``lease.resend_pending``
        first; it stays set if this raises, so the ack keeps the original.

        Raises:
            DatabaseUnavailable: The retry was not sent.
        """
        lease = proxy.lease
        sent = self.settlement.resend(lease, params, connection)
        lease.resend_pending = False
        lease.settled = True
        proxy.consumer.discharge(lease)
        return sent

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state.consumers.discard(self)
        buffered = list(self._buffer)
        self._buffer.clear()
        try:
            self._requeue(buffered)
        finally:
            self.settlement.flush_acks(self.state)

    # -- fetching ---------------------------------------------------------------------------------------------

    def __next__(self) -> MessageProxy | None:
        self._iterating = True
        try:
            return self._next()
        finally:
            self._iterating = False

    def _next(self) -> MessageProxy | None:
        deadline = time.monotonic() + self.timeout / 1000
        while True:
            if self._buffer:
                return self._buffer.popleft()
            now = time.monotonic()
            if now < self._retry_at:
                # Backing off in an outage: notifications and acks wait for the next attempt. Never past the
                # deadline, so that the worker still notices a shutdown.
                time.sleep(max(0.0, min(self._retry_at, deadline) - now))
                if self._retry_at > deadline:
                    return None
                continue
            # Cleared before looking, so a notification or ack that lands after the fetch still wakes the wait.
            self._wakeup.clear()
            wanted = max(self.prefetch - self.outstanding_count, 0)
            room = self.settlement.slots.take(wanted, self if self._backlog else None) if wanted else 0
            rows: list[Fetched] = []
            try:
                try:
                    rows = self.settlement.fetch(self.state, room) if room or self.state.pending_acks else []
                finally:
                    self.settlement.slots.give_back(room - len(rows))
                if room:
                    self._backlog = len(rows) >= room
                wait_s = deadline - time.monotonic()
                if room and not rows:
                    wait_s = min(wait_s, self.settlement.idle_wait_s(self.queue_name))
            except DatabaseUnavailable:
                # The acks are back in the queue's state; the database logged the outage (once).
                self._retry_at = time.monotonic() + self._backoff.next_s()
                continue
            self._backoff.reset()
            if rows:
                self._accept(rows)
                continue
            woke = self._wakeup.wait(max(0.0, wait_s))
            if not woke:
                # Time to look again: a delayed message may be due, or a lapsed lease visible again, which no
                # notification announces. Ask for a free thread at the next settlement if none is free now.
                self._backlog = True
                if time.monotonic() >= deadline:
                    return None

    def _accept(self, rows: list[Fetched]) -> None:
        """Hand the fetched rows to the worker, each as a message or a dead letter (which frees its slot at once)."""
        leased = [(Lease(self.queue_name, row.msg_id, _token(row), row.read_ct or 0), row) for row in rows]
        # Tracked before anything can fail, so that no fetched message is left to lapse unnoticed.
        self.settlement.track([lease for lease, _ in leased])
        good: list[PGMQMessageProxy] = []
        doomed: list[tuple[Lease, DeadLetterReason]] = []
        for lease, row in leased:
            try:
                delivery = self._delivery(lease, row)
            except Exception as exc:  # one row that cannot be decoded costs its neighbours nothing
                delivery = DeadLetterReason(
                    reason="undecodable",
                    error_type=type(exc).__name__,
                    error_message=f"The body could not be decoded: {exc}",
                    attempts=lease.runs_before,
                )
            if isinstance(delivery, DeadLetterReason):
                doomed.append((lease, delivery))
            else:
                good.append(delivery)
        if good:
            with self._lock:
                self._outstanding.update((proxy.lease.msg_id, proxy.lease.token) for proxy in good)
            self._buffer.extend(good)
        self.settlement.slots.give_back(len(doomed))
        for lease, why in doomed:
            try:
                self.settlement.dead_letter(lease, why)
            except DatabaseUnavailable:
                # The outage is logged; the row comes back once its lease lapses, and is dead-lettered then.
                self.settlement.forget([lease])
            except Exception as exc:  # one row's failure costs the rest of the batch nothing
                self.settlement.forget([lease])
                log.opt(exception=exc).error(
                    "Could not dead-letter delivery {} of queue {!r} ({}); it comes back once its lease lapses",
                    lease.msg_id,
                    self.queue_name,
                    why.reason,
                )

    def _delivery(self, lease: Lease, row: Fetched) -> PGMQMessageProxy | DeadLetterReason:
        if lease.runs_before >= self.max_deliveries:
            return DeadLetterReason(
                reason="max_deliveries",
                error_type="MaxDeliveriesExceeded",
                error_message=(
                    f"Delivered {lease.runs_before} times without being settled (max_deliveries="
                    f"{self.max_deliveries}); a worker probably died while running it"
                ),
                attempts=lease.runs_before,
            )
        assert row.message is not None and row.enqueued_at is not None
        decoded = decode_body(
            row.message, queue_name=self.queue_name, msg_id=lease.msg_id, enqueued_at=row.enqueued_at,
            handlers=self.handlers,
        )  # fmt: skip
        if isinstance(decoded, Undecodable):
            return DeadLetterReason(
                reason=decoded.reason,
                error_type=decoded.error_type,
                error_message=decoded.error_message,
                attempts=lease.runs_before,
            )
        if row.fairness_key and FAIRNESS_KEY_OPTION not in decoded.options:
            # A plain JSON message keyed by its queue's key path: its retries are Dramatiq envelopes, keyed by option.
            decoded.options[FAIRNESS_KEY_OPTION] = row.fairness_key
        lease.message_id = decoded.message_id
        return PGMQMessageProxy(decoded, lease=lease, consumer=self)


class WorkerThreads(Middleware):
    """Sizes the broker's :class:`~brokers.settlement.Slots` from the worker threads of each Dramatiq worker."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.slots.add_threads(worker.worker_threads)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.slots.remove_threads(worker.worker_threads)


def _attempts(retries: object) -> int:
    """The runs of a failed message, from its ``retries`` option, as the dead-letter store counts them."""
    if isinstance(retries, bool) or not isinstance(retries, int | float) or not retries >= 1:
        return 1
    return int(min(retries, MAX_COUNT_OPTION + 1))


def _token(row: Fetched) -> datetime:
    assert row.last_read_at is not None, "a leased row always has its token"
    return row.last_read_at


def _own(message: MessageProxy) -> PGMQMessageProxy:
    if not isinstance(message, PGMQMessageProxy):
        msg = f"{message!r} was not fetched by a PGMQBroker consumer; only its own messages can be settled"
        raise TypeError(msg)
    return message

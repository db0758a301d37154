"""The consumer and message proxy of the PGMQ broker (private: reached only through ``PGMQBroker.consume``).

One consumer serves one queue in one process. Each database round trip deletes the messages acknowledged since
the last one and leases as many new messages as the prefetch allows (``pgmq_broker.fetch``), so the ack path
costs no round trip of its own while the worker is busy. An idle consumer waits for a PGMQ insert notification,
an acknowledgement that frees prefetch room, the next delayed message's due time, or the poll interval,
whichever comes first, and returns ``None`` by its timeout so that the worker can notice a shutdown.

A consumer rides out a database outage by itself: a fetch that fails keeps its acknowledgements for the next one
and waits with a growing pause, still returning ``None`` by its timeout, instead of raising ``ConnectionClosed``
to Dramatiq's consumer thread (which would log a critical line and rebuild the consumer every few seconds). The
broker logs the outage once when it starts and once when it ends.

Dramatiq calls ``ack``/``nack`` from worker threads while the consumer thread iterates, so everything shared is
guarded by a lock or an :class:`threading.Event`. How a delivery ends (ack, nack, requeue, release, a retry's
resend) lives here too, in the ``_Settlement`` mixin of the broker, with the per-queue state the consumers of
one queue share (Dramatiq may replace a consumer while messages it fetched are still running).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, LiteralString

import attrs
import psycopg
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.errors import ActorNotFound
from dramatiq.message import Message
from dramatiq.middleware import SkipMessage
from loguru import logger

from . import dead_letters as _dead_letters
from . import queries
from .dead_letters import DeadLetterReason, reason_from_exception
from .envelope import Undecodable, decode_body
from .errors import DatabaseUnavailable
from .lease import Lease, LeaseKeeper

if TYPE_CHECKING:
    from .broker import PGMQBroker, _Outage

log = logger.bind(component="PGMQBroker")

__all__: list[str] = []

#: Message option: an ack leaves the message on the queue (it reappears after its visibility timeout) instead of
#: deleting it. Set it from a middleware's ``before_process_message``.
KEEP_ON_ACK_OPTION = "pgmq_keep_on_ack"
#: The shortest idle wait, in seconds: stops a consumer from spinning on a visible message another reader holds.
MIN_IDLE_WAIT_S = 0.005
#: First pause, in seconds, of a consumer whose fetch failed because the database is unavailable; doubled on each
#: further failure.
OUTAGE_MIN_BACKOFF_S = 0.5
#: Longest pause, in seconds, between two fetch attempts of a consumer during a database outage.
OUTAGE_MAX_BACKOFF_S = 5.0


class _PGMQMessageProxy(MessageProxy):
    """A message leased from PGMQ, settled exactly once by ack, nack, requeue or a retry's resend."""

    def __init__(self, message: Message[Any], *, lease: Lease, consumer: _PGMQConsumer) -> None:
        super().__init__(message)
        self._lease = lease
        self._consumer = consumer
        self._settled = False
        # Set while a retry's re-enqueue is under way; still set at ack time means the re-enqueue failed.
        self._resend_pending = False

    @property
    def pgmq_msg_id(self) -> int:
        """The PGMQ ``msg_id`` of this delivery."""
        return self._lease.msg_id


class _PGMQConsumer(Consumer):
    def __init__(self, broker: PGMQBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self._broker = broker
        self._state: _QueueState = broker._queue_state(queue_name)
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.timeout = timeout
        self._buffer: deque[_PGMQMessageProxy] = deque()
        self._outstanding: set[int] = set()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._busy = False
        self._closed = False
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._state.consumers.add(self)
        broker._start_consuming(queue_name)

    # Called by the broker's listener and by settlements.
    def wake(self) -> None:
        self._wakeup.set()

    def _discharge(self, proxy: _PGMQMessageProxy) -> None:
        with self._lock:
            self._outstanding.discard(proxy._lease.msg_id)
        self._wakeup.set()

    @property
    def outstanding_count(self) -> int:
        """Messages fetched by this consumer and not settled yet (buffered or running)."""
        with self._lock:
            return len(self._outstanding)

    def ack(self, message: MessageProxy) -> None:
        self._broker._settle_ack(_own(message))

    def nack(self, message: MessageProxy) -> None:
        self._broker._settle_nack(_own(message))

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        self._broker._settle_requeue([_own(m) for m in messages])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state.consumers.discard(self)
        buffered = list(self._buffer)
        self._buffer.clear()
        try:
            self._broker._settle_requeue(buffered)
        finally:
            self._broker._flush_acks(self._state)

    def __next__(self) -> MessageProxy | None:
        self._busy = True
        try:
            return self._next()
        finally:
            self._busy = False

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
            room = self.prefetch - self.outstanding_count
            acks = self._state.take_acks()
            wait_s = deadline - time.monotonic()
            try:
                rows = self._broker._fetch(self._state, acks, max(room, 0)) if room > 0 or acks else []
                if room > 0 and not rows:
                    wait_s = min(wait_s, self._broker._idle_wait_s(self.queue_name))
            except DatabaseUnavailable:
                # _fetch put the acks back; the broker logged the outage (once).
                self._backoff_s = min(max(self._backoff_s * 2, OUTAGE_MIN_BACKOFF_S), OUTAGE_MAX_BACKOFF_S)
                self._retry_at = time.monotonic() + self._backoff_s
                continue
            self._backoff_s = 0.0
            if rows:
                self._accept(rows)
                continue
            woke = self._wakeup.wait(max(0.0, wait_s))
            if not woke and time.monotonic() >= deadline:
                return None

    def _accept(self, rows: list[tuple[int, int, datetime, datetime, str, bool]]) -> None:
        broker = self._broker
        fetched = [
            (Lease(self.queue_name, msg_id, token, read_ct), enqueued_at, body)
            for msg_id, read_ct, enqueued_at, token, body, _ in rows
        ]
        # Tracked before anything else can fail, so that no fetched message is left to lapse unnoticed.
        broker._keeper_track([lease for lease, _, _ in fetched])
        good: list[_PGMQMessageProxy] = []
        doomed: list[tuple[Lease, DeadLetterReason]] = []
        for lease, enqueued_at, body in fetched:
            try:
                delivery = self._delivery(lease, enqueued_at, body)
            except Exception as exc:  # one row that cannot be decoded costs its neighbours nothing
                delivery = DeadLetterReason(
                    reason="undecodable",
                    error_type=type(exc).__name__,
                    error_message=f"The body could not be decoded: {exc}",
                    attempts=lease.read_ct,
                )
            if isinstance(delivery, DeadLetterReason):
                doomed.append((lease, delivery))
            else:
                good.append(delivery)
        if good:
            with self._lock:
                self._outstanding.update(proxy._lease.msg_id for proxy in good)
            self._buffer.extend(good)
        for lease, why in doomed:
            try:
                broker._dead_letter_lease(lease, None, None, None, why)
            except DatabaseUnavailable:
                # The broker logged the outage; the message comes back once its lease lapses and is dead-lettered then.
                pass
            finally:
                broker._keeper_forget([lease])

    def _delivery(self, lease: Lease, enqueued_at: datetime, body: str) -> _PGMQMessageProxy | DeadLetterReason:
        max_deliveries = self._broker.max_deliveries
        if lease.read_ct >= max_deliveries:
            return DeadLetterReason(
                reason="max_deliveries",
                error_type="MaxDeliveriesExceeded",
                error_message=(
                    f"Started {lease.read_ct} times without being settled (max_deliveries={max_deliveries}); "
                    "a worker probably died while running it"
                ),
                attempts=lease.read_ct,
            )
        decoded = decode_body(
            body,
            queue_name=self.queue_name,
            msg_id=lease.msg_id,
            enqueued_at=enqueued_at,
            handlers=self._broker._handlers,
        )
        if isinstance(decoded, Undecodable):
            return DeadLetterReason(
                reason=decoded.reason,
                error_type=decoded.error_type,
                error_message=decoded.error_message,
                attempts=lease.read_ct,
            )
        lease.message_id = decoded.message_id
        return _PGMQMessageProxy(decoded, lease=lease, consumer=self)


@attrs.define(eq=False)
class _QueueState:
    """Per-process state of one queue, shared by its consumers (Dramatiq may replace a consumer mid-flight)."""

    name: str
    pending_acks: list[Lease] = attrs.field(factory=list)
    consumers: weakref.WeakSet[_PGMQConsumer] = attrs.field(factory=weakref.WeakSet)
    lock: threading.Lock = attrs.field(factory=threading.Lock)

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


class _Settlement:
    """How deliveries end: fetched (and acks flushed), acknowledged, dead-lettered, requeued or released.

    A mixin of :class:`~brokers.PGMQBroker`, kept next to the consumer whose lifecycle it implements.
    """

    if TYPE_CHECKING:
        _keeper: LeaseKeeper | None
        _outage: _Outage
        _handlers: dict[str, str]
        max_deliveries: int
        archive_on_ack: bool
        async_commit: bool
        visibility_timeout_ms: int
        poll_interval_ms: int

        def _connection(self) -> AbstractContextManager[psycopg.Connection[Any]]: ...
        def _execute(self, query: LiteralString, params: dict[str, Any]) -> list[Any]: ...
        def _queue_state(self, queue_name: str) -> _QueueState: ...

    def _keeper_track(self, leases: list[Lease]) -> None:
        if self._keeper is not None:
            self._keeper.track(leases)

    def _keeper_forget(self, leases: list[Lease]) -> None:
        if self._keeper is not None:
            self._keeper.forget(leases)

    def _fetch(self, state: _QueueState, acks: list[Lease], qty: int) -> list[Any]:
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
            rows = self._execute(queries.FETCH, params)
        except BaseException:
            state.return_acks(acks)
            raise
        if not acks:
            return rows
        self._keeper_forget(acks)
        stale = {row[0] for row in rows if row[5]}
        for lease in acks:
            if lease.msg_id in stale:
                _log_stale("ack", lease)
        return [row for row in rows if not row[5]] if stale else rows

    def _flush_acks(self, state: _QueueState) -> None:
        acks = state.take_acks()
        if acks:
            self._fetch(state, acks, 0)

    def _idle_wait_s(self, queue_name: str) -> float:
        """How long an idle consumer may wait: until the next delayed message is due, at most the poll interval."""
        wait_s = self.poll_interval_ms / 1000
        with self._connection() as conn:
            row = conn.execute(queries.NEXT_VISIBLE_IN_MS, {"queue": queue_name}).fetchone()
        if row is not None and row[0] is not None:
            wait_s = min(wait_s, max(row[0] / 1000, 0.0))
        return max(wait_s, MIN_IDLE_WAIT_S)

    def _settle_ack(self, proxy: _PGMQMessageProxy) -> None:
        state = self._queue_state(proxy._lease.queue_name)
        if not proxy._settled:
            proxy._settled = True
            if proxy._resend_pending:
                # The retry's re-enqueue failed: keep the original, visible again, rather than delete it.
                proxy._resend_pending = False
                self._keeper_forget([proxy._lease])
                proxy._consumer._discharge(proxy)
                # In an outage the broker has logged it once already; one line per message would be noise.
                level = "DEBUG" if self._outage.since is not None else "WARNING"
                log.log(
                    level, "Re-enqueueing message {} failed; its original delivery will run again", proxy.message_id
                )
                try:
                    self._release([proxy._lease], uncount=False)
                except DatabaseUnavailable:
                    # Not raised to the worker, which would retry the ack every 5 s: nothing holds the lease any
                    # more, so the original comes back by itself once it lapses.
                    log.debug("Message {} will run again once its lease lapses", proxy.message_id)
                return
            if proxy.options.get(KEEP_ON_ACK_OPTION):
                # Processed but kept: stop extending the lease and leave the message where it is, so it comes
                # back after a visibility timeout (a dry-run mode for consumers that must not delete). The
                # delivery is not counted, or the message would be dead-lettered after max_deliveries runs.
                self._keeper_forget([proxy._lease])
                proxy._consumer._discharge(proxy)
                self._release([proxy._lease], uncount=True, delay_ms=self.visibility_timeout_ms)
                return
            proxy._lease.settling = True
            state.add_ack(proxy._lease)
            proxy._consumer._discharge(proxy)
        # A consumer of the queue iterating in this process (maybe not the one that fetched the message, which
        # Dramatiq replaces after a connection error) deletes the ack with its next fetch; otherwise do it now.
        iterating = [consumer for consumer in list(state.consumers) if consumer._busy and not consumer._closed]
        if iterating:
            for consumer in iterating:
                consumer.wake()
        else:
            self._flush_acks(state)

    def _settle_start(self, proxy: _PGMQMessageProxy) -> None:
        """Count the delivery as started, or skip it when its lease is gone (or cannot be checked)."""
        lease = proxy._lease
        params = {
            "queue": lease.queue_name,
            "msg_id": lease.msg_id,
            "token": lease.token,
            "async_commit": self.async_commit,
        }
        try:
            rows = self._execute(queries.START, params)
        except DatabaseUnavailable as exc:
            count = None
            reason: BaseException | None = exc
        else:
            count = rows[0][0] if rows else None
            reason = None
        if count is not None:
            lease.read_ct = count
            return
        proxy._settled = True
        self._keeper_forget([lease])
        proxy._consumer._discharge(proxy)
        if reason is None:
            _log_stale("start", lease)
        msg = f"message {proxy.message_id} was not started: its delivery is no longer held ({reason or 'lease lapsed'})"
        raise SkipMessage(msg)

    def _settle_nack(self, proxy: _PGMQMessageProxy) -> None:
        if proxy._settled:
            return
        exc = proxy._exception
        attempts = int(proxy.options.get("retries", 0) or 0) + (0 if proxy.options.get("retries") else 1)
        reason = "unknown_actor" if isinstance(exc, ActorNotFound) else "failed"
        why = reason_from_exception(exc, attempts=max(attempts, 1), reason=reason)
        proxy._lease.settling = True
        self._dead_letter_lease(proxy._lease, proxy.encode().decode("utf-8"), proxy.message_id, proxy.actor_name, why)
        proxy._settled = True
        self._keeper_forget([proxy._lease])
        proxy._consumer._discharge(proxy)

    def _settle_requeue(self, proxies: Sequence[_PGMQMessageProxy]) -> None:
        leases = []
        for proxy in proxies:
            if not proxy._settled:
                proxy._settled = True
                leases.append(proxy._lease)
                proxy._consumer._discharge(proxy)
        self._keeper_forget(leases)
        # Never started, so never counted (see _settle_start).
        self._release(leases, uncount=False)

    def _release(self, leases: list[Lease], *, uncount: bool, delay_ms: int = 0) -> None:
        by_queue: dict[str, list[Lease]] = {}
        for lease in leases:
            by_queue.setdefault(lease.queue_name, []).append(lease)
        for queue_name, group in by_queue.items():
            with self._connection() as conn:
                conn.execute(
                    queries.RELEASE,
                    {
                        "queue": queue_name,
                        "ids": [lease.msg_id for lease in group],
                        "tokens": [lease.token for lease in group],
                        "delay_ms": delay_ms,
                        "uncount": uncount,
                    },
                )

    def _dead_letter_lease(
        self, lease: Lease, message: str | None, message_id: str | None, actor_name: str | None, why: DeadLetterReason
    ) -> None:
        with self._connection() as conn:
            recorded = _dead_letters.dead_letter(
                conn,
                queue_name=lease.queue_name,
                msg_id=lease.msg_id,
                token=lease.token,
                message=message,
                message_id=message_id,
                actor_name=actor_name,
                why=why,
            )
        if not recorded:
            _log_stale("dead letter", lease)
        else:
            log.bind(event="dead_lettered").warning(
                "Dead-lettered message {} of queue {!r} ({}: {})",
                message_id or lease.msg_id,
                lease.queue_name,
                why.reason,
                why.error_type,
            )


def _log_stale(settlement: str, lease: Lease) -> None:
    log.bind(event="stale_settlement").warning(
        "Did not {} message {} (delivery {} of queue {!r}): it is no longer held by this worker, whose lease lapsed;"
        " another worker may be running it, so it was left alone",
        settlement,
        lease.message_id or lease.msg_id,
        lease.msg_id,
        lease.queue_name,
    )


def _own(message: MessageProxy) -> _PGMQMessageProxy:
    if not isinstance(message, _PGMQMessageProxy):
        msg = f"{message!r} was not fetched by a PGMQBroker consumer; only its own messages can be settled"
        raise TypeError(msg)
    return message

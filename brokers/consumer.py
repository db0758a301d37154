"""The consumer and message proxy of the PGMQ broker (private: reached only through ``PGMQBroker.consume``).

One consumer serves one queue in one process. Each database round trip deletes the messages acknowledged since
the last one and leases as many new messages as the prefetch allows (``pgmq_broker.fetch``), so the ack path
costs no round trip of its own while the worker is busy. An idle consumer waits for a PGMQ insert notification,
an acknowledgement that frees prefetch room, the next delayed message's due time, or the poll interval,
whichever comes first, and returns ``None`` by its timeout so that the worker can notice a shutdown.

Dramatiq calls ``ack``/``nack`` from worker threads while the consumer thread iterates, so everything shared is
guarded by a lock or an :class:`threading.Event`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dramatiq.broker import Consumer, MessageProxy
from dramatiq.message import Message

from .dead_letters import DeadLetterReason
from .envelope import Undecodable, decode_body
from .lease import Lease

if TYPE_CHECKING:
    from .broker import PGMQBroker, _QueueState

__all__: list[str] = []

#: The shortest idle wait, in seconds: stops a consumer from spinning on a visible message another reader holds.
MIN_IDLE_WAIT_S = 0.005


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
            # Cleared before looking, so a notification or ack that lands after the fetch still wakes the wait.
            self._wakeup.clear()
            room = self.prefetch - self.outstanding_count
            acks = self._state.take_acks()
            wait_s = deadline - time.monotonic()
            if room > 0 or acks:
                rows = self._broker._fetch(self._state, acks, max(room, 0))
                if rows:
                    self._accept(rows)
                    continue
                if room > 0:
                    wait_s = min(wait_s, self._broker._idle_wait_s(self.queue_name))
            woke = self._wakeup.wait(max(0.0, wait_s))
            if not woke and time.monotonic() >= deadline:
                return None

    def _accept(self, rows: list[tuple[int, int, datetime, datetime, str]]) -> None:
        broker = self._broker
        good: list[_PGMQMessageProxy] = []
        for msg_id, read_ct, enqueued_at, token, body in rows:
            lease = Lease(self.queue_name, msg_id, token, read_ct)
            if read_ct > broker.max_deliveries:
                why = DeadLetterReason(
                    reason="max_deliveries",
                    error_type="MaxDeliveriesExceeded",
                    error_message=(
                        f"Delivered {read_ct} times without being acknowledged (max_deliveries="
                        f"{broker.max_deliveries}); a worker probably died while running it"
                    ),
                    attempts=read_ct,
                )
                broker._dead_letter_lease(lease, None, None, None, why)
                continue
            decoded = decode_body(
                body, queue_name=self.queue_name, msg_id=msg_id, enqueued_at=enqueued_at, handlers=broker._handlers
            )
            if isinstance(decoded, Undecodable):
                why = DeadLetterReason(
                    reason=decoded.reason,
                    error_type=decoded.error_type,
                    error_message=decoded.error_message,
                    attempts=read_ct,
                )
                broker._dead_letter_lease(lease, None, None, None, why)
                continue
            good.append(_PGMQMessageProxy(decoded, lease=lease, consumer=self))
        if good:
            broker._keeper_track([proxy._lease for proxy in good])
            with self._lock:
                self._outstanding.update(proxy._lease.msg_id for proxy in good)
            self._buffer.extend(good)


def _own(message: MessageProxy) -> _PGMQMessageProxy:
    if not isinstance(message, _PGMQMessageProxy):
        msg = f"{message!r} was not fetched by a PGMQBroker consumer; only its own messages can be settled"
        raise TypeError(msg)
    return message

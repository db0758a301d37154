"""Errors raised by the PGMQ broker.

    dramatiq.errors.BrokerError
     └── PGMQBrokerError
          ├── MigrationError        a schema migration failed (the message names the file)
          ├── InvalidQueueName      a Dramatiq queue name PGMQ cannot hold (also a ValueError)
          └── DatabaseUnavailable   the database cannot be reached (also dramatiq's ConnectionClosed)
               └── DatabaseBusy     every pooled connection stayed in use (not an outage)

``DatabaseUnavailable`` subclasses :class:`dramatiq.errors.ConnectionClosed` so that Dramatiq's worker treats a
database outage as it treats a lost RabbitMQ or Redis connection: it retries a failed ack or nack instead of
dying. (The broker's consumer does not raise it: it waits for the database by itself.) ``DatabaseBusy`` is one of
them so that every caller that waits and retries after an outage does the same when the pool is exhausted; what
differs is that no outage is logged for it.
"""

from __future__ import annotations

from typing import Any

from dramatiq.errors import BrokerError, ConnectionClosed

__all__ = ["DatabaseBusy", "DatabaseUnavailable", "InvalidQueueName", "MigrationError", "PGMQBrokerError"]


class PGMQBrokerError(BrokerError):
    """Base class of every error the PGMQ broker raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)  # type: ignore[no-untyped-call]  # dramatiq's errors are untyped

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce unpickles by calling the class with `args`, which cannot carry a keyword-only
        # argument (``queue_name=``). Unpickle as any object instead: made without __init__, attributes restored.
        return _uninitialised, (type(self), *self.args), self.__dict__


class MigrationError(PGMQBrokerError):
    """A schema migration could not be applied; fix the named file or the database, then run it again."""


class InvalidQueueName(PGMQBrokerError, ValueError):
    """A Dramatiq queue name that cannot be a PGMQ queue.

    PGMQ folds names to lower case in its table names, limits them to 47 characters, and its insert
    notifications silently stop working for names with upper-case letters. Use lower-case letters,
    digits and underscores. The offending name is in ``queue_name``.
    """

    def __init__(self, message: str, *, queue_name: str) -> None:
        super().__init__(message)
        self.queue_name = queue_name


class DatabaseUnavailable(PGMQBrokerError, ConnectionClosed):
    """The database could not be reached or the connection broke; the broker retries with backoff.

    Raised from enqueue, consume, ack and nack; iterating a consumer backs off and returns ``None`` instead.
    Dramatiq's worker retries an ack or nack on it; other callers may retry the call once the database is back.
    The psycopg error is the ``__cause__``.
    """


class DatabaseBusy(DatabaseUnavailable):
    """Every connection of the process's pool stayed in use for the pool's timeout; the database itself may be fine.

    The pool never opens more than its ``max_size`` connections (the connection budget), so a caller waits and then
    gets this. It is not logged as an outage. Callers retry as after an outage; if it happens often, the pool is too
    small for the work (more threads than it can serve) or a caller holds connections too long. ``max_size`` and
    ``timeout_s`` say which pool and wait were exhausted.
    """

    def __init__(self, message: str, *, max_size: int, timeout_s: float) -> None:
        super().__init__(message)
        self.max_size = max_size
        self.timeout_s = timeout_s


def _uninitialised(cls: type[PGMQBrokerError], *args: Any) -> PGMQBrokerError:
    """An error of `cls` with `args` but no attributes yet: unpickling restores them next."""
    return cls.__new__(cls, *args)

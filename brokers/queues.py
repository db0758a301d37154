"""What a queue is to the broker: a name PGMQ can hold, its table in this process, and a snapshot of its state."""

from __future__ import annotations

import re

import attrs
from psycopg import sql

from . import queries
from .database import Database
from .errors import InvalidQueueName

__all__ = ["MAX_QUEUE_NAME_LENGTH", "QueueMetrics", "QueueTables", "validate_queue_name"]

#: Longest queue name PGMQ accepts (its partitioned table names must fit in 63 characters).
MAX_QUEUE_NAME_LENGTH = 47
_QUEUE_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def validate_queue_name(queue_name: str) -> str:
    """Return `queue_name` if PGMQ can hold it, else raise :class:`InvalidQueueName` saying what would work."""
    if _QUEUE_NAME.fullmatch(queue_name) and len(queue_name) <= MAX_QUEUE_NAME_LENGTH:
        return queue_name
    suggestion = re.sub(r"[^a-z0-9_]", "_", queue_name.lower())[:MAX_QUEUE_NAME_LENGTH] or "default"
    if suggestion[0].isdigit():
        suggestion = "q_" + suggestion[: MAX_QUEUE_NAME_LENGTH - 2]
    msg = (
        f"Queue name {queue_name!r} cannot be a PGMQ queue: use lower-case letters, digits and underscores, "
        f"starting with a letter or underscore, at most {MAX_QUEUE_NAME_LENGTH} characters (e.g. {suggestion!r}). "
        "PGMQ folds table names to lower case and its insert notifications break for upper-case names."
    )
    raise InvalidQueueName(msg, queue_name=queue_name)


@attrs.frozen(kw_only=True)
class QueueMetrics:
    """A snapshot of one queue (``PGMQBroker.metrics``)."""

    queue_name: str
    #: Messages ready to run now.
    queued: int
    #: Messages waiting for their delay.
    delayed: int
    #: Messages leased by a worker (buffered or running).
    in_flight: int
    #: Age of the oldest ready message, in milliseconds (0 when none).
    oldest_age_ms: float
    #: Dead letters recorded for the queue.
    dead_lettered: int


class QueueTables:
    """The PGMQ queues this process created (each created on first use, once), and the send statement of each."""

    def __init__(self, database: Database) -> None:
        self.database = database
        #: The queues this process created or found, so it does not ask again.
        self.created: set[str] = set()
        self._send_queries: dict[str, bytes] = {}

    def create(self, queue_name: str) -> None:
        """Create the PGMQ queue unless this process did already (safe to race with other processes)."""
        if queue_name in self.created:
            return
        validate_queue_name(queue_name)
        with self.database.connection() as conn:
            conn.execute(queries.CREATE_QUEUE, {"queue": queue_name})
        self.created.add(queue_name)

    def send_query(self, queue_name: str) -> bytes:
        """The prepared INSERT of one message into the queue's table (``queries.SEND_TO_TABLE``)."""
        query = self._send_queries.get(queue_name)
        if query is None:
            table = sql.Identifier(f"q_{validate_queue_name(queue_name)}")
            query = self._send_queries[queue_name] = queries.SEND_TO_TABLE.format(table=table).as_bytes(None)
        return query

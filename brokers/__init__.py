"""A Dramatiq broker over PGMQ (Postgres message queues).

``PGMQBroker`` is the broker; ``brokers.schema.install(conn)`` installs PGMQ and the broker's tables.
Dead letters are listed, counted, purged and replayed through the broker (see ``brokers.dead_letters``).
``Database`` is the fork-safe pool with outage logging that the broker, ``PeriodicScheduler`` and
``PostgresBackend`` use; pass one instance to each (``database=``) for one pool per process.
Fairness keys (``brokers.fairness``): on a queue put in fairness mode with ``enable_fairness``, fetches rotate across
the keys of its messages (the ``FAIRNESS_KEY_OPTION`` message option, or a JSON path declared with the queue).
"""

from __future__ import annotations

from .broker import PGMQBroker
from .consumer import KEEP_ON_ACK_OPTION
from .database import Database, PerProcess
from .dead_letters import DeadLetter, DeadLetterReason
from .envelope import foreign_message_id
from .errors import DatabaseBusy, DatabaseUnavailable, InvalidQueueName, MigrationError, PGMQBrokerError
from .fairness import FAIRNESS_KEY_OPTION, enable_fairness
from .listener import channel_name
from .periodic import PeriodicScheduler, Schedule
from .queues import QueueMetrics, validate_queue_name
from .rate_limits import PostgresBackend, RateLimitRetries, RetryAfter, use_rate_limit_retries

__all__ = [
    "Database",
    "DatabaseBusy",
    "DatabaseUnavailable",
    "DeadLetter",
    "DeadLetterReason",
    "FAIRNESS_KEY_OPTION",
    "InvalidQueueName",
    "KEEP_ON_ACK_OPTION",
    "MigrationError",
    "PGMQBroker",
    "PGMQBrokerError",
    "PerProcess",
    "PeriodicScheduler",
    "PostgresBackend",
    "QueueMetrics",
    "RateLimitRetries",
    "RetryAfter",
    "Schedule",
    "channel_name",
    "enable_fairness",
    "foreign_message_id",
    "use_rate_limit_retries",
    "validate_queue_name",
]

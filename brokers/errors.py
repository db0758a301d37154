"""Errors raised by the PGMQ broker.

    dramatiq.errors.BrokerError
     └── PGMQBrokerError
          └── MigrationError      a schema migration failed (the message names the file)
"""

from __future__ import annotations

from dramatiq.errors import BrokerError

__all__ = ["MigrationError", "PGMQBrokerError"]


class PGMQBrokerError(BrokerError):
    """Base class of every error the PGMQ broker raises."""


class MigrationError(PGMQBrokerError):
    """A schema migration could not be applied; fix the named file or the database, then run it again."""

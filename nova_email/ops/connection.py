"""The operator commands' database connection, with the failures an operator can fix turned into one clear line.

An unreachable server and a database that was never migrated are not bugs: they become
`nova_email.errors.DatabaseError` (which the CLI prints without a traceback, exit status 2) saying what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors

from .. import db
from ..config import Settings
from ..errors import DatabaseError

__all__ = ["command_connection"]


@contextmanager
def command_connection(settings: Settings) -> Iterator[psycopg.Connection]:
    """An autocommit connection for one command; connection and schema failures become `DatabaseError`."""
    where = settings.database_url_redacted or f"the embedded PostgreSQL in {settings.data_dir}"
    try:
        conn = db.connect(settings, autocommit=True)
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())
        msg = f"cannot connect to {where}: {reason}; check DATABASE_URL and that the server is running"
        raise DatabaseError(msg) from exc
    try:
        with conn:
            yield conn
    except (errors.UndefinedTable, errors.UndefinedFunction, errors.InvalidSchemaName) as exc:
        msg = (
            f"the database at {where} is missing part of the schema ({exc.diag.message_primary}); "
            "run `nova-email migrate` first"
        )
        raise DatabaseError(msg) from exc

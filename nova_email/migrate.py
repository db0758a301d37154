"""``nova-email migrate``: PGMQ, the broker's tables, then the service's ``sql/`` migrations.

Safe to run twice and from several processes at once (see `brokers.schema`).
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from loguru import logger

from brokers import schema

__all__ = ["SQL_DIR", "migrate", "pending_migrations"]

log = logger.bind(component="Migrate")

#: The service's migrations, ``nova_email/sql/NNN_name.sql``, shipped in the package as data.
SQL_DIR = Path(__file__).resolve().parent / "sql"


def migrate(conn: psycopg.Connection, *, sql_dir: Path = SQL_DIR) -> list[str]:
    """Bring the database up to date; returns the names of the migrations applied now."""
    applied = schema.install(conn)
    applied += schema.apply_migrations(conn, namespace="nova_email", migrations=sql_dir)
    if applied:
        log.info("Database migrated: {} migration(s) applied", len(applied))
    else:
        log.info("Database already up to date")
    return applied


def pending_migrations(conn: psycopg.Connection, *, sql_dir: Path = SQL_DIR) -> list[str]:
    """What `migrate` would apply (PGMQ, the broker's and the service's migrations), as names; changes nothing."""
    pending = schema.pending_install(conn)
    service = schema.pending_migrations(conn, namespace="nova_email", migrations=sql_dir)
    return pending + [f"nova_email/{m.version:03d}_{m.name}" for m in service]

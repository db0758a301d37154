"""Install PGMQ and the broker's own tables, and apply versioned SQL migrations.

`install` is what a Dramatiq user needs before the first `PGMQBroker` call: it installs PGMQ
(``CREATE EXTENSION pgmq`` where the server ships it, otherwise the SQL bundled in the ``pgmq``
package, never both and never twice) and then the broker's own DDL from ``brokers/sql``.

`apply_migrations` is the generic runner behind it, usable for any folder of ``NNN_name.sql``
files: each file runs once, inside its own transaction, under a transaction-level advisory lock,
and is recorded in ``pgmq_broker.schema_migrations`` with its namespace and checksum. Two
processes migrating at once therefore serialise instead of racing; running it again is a no-op.
A file edited after release lists the checksums of its earlier texts in ``-- replaces: <sha256>`` lines;
a database that applied one of those texts is then recorded under the new one instead of being warned about.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import LiteralString

import attrs
import psycopg
from loguru import logger

from .errors import MigrationError

__all__ = [
    "Migration",
    "applied_checksums",
    "apply_migrations",
    "create_migrations_table",
    "install",
    "install_pgmq",
    "load_migrations",
    "pending_install",
    "pending_migrations",
]

log = logger.bind(component="Migrate")

#: Advisory lock key shared by every migrating process ("pgmqmigr" as bytes).
MIGRATION_LOCK_KEY = 0x70676D716D696772

_FILE_NAME = re.compile(r"^(?P<version>\d{3,})_(?P<name>[a-z0-9_]+)\.sql$")
#: ``-- replaces: <sha256>``: an earlier text of the same migration with the same effect on a database that ran it.
_REPLACES = re.compile(r"^-- replaces: (?P<checksum>[0-9a-f]{64})$", re.MULTILINE)

#: Create the bookkeeping table; runs under the advisory lock so concurrent first runs cannot race.
_CREATE_TABLE: LiteralString = """
create schema if not exists pgmq_broker;
create table if not exists pgmq_broker.schema_migrations (
    namespace text not null,
    version integer not null,
    name text not null,
    checksum text not null,
    applied_at timestamptz not null default now(),
    primary key (namespace, version)
)
"""
#: Serialise migrating processes for the length of one transaction.
_LOCK: LiteralString = "select pg_advisory_xact_lock(%(key)s)"
#: Run after `_LOCK`: locking a catalog table makes this backend take in the catalog changes of the process it waited
#: for. The advisory lock alone does not, so a schema this backend had looked up (and found missing) before the wait
#: would still look missing, and ``create schema if not exists`` would collide with the one just committed.
_SEE_COMMITTED_CATALOG: LiteralString = "select count(*) from pg_catalog.pg_namespace"
#: Checksum of an applied migration, if any.
_APPLIED: LiteralString = (
    "select checksum from pgmq_broker.schema_migrations where namespace = %(namespace)s and version = %(version)s"
)
#: Record one applied migration.
_RECORD: LiteralString = (
    "insert into pgmq_broker.schema_migrations (namespace, version, name, checksum)"
    " values (%(namespace)s, %(version)s, %(name)s, %(checksum)s)"
)
#: Every applied migration of a namespace.
_APPLIED_ALL: LiteralString = (
    "select version, checksum from pgmq_broker.schema_migrations where namespace = %(namespace)s order by version"
)
#: Record an applied migration under its current text.
_RERECORD: LiteralString = (
    "update pgmq_broker.schema_migrations set checksum = %(checksum)s, name = %(name)s"
    " where namespace = %(namespace)s and version = %(version)s"
)
#: Is PGMQ present, and how: as an extension, as plain SQL, or available to create.
_PGMQ_STATE: LiteralString = """
select exists (select 1 from pg_extension where extname = 'pgmq') as extension,
       to_regclass('pgmq.meta') is not null as schema,
       exists (select 1 from pg_available_extensions where name = 'pgmq') as available
"""
_CREATE_EXTENSION: LiteralString = "create extension if not exists pgmq"
#: Does the bookkeeping table exist (it does once anything was applied)?
_TABLE_EXISTS: LiteralString = "select to_regclass('pgmq_broker.schema_migrations') is not null"


@attrs.frozen
class Migration:
    """One SQL file: its version, name and text."""

    version: int
    name: str
    sql: str = attrs.field(repr=False)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def replaces(self) -> frozenset[str]:
        """Checksums of earlier texts of this file, declared in its ``-- replaces: <sha256>`` lines."""
        return frozenset(_REPLACES.findall(self.sql))


def load_migrations(directory: Path | Traversable) -> list[Migration]:
    """Read every ``NNN_name.sql`` file of `directory`, sorted by version.

    Raises:
        MigrationError: two files share a version number.
    """
    found: dict[int, Migration] = {}
    for entry in directory.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        version = int(match["version"])
        if version in found:
            msg = (
                f"Migrations {found[version].name!r} and {match['name']!r} in {directory} share version {version}; "
                "renumber one of them"
            )
            raise MigrationError(msg)
        found[version] = Migration(version, match["name"], entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def applied_checksums(conn: psycopg.Connection, namespace: str) -> dict[int, str]:
    """Version -> checksum of every migration of `namespace` applied so far (empty before the first); reads only."""
    if conn.execute(_TABLE_EXISTS).fetchone() != (True,):
        return {}
    return dict(conn.execute(_APPLIED_ALL, {"namespace": namespace}).fetchall())


def _check_idle(conn: psycopg.Connection) -> None:
    # Each migration commits on its own; inside a caller's transaction it could not.
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        msg = "Migrations commit one file at a time; call them on a connection that is not inside a transaction"
        raise MigrationError(msg)


def create_migrations_table(conn: psycopg.Connection) -> None:
    """Create the bookkeeping table if it is missing (each runner here does it first)."""
    with conn.transaction():
        conn.execute(_LOCK, {"key": MIGRATION_LOCK_KEY})
        conn.execute(_SEE_COMMITTED_CATALOG)
        conn.execute(_CREATE_TABLE)


def _apply_one(conn: psycopg.Connection, namespace: str, migration: Migration) -> bool:
    params = {"namespace": namespace, "version": migration.version}
    with conn.transaction():
        conn.execute(_LOCK, {"key": MIGRATION_LOCK_KEY})
        row = conn.execute(_APPLIED, params).fetchone()
        if row is not None:
            if row[0] in migration.replaces:
                conn.execute(_RERECORD, {**params, "name": migration.name, "checksum": migration.checksum})
                log.info("Recorded {}/{:03d}_{} under its edited text", namespace, migration.version, migration.name)
            elif row[0] != migration.checksum:
                log.warning(
                    "{}/{:03d}_{} changed after it was applied; migrations are append-only, add a new file instead",
                    namespace,
                    migration.version,
                    migration.name,
                )
            return False
        # The text comes from files shipped with the package, never from user input.
        conn.execute(migration.sql.encode())
        conn.execute(_RECORD, {**params, "name": migration.name, "checksum": migration.checksum})
    log.info("Applied {}/{:03d}_{}", namespace, migration.version, migration.name)
    return True


def apply_migrations(
    conn: psycopg.Connection, *, namespace: str, migrations: Iterable[Migration] | Path | Traversable
) -> list[str]:
    """Apply the migrations not yet recorded for `namespace`, in version order.

    Use it for any package that ships ``NNN_name.sql`` files. Each file runs in its own
    transaction; a failing file rolls back alone and raises, leaving earlier ones applied.

    Returns:
        The names of the migrations applied by this call (empty when up to date).

    Raises:
        MigrationError: a migration failed; the message names the file and the server's error.
    """
    if not isinstance(migrations, Iterable):
        migrations = load_migrations(migrations)
    _check_idle(conn)
    create_migrations_table(conn)
    applied: list[str] = []
    for migration in migrations:
        try:
            if _apply_one(conn, namespace, migration):
                applied.append(f"{migration.version:03d}_{migration.name}")
        except psycopg.Error as exc:
            msg = f"Migration {namespace}/{migration.version:03d}_{migration.name} failed: {exc}".strip()
            raise MigrationError(msg) from exc
    return applied


def pending_migrations(
    conn: psycopg.Connection, *, namespace: str, migrations: Iterable[Migration] | Path | Traversable
) -> list[Migration]:
    """The migrations of `namespace` that `apply_migrations` would apply, without changing anything.

    Use it to check a deployment (``migrate --check``, health checks); it needs only SELECT on the bookkeeping table.
    """
    if not isinstance(migrations, Iterable):
        migrations = load_migrations(migrations)
    applied = applied_checksums(conn, namespace)
    return [migration for migration in migrations if migration.version not in applied]


def pending_install(conn: psycopg.Connection) -> list[str]:
    """What `install` would do (PGMQ, the broker's migrations), as names, without changing anything."""
    extension, schema, _ = conn.execute(_PGMQ_STATE).fetchone() or (False, False, False)
    pending = [] if extension or schema else ["pgmq"]
    broker = pending_migrations(conn, namespace="brokers", migrations=files("brokers").joinpath("sql"))
    return pending + [f"brokers/{m.version:03d}_{m.name}" for m in broker]


def _bundled_pgmq() -> Migration:
    """The PGMQ SQL shipped in the ``pgmq`` PyPI package, as migration 1 of namespace 'pgmq'."""
    sql_dir = files("pgmq").joinpath("sql")
    version = sql_dir.joinpath("VERSION").read_text(encoding="utf-8").strip()
    return Migration(1, f"pgmq_{version.replace('.', '_')}", sql_dir.joinpath("pgmq.sql").read_text(encoding="utf-8"))


def install_pgmq(conn: psycopg.Connection) -> str:
    """Make PGMQ available in the connected database, exactly once.

    Returns:
        How PGMQ is present: ``"extension"`` (the server's extension, created here or before),
        ``"sql"`` (the bundled SQL, applied here or before) or ``"external"`` (a ``pgmq`` schema
        installed by someone else, left alone).
    """
    _check_idle(conn)
    create_migrations_table(conn)
    with conn.transaction():
        conn.execute(_LOCK, {"key": MIGRATION_LOCK_KEY})
        extension, schema, available = conn.execute(_PGMQ_STATE).fetchone() or (False, False, False)
        recorded = conn.execute(_APPLIED, {"namespace": "pgmq", "version": 1}).fetchone() is not None
        if extension:
            return "extension"
        if schema:
            return "sql" if recorded else "external"
        if available:
            conn.execute(_CREATE_EXTENSION)
            log.info("Installed PGMQ with CREATE EXTENSION")
            return "extension"
    bundled = _bundled_pgmq()
    apply_migrations(conn, namespace="pgmq", migrations=[bundled])
    log.info("Installed PGMQ from the SQL bundled in the pgmq package ({})", bundled.name)
    return "sql"


def install(conn: psycopg.Connection) -> list[str]:
    """Install PGMQ and the broker's tables (``brokers/sql``); safe to call from every deploy.

    Returns:
        The broker migrations applied by this call.
    """
    install_pgmq(conn)
    return apply_migrations(conn, namespace="brokers", migrations=files("brokers").joinpath("sql"))

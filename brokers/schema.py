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

import attrs
import psycopg
from loguru import logger
from psycopg.rows import class_row

from . import queries
from .database import fetch_scalar
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


@attrs.frozen(kw_only=True)
class _Applied:
    """One row of ``pgmq_broker.schema_migrations``, as ``queries.MIGRATION_CHECKSUMS`` reads it."""

    version: int
    checksum: str


@attrs.frozen(kw_only=True)
class _PgmqState:
    """How PGMQ is present (``queries.PGMQ_STATE``): as the server's extension, as a plain schema, or creatable."""

    extension: bool
    schema: bool
    available: bool


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
    if fetch_scalar(conn, queries.MIGRATIONS_TABLE_EXISTS) is not True:
        return {}
    with conn.cursor(row_factory=class_row(_Applied)) as cursor:
        applied = cursor.execute(queries.MIGRATION_CHECKSUMS, {"namespace": namespace}).fetchall()
    return {row.version: row.checksum for row in applied}


def _check_idle(conn: psycopg.Connection) -> None:
    # Each migration commits on its own; inside a caller's transaction it could not.
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        msg = "Migrations commit one file at a time; call them on a connection that is not inside a transaction"
        raise MigrationError(msg)


def create_migrations_table(conn: psycopg.Connection) -> None:
    """Create the bookkeeping table if it is missing (each runner here does it first)."""
    with conn.transaction():
        conn.execute(queries.MIGRATIONS_LOCK, {"key": MIGRATION_LOCK_KEY})
        conn.execute(queries.MIGRATIONS_SEE_COMMITTED_CATALOG)
        conn.execute(queries.MIGRATIONS_CREATE_TABLE)


def _apply_one(conn: psycopg.Connection, namespace: str, migration: Migration) -> bool:
    params = {"namespace": namespace, "version": migration.version}
    with conn.transaction():
        conn.execute(queries.MIGRATIONS_LOCK, {"key": MIGRATION_LOCK_KEY})
        checksum = fetch_scalar(conn, queries.MIGRATION_CHECKSUM, params)
        if checksum is not None:
            if checksum in migration.replaces:
                conn.execute(
                    queries.MIGRATION_RERECORD, {**params, "name": migration.name, "checksum": migration.checksum}
                )
                log.info("Recorded {}/{:03d}_{} under its edited text", namespace, migration.version, migration.name)
            elif checksum != migration.checksum:
                log.warning(
                    "{}/{:03d}_{} changed after it was applied; migrations are append-only, add a new file instead",
                    namespace,
                    migration.version,
                    migration.name,
                )
            return False
        # The text comes from files shipped with the package, never from user input.
        conn.execute(migration.sql.encode())
        conn.execute(queries.MIGRATION_RECORD, {**params, "name": migration.name, "checksum": migration.checksum})
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
    state = _pgmq_state(conn)
    pending = [] if state.extension or state.schema else ["pgmq"]
    broker = pending_migrations(conn, namespace="brokers", migrations=files("brokers").joinpath("sql"))
    return pending + [f"brokers/{m.version:03d}_{m.name}" for m in broker]


def _pgmq_state(conn: psycopg.Connection) -> _PgmqState:
    with conn.cursor(row_factory=class_row(_PgmqState)) as cursor:
        state = cursor.execute(queries.PGMQ_STATE).fetchone()
    return state or _PgmqState(extension=False, schema=False, available=False)


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
        conn.execute(queries.MIGRATIONS_LOCK, {"key": MIGRATION_LOCK_KEY})
        state = _pgmq_state(conn)
        recorded = fetch_scalar(conn, queries.MIGRATION_CHECKSUM, {"namespace": "pgmq", "version": 1}) is not None
        if state.extension:
            return "extension"
        if state.schema:
            return "sql" if recorded else "external"
        if state.available:
            conn.execute(queries.PGMQ_CREATE_EXTENSION)
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

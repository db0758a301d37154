"""``nova-email migrate``: PGMQ, the broker's tables, then the service's ``sql/`` migrations.

Safe to run twice and from several processes at once (see `brokers.schema`).

A database the TypeScript original wrote (its tables, but no migration of ours recorded) is adopted in place:
``sql/adopt_original.sql`` completes its tables first. Before that, the whole upgrade is tried in one transaction
that is rolled back, so a database it would fail on (rows our constraints refuse, a function that cannot be
replaced) is left exactly as it was, with the reason. `plan` is that trial on its own (``migrate --dry-run``): it
reports what the upgrade would change without changing it.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import LiteralString

import attrs
import psycopg
from loguru import logger
from psycopg import sql
from psycopg.rows import class_row

from brokers import schema
from brokers.errors import MigrationError

__all__ = [
    "ADOPTION_NAMESPACE",
    "ADOPT_SQL",
    "SQL_DIR",
    "Plan",
    "migrate",
    "needs_adoption",
    "pending_migrations",
    "plan",
]

log = logger.bind(component="Migrate")

#: The service's migrations, ``nova_email/sql/NNN_name.sql``, shipped in the package as data.
SQL_DIR = Path(__file__).resolve().parent / "sql"
#: Completes the original service's tables into ours; run once, before the migrations, on an adopted database.
ADOPT_SQL = SQL_DIR / "adopt_original.sql"
#: The functions that pause and resume triggers: the adoption uses them before the numbered migrations define them.
PAUSED_TRIGGERS_SQL = SQL_DIR / "059_paused_triggers.sql"
#: The adoption is recorded like a migration of its own, so it runs once even when several processes migrate at once.
ADOPTION_NAMESPACE = "nova_email.adoption"
#: Where the migrations' own objects live: what a plan compares before and after.
_SCHEMAS = ("public", "pgmq", "pgmq_broker")
_FUNCTION_NAME = re.compile(r"\bCREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+(?:public\.)?(\w+)\s*\(", re.IGNORECASE)

#: Does the database hold the original's tables (or ours), and PGMQ?
_STATE: LiteralString = (
    "select to_regclass('public.flux_inboxes') is not null as has_tables,"
    " to_regclass('pgmq.meta') is not null as has_pgmq"
)
#: Hand the adoption script the names of the functions our migrations define (it drops the original's versions).
_SET_ADOPT_FUNCTIONS = sql.SQL("select set_config('nova.adopt_functions', {names}, true);\n")
#: Serialise with every other migrating process (the broker's lock) for the length of the trial.
_LOCK: LiteralString = "select pg_advisory_xact_lock(%(key)s)"
#: Every object the migrations create or change, as (kind and name, definition), in the schemas they use.
_CATALOG: LiteralString = """
select 'table ' || c.oid::regclass::text as name, c.relkind::text as definition
  from pg_class c
 where c.relnamespace::regnamespace::text = any(%(schemas)s) and c.relkind in ('r', 'p', 'v', 'm', 'S')
union all
select 'column ' || a.attrelid::regclass::text || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || case when a.attnotnull then ' not null' else '' end
       || coalesce(case when a.attgenerated = 's' then ' generated as ' else ' default ' end
                   || pg_get_expr(d.adbin, d.adrelid), '')
  from pg_attribute a
  join pg_class c on c.oid = a.attrelid
  left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
 where c.relnamespace::regnamespace::text = any(%(schemas)s) and c.relkind in ('r', 'p')
   and a.attnum > 0 and not a.attisdropped
union all
select 'constraint ' || co.conrelid::regclass::text || '.' || co.conname, pg_get_constraintdef(co.oid)
  from pg_constraint co
 where co.connamespace::regnamespace::text = any(%(schemas)s) and co.conrelid <> 0
union all
select 'index ' || i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
  from pg_index i join pg_class c on c.oid = i.indexrelid
 where c.relnamespace::regnamespace::text = any(%(schemas)s)
union all
select 'function ' || p.oid::regprocedure::text, pg_get_function_result(p.oid) || ', body ' || md5(p.prosrc)
  from pg_proc p
 where p.pronamespace::regnamespace::text = any(%(schemas)s)
union all
select 'trigger ' || t.tgrelid::regclass::text || '.' || t.tgname, pg_get_triggerdef(t.oid)
  from pg_trigger t join pg_class c on c.oid = t.tgrelid
 where c.relnamespace::regnamespace::text = any(%(schemas)s) and not t.tgisinternal
"""
#: Rows inserted, updated or deleted per table by this backend's transactions whose counts are not flushed yet
#: (the current one included): read at the start and at the end of a trial, the difference is the trial's.
_ROWS_CHANGED: LiteralString = """
select relid::regclass::text as table_name, n_tup_ins as inserted, n_tup_upd as updated, n_tup_del as deleted
  from pg_stat_xact_user_tables
"""


@attrs.frozen
class _CatalogEntry:
    name: str
    definition: str


@attrs.frozen
class _RowsChanged:
    table_name: str
    inserted: int
    updated: int
    deleted: int


@attrs.frozen
class _DatabaseState:
    has_tables: bool
    has_pgmq: bool


def _state(conn: psycopg.Connection) -> _DatabaseState:
    with conn.cursor(row_factory=class_row(_DatabaseState)) as cur:
        return cur.execute(_STATE).fetchone() or _DatabaseState(has_tables=False, has_pgmq=False)


@attrs.frozen(kw_only=True)
class Plan:
    """What `migrate` would do to a database: the steps to run and, when they could be tried, their effect."""

    #: ``adopt_original`` when the original's tables would be adopted, then ``namespace/NNN_name`` per migration.
    steps: list[str]
    #: One line per object created (``+``), changed (``~``) or dropped (``-``), then one per table whose rows change.
    changes: list[str]
    #: False when PGMQ is not installed yet, so the steps could not be tried (a new, empty database).
    tried: bool = True

    def lines(self) -> list[str]:
        """The plan as text for a terminal."""
        if not self.steps:
            return ["Nothing to do: the database is up to date."]
        lines = [f"Would run: {', '.join(self.steps)}"]
        if not self.tried:
            lines.append("PGMQ is not installed yet: it would be installed first, so the steps were not tried.")
        return lines + self.changes


def needs_adoption(conn: psycopg.Connection) -> bool:
    """True for a database with the original service's tables on which no migration of ours ever ran."""
    return (
        _state(conn).has_tables
        and not schema.applied_checksums(conn, "nova_email")
        and not schema.applied_checksums(conn, ADOPTION_NAMESPACE)
    )


def _adoption(conn: psycopg.Connection, ours: list[schema.Migration]) -> schema.Migration:
    """``adopt_original.sql`` as a migration, told the names of our functions."""
    helpers = PAUSED_TRIGGERS_SQL.read_text(encoding="utf-8")
    # The helpers it creates first are ours already: step 5 must not drop them as the original's.
    names = sorted(
        {name for m in ours for name in _FUNCTION_NAME.findall(m.sql)} - set(_FUNCTION_NAME.findall(helpers))
    )
    preamble = _SET_ADOPT_FUNCTIONS.format(names=sql.Literal(",".join(names))).as_string(conn)
    return schema.Migration(1, "adopt_original", preamble + helpers + ADOPT_SQL.read_text(encoding="utf-8"))


def _catalog(conn: psycopg.Connection) -> dict[str, str]:
    with conn.cursor(row_factory=class_row(_CatalogEntry)) as cur:
        return {e.name: e.definition for e in cur.execute(_CATALOG, {"schemas": list(_SCHEMAS)})}


def _rows_changed(conn: psycopg.Connection) -> dict[str, _RowsChanged]:
    with conn.cursor(row_factory=class_row(_RowsChanged)) as cur:
        return {r.table_name: r for r in cur.execute(_ROWS_CHANGED)}


def _describe(
    before: dict[str, str], after: dict[str, str], rows_before: dict[str, _RowsChanged], rows: dict[str, _RowsChanged]
) -> list[str]:
    changes = [f"+ {name}: {after[name]}" for name in sorted(after.keys() - before.keys())]
    changes += [
        f"~ {name}: {after[name]}" for name in sorted(after.keys() & before.keys()) if before[name] != after[name]
    ]
    changes += [f"- {name}" for name in sorted(before.keys() - after.keys())]
    for table in sorted(rows):
        if f"table {table}" not in before:
            continue  # a table the trial created: its rows are part of "+ table"
        start = rows_before.get(table, _RowsChanged(table, 0, 0, 0))
        counts = [
            f"{now - then} {what}"
            for now, then, what in (
                (rows[table].inserted, start.inserted, "inserted"),
                (rows[table].updated, start.updated, "updated"),
                (rows[table].deleted, start.deleted, "deleted"),
            )
            if now > then
        ]
        if counts:
            changes.append(f"rows of {table}: {', '.join(counts)}")
    return changes


def _run_script(conn: psycopg.Connection, text: str) -> None:
    # The text comes from files shipped with the packages, never from user input.
    conn.execute(text.encode())


def plan(conn: psycopg.Connection, *, sql_dir: Path = SQL_DIR) -> Plan:
    """Try every step `migrate` would take in one transaction, report its effect, and roll it back.

    Use it before migrating a database you care about (``nova-email migrate --dry-run``). It takes the
    migration lock and the same table locks as the real run, for as long as the trial lasts.

    Raises:
        MigrationError: a step would fail; the message names it and the server's reason (for an adopted database,
            the rows to fix). Nothing was changed.
    """
    ours = schema.load_migrations(sql_dir)
    broker = schema.load_migrations(files("brokers").joinpath("sql"))
    adopting = needs_adoption(conn)
    pending = [("brokers", m) for m in schema.pending_migrations(conn, namespace="brokers", migrations=broker)]
    pending += [("nova_email", m) for m in schema.pending_migrations(conn, namespace="nova_email", migrations=ours)]
    steps = (["adopt_original"] if adopting else []) + [f"{ns}/{m.version:03d}_{m.name}" for ns, m in pending]
    if not steps or not _state(conn).has_pgmq:
        conn.rollback()
        return Plan(steps=steps, changes=[], tried=not steps)
    step = "adopt_original"
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(_LOCK, {"key": schema.MIGRATION_LOCK_KEY})
            schema.create_migrations_table(conn)
            before = _catalog(conn)
            rows_before = _rows_changed(conn)
            if adopting:
                _run_script(conn, _adoption(conn, ours).sql)
            for namespace, migration in pending:
                step = f"{namespace}/{migration.version:03d}_{migration.name}"
                _run_script(conn, migration.sql)
            after = _catalog(conn)
            rows = _rows_changed(conn)
    except psycopg.Error as exc:
        msg = f"Migration {step} would fail, so nothing was changed: {exc.diag.message_primary or exc}"
        raise MigrationError(msg) from exc
    finally:
        conn.rollback()
    return Plan(steps=steps, changes=_describe(before, after, rows_before, rows))


def _adopt(conn: psycopg.Connection, sql_dir: Path) -> bool:
    # Recorded, under the migration lock: a second process migrating at the same time finds it done.
    adoption = _adoption(conn, schema.load_migrations(sql_dir))
    if not schema.apply_migrations(conn, namespace=ADOPTION_NAMESPACE, migrations=[adoption]):
        return False
    log.info("Adopted the original service's tables: columns, keys and values completed, its old functions replaced")
    return True


def migrate(conn: psycopg.Connection, *, sql_dir: Path = SQL_DIR) -> list[str]:
    """Bring the database up to date; returns the names of the steps applied now.

    Raises:
        MigrationError: a migration failed. On a database being adopted, nothing was changed (see `plan`).
    """
    applied: list[str] = []
    adopting = needs_adoption(conn)
    conn.rollback()  # the migrations commit one by one, from an idle connection
    if adopting:
        trial = plan(conn, sql_dir=sql_dir)
        log.info("Adopting a database of the original service: {} change(s) tried and found safe", len(trial.changes))
        if _adopt(conn, sql_dir):
            applied.append("adopt_original")
    applied += schema.install(conn)
    applied += schema.apply_migrations(conn, namespace="nova_email", migrations=sql_dir)
    if applied:
        log.info("Database migrated: {} migration(s) applied", len(applied))
    else:
        log.info("Database already up to date")
    return applied


def pending_migrations(conn: psycopg.Connection, *, sql_dir: Path = SQL_DIR) -> list[str]:
    """What `migrate` would apply (an adoption, PGMQ, the broker's and the service's migrations), as names; changes
    nothing."""
    pending = (["adopt_original"] if needs_adoption(conn) else []) + schema.pending_install(conn)
    service = schema.pending_migrations(conn, namespace="nova_email", migrations=sql_dir)
    return pending + [f"nova_email/{m.version:03d}_{m.name}" for m in service]

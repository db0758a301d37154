"""The migration runner: idempotent, safe under concurrency, and PGMQ installed exactly once."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import psycopg
import pytest

from brokers import schema
from brokers.errors import MigrationError
from nova_email.db import with_database
from nova_email.migrate import migrate
from tests.conftest import server_url

#: A schema fingerprint: every table and function the migrations create, with their definitions.
_FINGERPRINT = """
select string_agg(item, E'\n' order by item) from (
  select format('table %s.%s', table_schema, table_name) as item
  from information_schema.tables where table_schema in ('public', 'pgmq', 'pgmq_broker')
  union all
  select format('function %s.%s(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname in ('public', 'pgmq', 'pgmq_broker')
) items
"""


@pytest.fixture
def empty_db_url() -> Iterator[str]:
    """A brand-new, empty database on the test server."""
    admin_url = server_url()
    name = f"nova_empty_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    yield with_database(admin_url, name)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'drop database if exists "{name}" with (force)')


def fingerprint(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute(_FINGERPRINT).fetchone()
        assert row is not None
        return str(row[0])


def test_migrate_twice_applies_everything_once_and_then_nothing(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url) as conn:
        first = migrate(conn)
    before = fingerprint(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        second = migrate(conn)
        recorded = conn.execute(
            "select namespace, count(*) from pgmq_broker.schema_migrations group by namespace order by namespace"
        ).fetchall()

    assert first, "a new database needs migrations"
    assert second == []
    assert fingerprint(empty_db_url) == before
    assert ("pgmq", 1) in recorded


def test_concurrent_migrations_serialise_and_apply_each_file_once(empty_db_url: str) -> None:
    # Given four processes' worth of connections migrating the same empty database at once
    results: list[list[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run() -> None:
        try:
            with psycopg.connect(empty_db_url) as conn:
                start.wait()
                results.append(migrate(conn))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    # Then nobody failed and every migration was applied by exactly one of them
    assert errors == []
    applied = [name for result in results for name in result]
    assert len(applied) == len(set(applied))
    with psycopg.connect(empty_db_url) as conn:
        total = conn.execute("select count(*) from pgmq_broker.schema_migrations").fetchone()
    assert total is not None and total[0] == len(applied) + 1  # + the PGMQ install, not in migrate()'s list


def test_a_failing_migration_names_its_file_and_keeps_earlier_ones(empty_db_url: str, tmp_path: Path) -> None:
    (tmp_path / "001_good.sql").write_text("create table good (id int);")
    (tmp_path / "002_bad.sql").write_text("create table bad (id int); select no_such_function();")
    with psycopg.connect(empty_db_url) as conn:
        with pytest.raises(MigrationError, match=r"demo/002_bad failed"):
            schema.apply_migrations(conn, namespace="demo", migrations=tmp_path)
        assert conn.execute("select to_regclass('good') is not null, to_regclass('bad') is null").fetchone() == (
            True,
            True,
        )


def test_two_files_with_one_version_are_refused(tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("select 1;")
    (tmp_path / "001_b.sql").write_text("select 1;")
    with pytest.raises(MigrationError, match="share version 1"):
        schema.load_migrations(tmp_path)


@pytest.fixture
def pgmq_extension_files(empty_db_url: str) -> Iterator[None]:
    """PGMQ's bundled SQL placed where the server looks for extensions, as a packaged PGMQ would be; removed after."""
    with psycopg.connect(empty_db_url) as conn:
        row = conn.execute("select setting from pg_config where name = 'SHAREDIR'").fetchone()
    assert row is not None
    extension_dir = Path(row[0]) / "extension"
    sql_dir = files("pgmq").joinpath("sql")
    version = sql_dir.joinpath("VERSION").read_text().strip()
    control, script = extension_dir / "pgmq.control", extension_dir / f"pgmq--{version}.sql"
    try:
        control.write_text(
            f"comment = 'PGMQ (test install)'\ndefault_version = '{version}'\nrelocatable = false\nschema = pgmq\n"
        )
        script.write_text(sql_dir.joinpath("pgmq.sql").read_text())
    except PermissionError:
        pytest.fail(
            f"This test installs PGMQ as an extension into {extension_dir}; run it as a user who can write there"
        )
    yield
    control.unlink(missing_ok=True)
    script.unlink(missing_ok=True)


def test_a_database_with_the_pgmq_extension_keeps_it(empty_db_url: str, pgmq_extension_files: None) -> None:
    # Given a database where PGMQ was installed as an extension (as on Supabase)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("create extension pgmq")

    # When we migrate, twice
    with psycopg.connect(empty_db_url) as conn:
        migrate(conn)
        migrate(conn)
        how = schema.install_pgmq(conn)
        bundled_rows = conn.execute("select count(*) from pgmq_broker.schema_migrations where namespace = 'pgmq'")
        bundled = bundled_rows.fetchone()
        conn.execute("select pgmq.create('ext_check')")
        sent = conn.execute("select pgmq.send('ext_check', '{\"ok\": true}')").fetchone()

    # Then the extension is used and the bundled SQL never ran
    assert how == "extension"
    assert bundled == (0,)
    assert sent is not None


def test_a_server_that_offers_the_extension_gets_create_extension(
    empty_db_url: str, pgmq_extension_files: None
) -> None:
    with psycopg.connect(empty_db_url) as conn:
        assert schema.install_pgmq(conn) == "extension"
        assert schema.install_pgmq(conn) == "extension"
        extension = conn.execute("select count(*) from pg_extension where extname = 'pgmq'").fetchone()
    assert extension == (1,)


def test_a_server_without_the_extension_gets_the_bundled_sql(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        available = conn.execute("select count(*) from pg_available_extensions where name = 'pgmq'").fetchone()
        assert available == (0,), "this server ships PGMQ; the bundled-SQL path cannot be checked here"
        assert schema.install_pgmq(conn) == "sql"
        assert schema.install_pgmq(conn) == "sql"
        extension = conn.execute("select count(*) from pg_extension where extname = 'pgmq'").fetchone()
    assert extension == (0,)

"""Test-wide fixtures: one fresh, fully migrated database per test run on a real PostgreSQL.

The server is NOVA_TEST_DATABASE_URL's (a postgresql:// URL; CI points it at the machine's
PostgreSQL 15) or, when unset, the project's embedded server. Nothing on the database side is
mocked. Tests that use `db_url` or `conn` get every table emptied after them.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings as hypothesis_settings

from nova_email.config import Settings
from nova_email.db import with_database
from nova_email.embedded import embedded_server_url
from nova_email.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent

hypothesis_settings.register_profile("fast", max_examples=25, deadline=None)
hypothesis_settings.register_profile("thorough", max_examples=300, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

#: Tables emptied after each database test: the service's, the broker's, and PGMQ's queues and archives (not
#: the bookkeeping that migrations write: applied migrations, and which queues are in fairness mode).
_TABLES_TO_EMPTY = r"""
select format('%I.%I', schemaname, tablename) from pg_tables
where (schemaname in ('public', 'pgmq_broker') and tablename not in ('schema_migrations', 'fair_queues'))
   or (schemaname = 'pgmq' and (tablename like 'q\_%' or tablename like 'a\_%'))
"""


def server_url() -> str:
    """The test server's URL (maintenance database)."""
    url = os.environ.get("NOVA_TEST_DATABASE_URL")
    if url:
        return url
    return embedded_server_url(ROOT / ".nova")


@pytest.fixture(scope="session")
def db_url() -> Iterator[str]:
    """A database created and migrated for this test run, dropped at the end."""
    admin_url = server_url()
    name = f"nova_test_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        admin = psycopg.connect(admin_url, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"Cannot reach the test PostgreSQL ({exc}). Start the local server with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, or unset "
            "NOVA_TEST_DATABASE_URL to use the embedded one."
        )
    with admin:
        admin.execute(f'create database "{name}"')  # name built above from digits and hex only
    url = with_database(admin_url, name)
    with psycopg.connect(url) as conn:
        migrate(conn)
    yield url
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def empty_db_url() -> Iterator[str]:
    """A database of this test with nothing in it yet (not migrated), dropped after it."""
    admin_url = server_url()
    name = f"nova_empty_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')  # name built above from digits and hex only
    yield with_database(admin_url, name)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(autouse=True)
def _empty_tables_after_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "db_url" not in request.fixturenames:
        return
    empty_tables(request.getfixturevalue("db_url"))


def empty_tables(url: str, attempts: int = 20) -> None:
    """Truncate every table, retrying while workers a module keeps running hold row locks in another order.

    TRUNCATE takes its exclusive locks table by table; a live worker's transaction that already holds one of them
    and waits on another is a deadlock Postgres resolves by cancelling one side. When that side is ours, try again.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [row[0] for row in conn.execute(_TABLES_TO_EMPTY)]
        if not tables:
            return
        statement = f"truncate {', '.join(tables)} restart identity cascade"  # names quoted by format(%I)
        for attempt in range(1, attempts + 1):
            try:
                conn.execute("set lock_timeout = '2s'")
                conn.execute(statement)
                return
            except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable):
                if attempt == attempts:
                    raise
                time.sleep(0.05 * attempt)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test database."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    """Settings pointing at the test database, with the original's delays turned off."""
    return Settings(
        database_url=db_url,
        thread_delay_ms=0,
        message_delay_ms=0,
        api_delay_ms=0,
        data_dir=tmp_path / ".nova",
        nylas_api_key="test-key",
    )

"""A database as the TypeScript original left it, built fresh for each test from ``original_*.sql``."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import psycopg
import pytest
from loguru import logger

from nova_email.db import with_database
from nova_email.migrate import migrate
from tests.conftest import server_url

HERE = Path(__file__).resolve().parent
#: The original's tables, queues, functions and triggers, rebuilt from its documents.
ORIGINAL_SCHEMA = HERE / "original_schema.sql"
#: A little of its history: inboxes, a completed backfill, threads, messages, webhook audit rows.
ORIGINAL_DATA = HERE / "original_data.sql"
#: The seven tables and the primary key that identifies a row of each.
TABLES = {
    "flux_inboxes": "id",
    "flux_inbox_configurations": "id",
    "flux_email_threads": "id",
    "flux_email_messages": "id",
    "flux_webhook_notifications": "id",
    "inbox_sync_stats": "config_id",
    "queued_threads": "id",
}


@contextmanager
def _new_database() -> Iterator[str]:
    admin_url = server_url()
    name = f"nova_adopt_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')  # name built above from digits and hex only
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def empty_url() -> Iterator[str]:
    """A new, empty database, dropped after the test."""
    with _new_database() as url:
        yield url


@pytest.fixture
def new_db() -> Iterator[psycopg.Connection]:
    """A connection to a database just migrated, that no other test touches (the schema to compare with)."""
    with _new_database() as url, psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        yield conn


@pytest.fixture
def original_url(empty_url: str) -> str:
    """A new database with PGMQ and the original service's schema and rows; no migration of ours ran on it."""
    url = empty_url
    with psycopg.connect(url, autocommit=True) as conn:
        # PGMQ installed by someone else, unknown to our migration records: the release our package bundles (a
        # Supabase project may run an older one: test_migrate_adopts covers one without insert notifications).
        conn.execute(files("pgmq").joinpath("sql", "pgmq.sql").read_bytes())
        conn.execute(ORIGINAL_SCHEMA.read_bytes())
        conn.execute(ORIGINAL_DATA.read_bytes())
    return url


@pytest.fixture
def original(original_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the original's database."""
    with psycopg.connect(original_url, autocommit=True) as connection:
        yield connection


@contextmanager
def logged_warnings() -> Iterator[list[str]]:
    """The log records at WARNING or above while the block runs."""
    records: list[str] = []
    sink = logger.add(lambda m: records.append(str(m)), level="WARNING")
    try:
        yield records
    finally:
        logger.remove(sink)

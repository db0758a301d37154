"""A database our own earlier version migrated upgrades to exactly the schema a new one gets, with no warning."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg

from brokers import schema
from nova_email.migrate import SQL_DIR, migrate
from tests.adopt.conftest import logged_warnings
from tests.adopt.test_migrate_adopts import catalog


def earlier_tables_sql(text: str) -> str:
    """001_tables.sql as it was first released, rebuilt from today's text."""
    text = re.sub(r"^-- (Every statement|adopt_original.sql|Its first text|replaces:).*\n", "", text, flags=re.M)
    for now, then in (
        ("CREATE TABLE IF NOT EXISTS ", "CREATE TABLE "),
        ("CREATE INDEX IF NOT EXISTS ", "CREATE INDEX "),
        ("CREATE OR REPLACE TRIGGER ", "CREATE TRIGGER "),
    ):
        text = text.replace(now, then)
    return text


def test_a_database_migrated_before_adoption_existed_upgrades_to_the_new_schema(
    empty_url: str, new_db: psycopg.Connection, tmp_path: Path
) -> None:
    # Given a database migrated by the release before this one: 001_tables.sql's first text, no 06x migration
    [tables] = [m for m in schema.load_migrations(SQL_DIR) if m.name == "tables"]
    earlier = earlier_tables_sql(tables.sql)
    assert schema.Migration(1, "tables", earlier).checksum in tables.replaces  # the rebuilt text is the released one
    for migration in schema.load_migrations(SQL_DIR):
        if not 60 <= migration.version <= 69:
            text = earlier if migration.version == 1 else migration.sql
            (tmp_path / f"{migration.version:03d}_{migration.name}.sql").write_text(text, encoding="utf-8")
    with psycopg.connect(empty_url, autocommit=True) as old:
        migrate(old, sql_dir=tmp_path)

        # When today's migrate runs on it
        with logged_warnings() as warnings:
            applied = migrate(old)

        # Then only the new migrations ran, nothing was warned about, and the schema is a new database's
        assert applied == [
            f"{m.version:03d}_{m.name}" for m in schema.load_migrations(SQL_DIR) if 60 <= m.version <= 69
        ]
        assert warnings == []
        assert catalog(old) == catalog(new_db)

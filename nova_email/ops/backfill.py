"""``nova-email backfill start|progress|retry``: start a backfill, watch it, re-queue a failed or stuck one.

Every change goes through the SQL API a user or another service would call (``queue_inbox_backfill``,
``record_backfill_failure``), so the command line can do nothing the SQL path cannot.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import TextIO

import psycopg
from psycopg import errors
from psycopg.rows import dict_row

from .. import queries as service_queries
from ..config import Settings
from . import queries
from .connection import command_connection
from .progress import BackfillProgress, fetch_progress, render_progress_line

__all__ = [
    "EXIT_FAILED",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "add_backfill_arguments",
    "queue_backfill",
    "retry_backfill",
    "run_backfill",
    "watch_progress",
]

#: Exit status of ``progress`` when the backfill failed, and of a refused ``start``/``retry``.
EXIT_FAILED = 1
#: Exit status of a bad argument (unknown inbox or config).
EXIT_USAGE = 2
#: Exit status of ``progress`` when ``--timeout`` passed first (as ``timeout(1)``).
EXIT_TIMEOUT = 124
#: Seconds between two refreshes of the progress bar.
DEFAULT_INTERVAL_S = 1.0


def _error(message: str) -> None:
    print(f"nova-email backfill: {message}", file=sys.stderr)


def _inbox_id(conn: psycopg.Connection, ref: str) -> uuid.UUID | None:
    """The inbox named by `ref` (id, e-mail address or grant id), or None when none or several match."""
    rows = conn.execute(queries.FIND_INBOX, {"ref": ref}).fetchall()
    ids = {row[0] for row in rows}
    return rows[0][0] if len(ids) == 1 else None


def queue_backfill(
    conn: psycopg.Connection,
    inbox_id: uuid.UUID | str,
    *,
    config_id: uuid.UUID | str | None = None,
    start_date: datetime | None = None,
    end_date: datetime | None = None,
) -> tuple[uuid.UUID, int]:
    """Queue a backfill through ``queue_inbox_backfill``; returns the config id and the job's PGMQ id.

    Raises:
        psycopg.errors.ObjectNotInPrerequisiteState: a backfill of this inbox is already active.
        psycopg.errors.NoDataFound: no such inbox or configuration.
        psycopg.errors.InvalidParameterValue: the window ends before it starts.
    """
    row = conn.execute(
        service_queries.QUEUE_INBOX_BACKFILL,
        {
            "inbox_id": str(inbox_id),
            "config_id": None if config_id is None else str(config_id),
            "start_date": start_date,
            "end_date": end_date,
        },
    ).fetchone()
    assert row is not None  # the function returns one row or raises
    return row[0], row[1]


def retry_backfill(
    conn: psycopg.Connection, config_id: uuid.UUID | str, *, force: bool = False
) -> tuple[uuid.UUID, int]:
    """Re-queue a configuration's backfill over the same window, so a failed run resumes from its checkpoint.

    With `force`, an active (stuck) backfill is first marked failed with an operator note in its error
    history; both steps happen in one transaction.

    Raises:
        psycopg.errors.NoDataFound: no such configuration.
        psycopg.errors.ObjectNotInPrerequisiteState: the backfill is active and `force` is off.
    """
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        config = cur.execute(queries.GET_CONFIG_FOR_RETRY, {"config_id": str(config_id)}).fetchone()
        if config is None:
            msg = f"no backfill configuration {str(config_id)!r}; list active ones with `nova-email status`"
            raise errors.NoDataFound(msg)
        if force and config["backfill_status"] in queries.ACTIVE_BACKFILL_STATUSES:
            note = f"retry forced by an operator while {config['backfill_status']}"
            cur.execute(queries.RECORD_BACKFILL_FAILURE, {"config_id": config["id"], "error": note})
        return queue_backfill(
            conn,
            config["inbox_id"],
            config_id=config["id"],
            start_date=config["backfill_start_date"],
            end_date=config["backfill_end_date"],
        )


def watch_progress(
    connect: Callable[[], AbstractContextManager[psycopg.Connection]],
    config_id: uuid.UUID | str,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    timeout_s: float | None = None,
    out: TextIO,
    live: bool = False,
) -> int:
    """Print a progress bar until the backfill completes (0), fails (1) or `timeout_s` passes (124).

    `live` redraws one line in place (a terminal); otherwise a line is printed whenever the numbers change.
    Each refresh opens a short-lived connection from `connect`, so no transaction stays open while watching.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_line = ""
    progress: BackfillProgress | None = None
    while True:
        with connect() as conn:
            rows = fetch_progress(conn, [config_id])
        if not rows:
            _error(f"no backfill configuration {str(config_id)!r}")
            return EXIT_USAGE
        progress = rows[0]
        line = render_progress_line(progress)
        if live:
            out.write("\r" + line.ljust(len(last_line)))
        elif line != last_line:
            out.write(line + "\n")
        out.flush()
        last_line = line
        if progress.finished or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(interval_s if deadline is None else max(0.0, min(interval_s, deadline - time.monotonic())))
    if live:
        out.write("\n")
    if progress.backfill_status == "completed":
        out.write(f"Backfill {progress.config_id} completed: {progress.threads_completed} threads, ")
        out.write(f"{progress.threads_failed} failed, {progress.messages_synced} messages.\n")
        return 0
    if progress.backfill_status == "failed":
        out.write(f"Backfill {progress.config_id} failed: {progress.last_error or 'no error recorded'}\n")
        out.write(f"Resume it from its checkpoint with: nova-email backfill retry {progress.config_id}\n")
        return EXIT_FAILED
    out.write(f"Timed out after {timeout_s:g} s; the backfill is still {progress.backfill_status}.\n")
    return EXIT_TIMEOUT


def _datetime(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        msg = f"{value!r} is not an ISO 8601 date or time, e.g. 2026-01-31 or 2026-01-31T12:00:00+00:00"
        raise argparse.ArgumentTypeError(msg) from None
    # A date without a zone means UTC: the server's time zone must not change the window.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def add_backfill_arguments(parser: argparse.ArgumentParser) -> None:
    """Subcommands of ``nova-email backfill``: ``start``, ``progress`` and ``retry``."""
    sub = parser.add_subparsers(dest="backfill_command", required=True, metavar="ACTION")
    start = sub.add_parser("start", help="queue a backfill of an inbox (id, e-mail address or grant id)")
    start.add_argument("inbox", help="the inbox: its id, e-mail address or Nylas grant id")
    start.add_argument("--start", type=_datetime, help="window start (default: end - 365 days)")
    start.add_argument("--end", type=_datetime, help="window end (default: now)")
    start.add_argument("--follow", action="store_true", help="then show progress until it finishes")
    _add_watch_options(start)
    progress = sub.add_parser("progress", help="show a live progress bar until the backfill completes or fails")
    progress.add_argument("config", help="the backfill's configuration id")
    _add_watch_options(progress)
    retry = sub.add_parser("retry", help="re-queue a failed backfill (same window: it resumes from its checkpoint)")
    retry.add_argument("config", help="the backfill's configuration id")
    retry.add_argument("--force", action="store_true", help="also re-queue an active (stuck) backfill")
    retry.add_argument("--follow", action="store_true", help="then show progress until it finishes")
    _add_watch_options(retry)


def _add_watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="SECONDS", help="refresh period")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long")


def run_backfill(settings: Settings, args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Run ``nova-email backfill <action>``; exit 0 on success, 1 when refused or failed, 2 on a bad argument."""
    out = out or sys.stdout
    config_id: uuid.UUID | str
    try:
        with command_connection(settings) as conn:
            if args.backfill_command == "start":
                inbox_id = _inbox_id(conn, args.inbox)
                if inbox_id is None:
                    _error(f"no single inbox has the id, e-mail address or grant id {args.inbox!r}")
                    return EXIT_USAGE
                config_id, msg_id = queue_backfill(conn, inbox_id, start_date=args.start, end_date=args.end)
                out.write(f"Queued backfill {config_id} of inbox {inbox_id} (job {msg_id}).\n")
            elif args.backfill_command == "retry":
                config_id, msg_id = retry_backfill(conn, _uuid(args.config), force=args.force)
                out.write(f"Re-queued backfill {config_id} (job {msg_id}); it resumes from its checkpoint.\n")
            else:
                config_id = _uuid(args.config)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except errors.NoDataFound as exc:
        _error(exc.diag.message_primary or str(exc))
        return EXIT_USAGE
    except (errors.ObjectNotInPrerequisiteState, errors.InvalidParameterValue) as exc:
        hint = " (re-queue a stuck one with --force)" if args.backfill_command == "retry" else ""
        _error(f"{exc.diag.message_primary or exc}{hint}")
        return EXIT_FAILED
    if args.backfill_command != "progress" and not args.follow:
        return 0
    return watch_progress(
        lambda: command_connection(settings),
        config_id,
        interval_s=args.interval,
        timeout_s=args.timeout,
        out=out,
        live=out.isatty(),
    )


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        msg = f"{value!r} is not a configuration id (a UUID, as printed by `backfill start` and `status`)"
        raise ValueError(msg) from None

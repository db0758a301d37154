"""``make demo``: the whole service on one machine, in under a minute, with nothing configured.

It starts the embedded PostgreSQL (or uses the one running), migrates a fresh ``nova_demo`` database, serves a
generated mailbox from the Nylas simulator, starts all four processors as real ``dramatiq``
worker processes, queues a backfill through the same SQL function any user would call, draws a
live progress bar from ``inbox_sync_stats``, sends a few webhooks mid-run (a new message, a
read-state change, a reply) and prints a summary. Everything it started is stopped at the end,
and on Ctrl-C: the workers, the simulator, and the embedded server unless it was already running.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import psycopg
from loguru import logger

from . import queries
from .config import Settings
from .db import with_database
from .embedded import embedded_server_running, embedded_server_url, stop_embedded_server
from .migrate import migrate
from .ops.progress import fetch_progress, render_progress_line

__all__ = ["DemoSummary", "add_demo_arguments", "run_demo"]

log = logger.bind(component="Demo")

GRANT = "demo-grant"
_ROOT = Path(__file__).resolve().parent.parent


@attrs.frozen(kw_only=True)
class DemoSummary:
    """What the demo did, for the closing summary (and the test)."""

    threads: int
    messages: int
    api_calls: int
    webhooks_processed: int
    seconds: float
    status: str


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1000, help="threads in the generated mailbox (default 1000)")
    parser.add_argument("--processes", type=int, default=2, help="dramatiq worker processes (default 2)")
    parser.add_argument("--worker-threads", type=int, default=8, help="threads per worker process (default 8)")
    parser.add_argument("--database", default="nova_demo", help="database created afresh for the demo")
    parser.add_argument(
        "--server-url",
        default=None,
        help="PostgreSQL server to create the demo database on (default: the embedded server)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="give up after this many seconds")


def _fresh_database(server_url: str, name: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(queries.DROP_DATABASE.format(name=psycopg.sql.Identifier(name)))
        admin.execute(queries.CREATE_DATABASE.format(name=psycopg.sql.Identifier(name)))
    return with_database(server_url, name)


def _send_webhooks(simulator: Any) -> None:
    """A new message, a read-state change and a reply, each delivered as Nylas would (through the SQL intake)."""
    grant = simulator.grants[GRANT]
    thread_id = next(iter(grant.threads))
    simulator.add_message(GRANT, subject="Hello from the demo")
    unread = next((m for m in grant.messages.values() if m.unread), None)
    if unread is not None:
        simulator.mark_read(GRANT, unread.id)
    simulator.add_message(GRANT, thread_id=thread_id)


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (0 when the backfill completed)."""
    summary = demo(settings, args)
    print(
        f"\n\nDemo {summary.status} in {summary.seconds:.1f} s: {summary.threads} threads and {summary.messages} "
        f"messages synced, {summary.api_calls} Nylas API calls "
        f"({1000 * summary.api_calls / max(summary.messages, 1):.0f} per 1,000 messages), "
        f"{summary.webhooks_processed} webhooks processed."
    )
    return 0 if summary.status == "completed" else 1


def demo(settings: Settings, args: argparse.Namespace) -> DemoSummary:
    """Start everything, backfill the generated mailbox, and stop everything; see the module docstring."""
    own_server = args.server_url is None and not embedded_server_running(settings.data_dir)
    try:
        server_url = args.server_url or embedded_server_url(settings.data_dir)
        return _demo(settings, args, server_url)
    finally:
        if own_server and stop_embedded_server(settings.data_dir):
            print(f"Stopped the embedded PostgreSQL the demo started ({settings.data_dir / 'pgdata'})")


def _demo(settings: Settings, args: argparse.Namespace, server_url: str) -> DemoSummary:
    from .simulator.server import start_in_thread
    from .simulator.webhooks import SqlIntakeEmitter

    url = _fresh_database(server_url, args.database)
    with psycopg.connect(url) as conn:
        migrate(conn)
    nylas = start_in_thread(seed=42, grants=[GRANT], threads_per_grant=args.threads, emitter=SqlIntakeEmitter(url))
    log_path = settings.data_dir / "demo-workers.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "NYLAS_API_URI": nylas.base_url,
        "NYLAS_API_KEY": "demo",
        # The simulator has no provider behind it: let the demo go as fast as the machine allows.
        "NYLAS_GRANT_RATE": "1000",
        "NYLAS_GRANT_BURST": "100",
        "COMPLETION_CHECK_INTERVAL_MS": "1000",
        "POLL_INTERVAL_MS": "500",
        "LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "dramatiq", "nova_email.actors", "--processes", str(args.processes),
               "--threads", str(args.worker_threads)]  # fmt: skip
    print(f"Nylas simulator: {nylas.base_url} ({args.threads} threads); workers log to {log_path}")
    started = time.monotonic()
    with log_path.open("ab") as worker_log:
        workers = subprocess.Popen(command, env=env, stdout=worker_log, stderr=subprocess.STDOUT, cwd=_ROOT,
                                   start_new_session=True)  # fmt: skip
        try:
            return _drive(url, nylas, args, started)
        finally:
            if workers.poll() is None:
                workers.send_signal(signal.SIGTERM)  # dramatiq forwards it to its worker processes
                try:
                    workers.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(workers.pid, signal.SIGKILL)
            nylas.stop()


def _drive(url: str, nylas: Any, args: argparse.Namespace, started: float) -> DemoSummary:
    with psycopg.connect(url, autocommit=True) as conn:
        inbox_id = conn.execute(queries.DEMO_CREATE_INBOX, {"grant_id": GRANT}).fetchone()[0]  # type: ignore[index]
        end = datetime.fromtimestamp(nylas.simulator.anchor, UTC) + timedelta(days=1)
        config_id = conn.execute(
            queries.QUEUE_INBOX_BACKFILL,
            {"inbox_id": inbox_id, "config_id": None, "start_date": None, "end_date": end},  # fmt: skip
        ).fetchone()[0]  # type: ignore[index]
        sent_webhooks = False
        deadline = started + args.timeout
        # On a terminal the bar redraws in place; in a log (CI) it prints a line every couple of seconds.
        live, last_print = sys.stdout.isatty(), 0.0
        while True:
            progress = fetch_progress(conn, [config_id])[0]
            line = render_progress_line(progress)
            if live:
                sys.stdout.write(f"\r{line}   ")
                sys.stdout.flush()
            elif time.monotonic() - last_print >= 2:
                print(line, flush=True)
                last_print = time.monotonic()
            if not sent_webhooks and progress.threads_total and progress.threads_done >= progress.threads_total // 3:
                _send_webhooks(nylas.simulator)
                sent_webhooks = True
            open_webhooks = conn.execute(queries.DEMO_OPEN_WEBHOOKS).fetchone()
            if progress.finished and sent_webhooks and open_webhooks == (0,):
                break
            if progress.finished and not sent_webhooks:
                _send_webhooks(nylas.simulator)
                sent_webhooks = True
            if time.monotonic() > deadline:
                log.error("The demo did not finish within {} s; see the workers' log", args.timeout)
                break
            time.sleep(0.25)
        if not live:
            print(line, flush=True)
        totals = conn.execute(queries.DEMO_TOTALS, {"inbox_id": inbox_id}).fetchone()
    assert totals is not None
    return DemoSummary(
        threads=totals[0],
        messages=totals[1],
        api_calls=sum(nylas.simulator.calls.snapshot().values()),
        webhooks_processed=totals[2],
        seconds=time.monotonic() - started,
        status=progress.backfill_status,
    )

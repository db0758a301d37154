"""The ``nova-email`` console script.

Each subcommand is a small function that loads the settings, sets up logging and calls into the
package. Errors the user can fix (configuration, database) end the command with one clear line
and exit status 2 (``healthcheck``: 1), not a traceback; a database error raised anywhere in a command is one of them. Such a line
never shows a configured secret (`nova_email.masking`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import psycopg
from loguru import logger

from .config import Settings, load_settings, redact_url
from .errors import NovaError
from .log import setup_logging
from .masking import command_error
from .processors import PROCESSORS

__all__ = ["main"]

log = logger.bind(component="CLI")

Command = Callable[[Settings, argparse.Namespace], int]


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from brokers.errors import MigrationError

    from . import db
    from .errors import DatabaseError
    from .migrate import migrate, pending_migrations, plan

    with db.connect(settings) as conn:
        try:
            if args.dry_run:
                print("\n".join(plan(conn).lines()))
                return 0
            if not args.check:
                migrate(conn)
                return 0
        except MigrationError as exc:
            raise DatabaseError(str(exc)) from exc
        pending = pending_migrations(conn)
    if pending:
        print(f"{len(pending)} migration(s) pending: {', '.join(pending)}; run nova-email migrate")
        return 1
    print("Database schema is current")
    return 0


def _db_url(settings: Settings, args: argparse.Namespace) -> int:
    from . import db

    url = db.database_url(settings)
    print(url if args.show_password else redact_url(url))
    return 0


def _db_stop(settings: Settings, args: argparse.Namespace) -> int:
    from .embedded import stop_embedded_server

    stopped = stop_embedded_server(settings.data_dir)
    log.info("Embedded PostgreSQL {}", "stopped" if stopped else "was not running")
    return 0


def worker_arguments(name: str, extra: Sequence[str] = ()) -> list[str]:
    """The ``dramatiq`` arguments that run processor `name` (or ``all``)."""
    return ["nova_email.actors", "--queues", *PROCESSORS[name], *extra]


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    from . import db
    from .boot import require_nylas_key

    require_nylas_key(settings, PROCESSORS[args.processor])
    # Here, before Dramatiq forks: a missing DATABASE_URL in an installed package is one line, not a traceback
    # from every worker. In the source checkout the embedded server starts once, here, instead of in each worker.
    db.database_url(settings)
    arguments = worker_arguments(args.processor, args.dramatiq_args)
    log.info("Starting {} processor: dramatiq {}", args.processor, " ".join(arguments))
    # Dramatiq's main process runs here rather than exec'd: its logging.basicConfig() does nothing once this
    # process's root logger has a handler, so its own lines (start-up, signals, worker exits) go through the sink
    # set up above, JSON included. Its signal handling (graceful SIGTERM/SIGINT) applies to this process.
    parsed = make_argument_parser().parse_args(arguments)  # type: ignore[no-untyped-call]
    return int(dramatiq_main(parsed) or 0)  # type: ignore[no-untyped-call]


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(settings, args)


#: Commands whose every failure (a mistaken command line, a malformed setting, a database error) exits 1: probes,
#: since Docker reserves 2. Other commands fail with 2.
PROBES = frozenset({"healthcheck"})


class _CommandLineParser(argparse.ArgumentParser):
    """Reports a mistaken command line in one line, pointing at the command's help; a probe's exits 1, others 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split()[1:2]
        self.exit(
            _failure_status(command[0] if command else None),
            f"{self.prog}: error: {message} (see {self.prog} --help)\n",
        )


def _failure_status(command: str | None) -> int:
    return 1 if command in PROBES else 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subparser per command."""
    parser = _CommandLineParser(prog="nova-email", description="Nova Email: Nylas mailboxes synced into Postgres.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(func=func)
        return command

    migrate = add("migrate", _migrate, "install PGMQ and apply every migration (safe to run again)")
    migrate.add_argument(
        "--check", action="store_true", help="apply nothing; exit 1 when migrations are pending (for deploy scripts)"
    )
    migrate.add_argument(
        "--dry-run",
        action="store_true",
        help="print what migrating would change (tried, then rolled back), change nothing",
    )
    db_url = add(
        "db-url", _db_url, "print the database URL in use, password hidden (starts the embedded server if needed)"
    )
    db_url.add_argument(
        "--show-password", action="store_true", help="print the password too, for scripts that connect with the URL"
    )
    add("db-stop", _db_stop, "stop the embedded PostgreSQL server")
    run = add("run", _run, "run one processor's workers (webhooks, backfill, threads, completion) or all of them")
    run.add_argument("processor", choices=sorted(PROCESSORS))
    run.add_argument("dramatiq_args", nargs=argparse.REMAINDER, help="passed to dramatiq, e.g. --processes 2")
    from .demo import add_demo_arguments

    add_demo_arguments(add("demo", _demo, "run the whole service on a generated mailbox and show it working"))
    # Listed for --help; main() runs it as a process of its own (nova_email.serve_webhooks), which parses its
    # options. Not imported here: gunicorn reads WEB_CONCURRENCY when imported, before any setting is checked.
    sub.add_parser(
        "serve-webhooks",
        help="receive Nylas webhooks over HTTP into the webhook queue (nova-email serve-webhooks --help)",
    )
    from .ops import (
        add_backfill_arguments,
        add_dead_letters_arguments,
        add_healthcheck_arguments,
        add_status_arguments,
        run_backfill,
        run_dead_letters,
        run_healthcheck,
        run_status,
    )

    add_status_arguments(add("status", run_status, "queues, active backfills, webhook activity and recent failures"))
    add_backfill_arguments(add("backfill", run_backfill, "start a backfill, watch its progress, or retry it"))
    add_dead_letters_arguments(add("dead-letters", run_dead_letters, "list, show or replay dead-lettered messages"))
    healthcheck = add(
        "healthcheck",
        run_healthcheck,
        "database reachable, schema current, queues present (--worker: this host's workers heartbeating); "
        "exit 0 or 1 with one line",
    )
    add_healthcheck_arguments(healthcheck)
    # Listed for --help; main() hands its arguments to the simulator's own parser.
    sub.add_parser("fake-nylas", help="run the local Nylas v3 simulator (nova-email fake-nylas --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nova-email`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fake-nylas"]:
        # The simulator parses its own options (including --help).
        from .simulator.server import main as simulator_main

        return simulator_main(argv[1:])
    if argv[:1] == ["serve-webhooks"]:
        # A fresh interpreter, so that gevent patches the standard library before psycopg is imported (see
        # nova_email.serve_webhooks); exec, so that signals reach the gunicorn master directly.
        os.execv(sys.executable, [sys.executable, "-m", "nova_email.serve_webhooks", *argv[1:]])
    args, unrecognized = build_parser().parse_known_args(argv)
    if unrecognized:
        print(
            f"nova-email {args.command}: error: unrecognized arguments: {' '.join(unrecognized)} "
            f"(see nova-email {args.command} --help)",
            file=sys.stderr,
        )
        return _failure_status(args.command)
    settings: Settings | None = None
    try:
        settings = load_settings()
        setup_logging(settings)
        func: Command = args.func
        return func(settings, args)
    except (NovaError, psycopg.Error) as exc:
        print(command_error("nova-email", exc, settings), file=sys.stderr)
        return _failure_status(args.command)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

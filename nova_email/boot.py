"""What a worker process does when it boots, and only then: set up logging and check what its processors need.

Importing `nova_email.actors` builds the broker and nothing else, so another application can import it to send
jobs without its own logging being replaced or its ``.env`` read. ``dramatiq nova_email.actors`` (and
``nova-email run``) boots worker processes; `WorkerBoot` is the middleware through which they configure themselves.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import dramatiq
from dramatiq.middleware import Middleware

from .config import Settings, current_settings
from .errors import ConfigError, DatabaseError
from .log import setup_logging

__all__ = ["NYLAS_QUEUES", "WorkerBoot", "require_nylas_key"]

#: Queues whose jobs call Nylas, so whose workers need NYLAS_API_KEY (the completion monitor does not).
NYLAS_QUEUES = frozenset({"nylas_webhook_notifications", "inbox_backfill_jobs", "thread_sync_jobs"})


def require_nylas_key(settings: Settings, queues: Iterable[str] | None) -> None:
    """Refuse to start workers of `queues` (None: every queue) that call Nylas without an API key.

    Raises:
        ConfigError: NYLAS_API_KEY is empty and a queue calls Nylas.
    """
    needed = NYLAS_QUEUES if queues is None else NYLAS_QUEUES & set(queues)
    if needed and not settings.nylas_api_key:
        msg = (
            f"NYLAS_API_KEY is not set; the workers of {', '.join(sorted(needed))} call Nylas with it. "
            "Set it in the environment or in .env"
        )
        raise ConfigError(msg)


class WorkerBoot(Middleware):
    """Configures a worker process when Dramatiq boots it; does nothing in a process that only sends jobs.

    At process boot it reads the settings (`current_settings`), sets up logging and calls `configure` with them;
    at worker boot it checks what the consumed queues need. A worker that cannot start stops with one line naming
    the problem and status 2, and under the ``dramatiq`` command it stops the whole command with it (see
    `_stop_command`), however many worker processes it has.

    Parameters:
        configure: Applies the settings to the broker and the actors, before anything is consumed; it may raise
            `ConfigError` or `DatabaseError` (no database to use) to refuse the start. Any other exception refuses it
            too, with a line naming the exception.
    """

    def __init__(self, configure: Callable[[Settings], None]) -> None:
        self.configure = configure
        #: Why this process cannot start, found at process boot and reported at worker boot (below).
        self.refusal: str | None = None
        self._reporter_pid = 0

    @property
    def forks(self) -> list[Callable[[], int]]:
        # The dramatiq command asks one of its worker processes, the first to boot, for the middleware's forks: that
        # process reports a refusal that all of them share, so the command prints it once.
        self._reporter_pid = os.getpid()
        return []

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        booted = list(broker.middleware)
        try:
            settings = current_settings()
            setup_logging(settings)
            self.configure(settings)
        except (ConfigError, DatabaseError) as exc:
            # Reported at worker boot, once the dramatiq command chose the process that reports it.
            self.refusal = str(exc)
            return
        except Exception as exc:
            # Anything else (an unwritable data directory) would leave the worker running on import-time defaults.
            self.refusal = f"The worker could not configure itself: {type(exc).__name__}: {exc}"
            return
        for middleware in broker.middleware:
            if middleware not in booted:
                # Added by `configure` while this signal is being sent: it would miss its own process boot.
                middleware.after_process_boot(broker)

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self.refusal is None:
            try:
                require_nylas_key(current_settings(), worker.consumer_whitelist)
            except ConfigError as exc:
                self.refusal = str(exc)
        if self.refusal is not None:
            _stop_command(self.refusal, report=self._reporter_pid == os.getpid())


def _in_dramatiq_command() -> bool:
    """Whether this is a worker process of the ``dramatiq`` command (or of ``nova-email run``, which runs it)."""
    return multiprocessing.parent_process() is not None and "dramatiq.cli" in sys.modules


def _stop_command(message: str, *, report: bool) -> NoReturn:
    """Stop this process with `message`; under the dramatiq command, with status 2 and printing `message` only if
    it `report`s, and stop the command too, without the "exited unexpectedly" line it prints when a worker process
    dies on its own.

    The command stops its workers when it receives SIGTERM, so this process sends it one before it exits: the
    command holds signals until every worker process has booted or exited, and takes it before it looks at how
    they ended.
    """
    if not _in_dramatiq_command():
        raise SystemExit(message)
    if report:
        # To the command's own stderr, not the pipe dramatiq replaced sys.stderr with: the command may stop before it
        # copies what is in the pipe.
        print(message, file=sys.__stderr__, flush=True)
    # The command is the parent process under fork, forkserver and spawn alike (getppid() may be the fork server),
    # and once it is gone nothing is left to stop (getppid() is then PID 1 or a subreaper).
    command = multiprocessing.parent_process()
    if command is not None and command.pid not in (None, 1) and command.is_alive():
        # Deaf to the SIGTERM the command sends back to its workers: a spawned process exits through interpreter
        # shutdown, which restores the default handler, and would die of it instead of exiting with status 2.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.kill(command.pid, signal.SIGTERM)
    raise SystemExit(2)

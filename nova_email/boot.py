"""What a worker process does when it boots, and only then: set up logging and check what its processors need.

Importing `nova_email.actors` builds the broker and nothing else, so another application can import it to send
jobs without its own logging being replaced. ``dramatiq nova_email.actors`` (and ``nova-email run``) boots worker
processes; `WorkerBoot` is the middleware through which they configure themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from .config import Settings
from .errors import ConfigError
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
    """Configures a worker process from the settings when Dramatiq boots it; does nothing in a process that only
    sends jobs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        setup_logging(self.settings)

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        try:
            require_nylas_key(self.settings, worker.consumer_whitelist)
        except ConfigError as exc:
            # Not an Exception the broker would log and carry on after: the process stops, with one line.
            raise SystemExit(str(exc)) from None

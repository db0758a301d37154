"""``nova-email healthcheck``: one line and exit status 0 (healthy) or 1, for Docker's HEALTHCHECK and Kubernetes.

It checks, in order, and stops at the first failure:

1. the database answers (within `CONNECT_TIMEOUT_S`);
2. its schema is current: nothing that ``nova-email migrate`` would apply is pending;
3. the service's queues exist;
4. with ``--worker``: this host's worker processes are heartbeating. Each worker process that runs with the
   `WorkerHeartbeat` middleware (every ``dramatiq nova_email.actors`` process) touches a file named after its
   pid in `HEARTBEAT_DIR` every `HEARTBEAT_INTERVAL_S`; a live process whose file is older than ``--max-age``
   is frozen or stuck, and none at all means the workers are not running.

It runs with the workers' own DATABASE_URL (the least-privilege role is enough) and never changes anything.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import dramatiq
import psycopg
from dramatiq.middleware import Middleware
from loguru import logger

from .. import db
from ..config import Settings
from ..errors import NovaError
from . import queries

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_AGE_S",
    "HEARTBEAT_DIR",
    "HEARTBEAT_INTERVAL_S",
    "Health",
    "WorkerHeartbeat",
    "add_healthcheck_arguments",
    "check_health",
    "run_healthcheck",
    "worker_heartbeats",
]

log = logger.bind(component="Health")

#: Seconds the check waits for the database before calling it unreachable (Docker's default probe timeout is 30 s).
CONNECT_TIMEOUT_S = 5
#: Where this host's worker processes keep their heartbeat files (one per pid).
HEARTBEAT_DIR = Path(tempfile.gettempdir()) / "nova-email-heartbeats"
#: Seconds between two heartbeats of a worker process.
HEARTBEAT_INTERVAL_S = 2.0
#: Seconds after which a live worker's heartbeat counts as missing (a frozen or stuck process).
DEFAULT_MAX_AGE_S = 30.0


@attrs.frozen
class Health:
    """The outcome of a check: healthy or not, and the one line that says why."""

    healthy: bool
    line: str


class WorkerHeartbeat(Middleware):
    """Touches ``HEARTBEAT_DIR/<pid>`` every `interval_s` while this worker process runs; removes it on shutdown."""

    def __init__(self, directory: Path = HEARTBEAT_DIR, *, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self.directory = directory
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.directory / str(os.getpid())

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="nova-heartbeat", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s * 2)
        self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        failing = False
        while True:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self.path.touch()
            except OSError as exc:
                if not failing:  # once per outage, not every beat
                    log.warning("Cannot write the heartbeat file {}: {}", self.path, exc)
                failing = True
            else:
                if failing:
                    log.info("Writing the heartbeat file {} again", self.path)
                failing = False
            if self._stop.wait(self.interval_s):
                return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another user
    return True


def worker_heartbeats(directory: Path = HEARTBEAT_DIR) -> dict[int, float]:
    """Age in seconds of the last heartbeat of every live worker process on this host, by pid.

    Files of processes that no longer run (killed without shutting down) are deleted.
    """
    ages: dict[int, float] = {}
    now = time.time()
    for path in directory.glob("*") if directory.is_dir() else []:
        if not path.name.isdigit():
            continue
        pid = int(path.name)
        # A file left by an earlier run whose pid now names this very probe is not a worker.
        if pid == os.getpid() or not _alive(pid):
            path.unlink(missing_ok=True)
            continue
        try:
            ages[pid] = max(0.0, now - path.stat().st_mtime)
        except FileNotFoundError:
            continue  # the worker shut down meanwhile
    return ages


def _check_workers(directory: Path, max_age_s: float) -> Health:
    ages = worker_heartbeats(directory)
    if not ages:
        return Health(False, f"unhealthy: no worker process is heartbeating on this host ({directory})")
    stale = sorted(pid for pid, age in ages.items() if age > max_age_s)
    if stale:
        return Health(
            False,
            f"unhealthy: {len(stale)} of {len(ages)} worker process(es) silent for more than {max_age_s:g} s "
            f"(pid {', '.join(map(str, stale))})",
        )
    return Health(True, f"{len(ages)} worker process(es) heartbeating")


def check_health(
    settings: Settings, *, worker: bool = False, max_age_s: float = DEFAULT_MAX_AGE_S, directory: Path = HEARTBEAT_DIR
) -> Health:
    """Run the checks of the module docstring; never raises for a failure it can describe."""
    from ..cli import PROCESSORS
    from ..migrate import pending_migrations

    queues = PROCESSORS["all"]
    try:
        with db.connect(settings, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            pending = pending_migrations(conn)
            if pending:
                return Health(
                    False,
                    f"unhealthy: {len(pending)} migration(s) pending ({pending[0]} first); run nova-email migrate",
                )
            present = {row[0] for row in conn.execute(queries.QUEUES_PRESENT, {"queues": queues})}
    except NovaError as exc:
        return Health(False, f"unhealthy: {exc}")
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return Health(False, f"unhealthy: database unreachable or refusing ({reason})")
    missing = [queue for queue in queues if queue not in present]
    if missing:
        return Health(False, f"unhealthy: queue(s) missing: {', '.join(missing)}; run nova-email migrate")
    parts = ["database reachable", "schema current", f"{len(present)} queues present"]
    if worker:
        workers = _check_workers(directory, max_age_s)
        if not workers.healthy:
            return workers
        parts.append(workers.line)
    return Health(True, "healthy: " + ", ".join(parts))


def add_healthcheck_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nova-email healthcheck``."""
    parser.add_argument(
        "--worker", action="store_true", help="also require this host's worker processes to be heartbeating"
    )
    parser.add_argument(
        "--max-age",
        type=float,
        default=DEFAULT_MAX_AGE_S,
        metavar="SECONDS",
        help="a worker silent for longer is unhealthy (default: %(default)g)",
    )


def run_healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    """Print one line; exit status 0 when healthy, else 1."""
    from ..log import setup_logging

    # A probe's output is its one line: the connection's INFO notes would only bury it in the container's log.
    setup_logging(attrs.evolve(settings, log_level="warning"))
    health = check_health(settings, worker=args.worker, max_age_s=args.max_age)
    print(health.line)
    return 0 if health.healthy else 1

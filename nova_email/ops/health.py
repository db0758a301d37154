"""``nova-email healthcheck``: one line and exit status 0 (healthy) or 1, for Docker's HEALTHCHECK and Kubernetes.

It checks, in order, and stops at the first failure:

1. the database answers (within `CONNECT_TIMEOUT_S`);
2. its schema is current: nothing that ``nova-email migrate`` would apply is pending;
3. the service's queues exist;
4. with ``--worker``: this host's worker processes are heartbeating. Each worker process that runs with the
   `WorkerHeartbeat` middleware (every ``dramatiq nova_email.actors`` process) touches a file named after its
   pid in `HEARTBEAT_DIR` every `HEARTBEAT_INTERVAL_S`, from boot until its graceful drain has finished (a
   draining worker is healthy); a live process whose file is older than ``--max-age`` is frozen or stuck, and
   none at all means the workers are not running. The file holds the process's start time, so a file left by a
   killed worker whose pid now names another process is recognised as stale and removed.

With ``--container`` (the image's HEALTHCHECK), step 4 applies when the container's main process runs workers
(``nova-email run ...`` or ``dramatiq ...``: PID 1's command line, which under ``docker run --init`` is the init
process's and names the command after it), and not for any other command (``serve-webhooks``, ``migrate``), so one image-wide default fits them all.

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
import psutil
import psycopg
from dramatiq.middleware import Middleware
from loguru import logger
from psycopg.rows import scalar_row

from .. import db
from ..config import Settings
from ..errors import NovaError
from ..masking import mask, secret_values
from ..processors import PROCESSORS
from . import queries
from .liveness import is_running, process_start_time

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_AGE_S",
    "HEARTBEAT_DIR",
    "HEARTBEAT_INTERVAL_S",
    "Health",
    "WorkerHeartbeat",
    "add_healthcheck_arguments",
    "check_health",
    "container_runs_workers",
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
    """Touches ``HEARTBEAT_DIR/<pid>`` every `interval_s` while this worker process runs, its drain included.

    The file holds the process's start time; it is removed once the worker has shut down.
    """

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

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        # Not before_worker_shutdown: running jobs may take minutes to finish, and the worker is healthy meanwhile.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s * 2)
        self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        failing = False
        started_at = repr(process_start_time())
        while True:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self.path.write_text(started_at)
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


def _recorded_start_time(path: Path) -> float | None:
    """The start time a heartbeat file holds, or None when it holds none (being written, or written elsewhere)."""
    try:
        return float(path.read_text())
    except ValueError:
        return None


def worker_heartbeats(directory: Path = HEARTBEAT_DIR) -> dict[int, float]:
    """Age in seconds of the last heartbeat of every live worker process on this host, by pid.

    Files of processes that no longer run (killed without shutting down, their pid possibly reused since) are
    deleted.
    """
    ages: dict[int, float] = {}
    now = time.time()
    for path in directory.glob("*") if directory.is_dir() else []:
        if not path.name.isdigit():
            continue
        pid = int(path.name)
        try:
            started_at = _recorded_start_time(path)
            age = max(0.0, now - path.stat().st_mtime)
        except FileNotFoundError:
            continue  # the worker shut down meanwhile
        if not is_running(pid, started_at):
            path.unlink(missing_ok=True)
            continue
        ages[pid] = age
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
            with conn.cursor(row_factory=scalar_row) as cur:
                present = set(cur.execute(queries.QUEUES_PRESENT, {"queues": queues}).fetchall())
    except NovaError as exc:
        return Health(False, mask(f"unhealthy: {exc}", secret_values(settings)))
    except psycopg.Error as exc:
        # The server's answer may quote the URL's parts (a database name, a host): a secret among them is masked.
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return Health(False, mask(f"unhealthy: database unreachable or refusing ({reason})", secret_values(settings)))
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


def _runs_workers(argv: list[str]) -> bool:
    names = [Path(arg).name for arg in argv]
    if "dramatiq" in names:
        return True
    for cli in ("nova-email", "nova_email.cli"):
        if cli in names:
            subcommand = next((arg for arg in names[names.index(cli) + 1 :] if not arg.startswith("-")), None)
            return subcommand == "run"
    return False


def container_runs_workers(pid: int = 1) -> bool:
    """Whether process `pid` (a container's main process) runs worker processes: ``nova-email run ...`` or
    ``dramatiq ...`` (also when an init process runs them: its command line names theirs)."""
    try:
        return _runs_workers(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def add_healthcheck_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nova-email healthcheck``."""
    checks = parser.add_mutually_exclusive_group()
    checks.add_argument(
        "--worker", action="store_true", help="also require this host's worker processes to be heartbeating"
    )
    checks.add_argument(
        "--container",
        action="store_true",
        help="as --worker when this container's main process runs workers (nova-email run, dramatiq), else without: "
        "the image's HEALTHCHECK, right for every command",
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
    worker = args.worker or (args.container and container_runs_workers())
    health = check_health(settings, worker=worker, max_age_s=args.max_age)
    print(health.line)
    return 0 if health.healthy else 1

"""Periodic actors: one tick per interval across every worker process, with no leader and nothing to get stuck.

Declare the middleware before the actors, then give an actor the ``periodic_ms`` option::

    broker = PGMQBroker(url=url)
    broker.add_middleware(PeriodicScheduler())

    @dramatiq.actor(periodic_ms=5_000)
    def monitor_completion() -> None: ...

How it works (the state is one row of ``pgmq_broker.schedules`` per actor, see ``brokers/sql/051_schedules.sql``):

- Time is cut into slots of ``periodic_ms`` aligned on the Unix epoch, measured with the database clock.
- Every worker process runs a small scheduler thread. Each poll it runs ``schedule_claim_due``, an
  ``UPDATE … WHERE next_run_at <= now() … FOR UPDATE SKIP LOCKED RETURNING``, which moves a due schedule to the next
  slot, and enqueues the tick on the same connection in the same transaction. Either both happen or neither: a slot
  is taken by exactly one process, and a crash between the two loses nothing.
- A backlog does not replay a burst: a claim always jumps to the slot after *now*; skipped slots are only counted
  (``slots_missed``).
- Ticks never overlap: a sent tick holds a lease (``lease_ms``) and no further tick is sent while it is held. When the
  tick starts, ``schedule_start`` checks that it is still the latest tick and that no other run holds the lease
  (otherwise the message is skipped as stale), and the scheduler thread of the process running it renews the lease
  every poll until it finishes. A killed worker stops renewing, so the schedule resumes at most ``lease_ms`` later.
  A tick whose run lasts longer than its interval makes the following slots be skipped, not queued.
- A failed tick is not retried (its message carries ``max_retries=0``): the next slot is the retry.

Overlap is only possible if a running tick cannot renew its lease for ``lease_ms`` (a database outage longer than the
lease); keep ``lease_ms`` well above ``poll_interval_ms``.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import attrs
import dramatiq
import psycopg
from dramatiq.middleware import Middleware, SkipMessage
from loguru import logger
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from . import queries
from .broker import PGMQBroker
from .database import Database, fetch_scalar
from .errors import DatabaseUnavailable

__all__ = ["PeriodicScheduler", "Schedule"]

log = logger.bind(component="Periodic")

#: How often, in milliseconds, each worker process looks for due schedules and renews the leases of its ticks.
DEFAULT_POLL_INTERVAL_MS = 500
#: How long, in milliseconds, a tick may go unrenewed (queued or running in a dead process) before it is presumed
#: lost and the schedule moves on.
DEFAULT_LEASE_MS = 30_000
#: Message options that identify a tick.
SCHEDULE_OPTION = "periodic_schedule"
SLOT_OPTION = "periodic_slot_ms"


@attrs.frozen(kw_only=True)
class Schedule:
    """One periodic actor: its schedule name (the actor name unless given) and interval."""

    name: str
    actor_name: str
    queue_name: str
    interval_ms: int


@attrs.frozen
class _Run:
    name: str
    token: int


@attrs.frozen(kw_only=True)
class _Claim:
    """One row of ``pgmq_broker.schedule_claim_due``: a slot taken, and what became of the tick before it."""

    name: str
    slot_ms: int
    slots_missed: int
    lost_state: str | None


class PeriodicScheduler(Middleware):
    """Middleware that sends each periodic actor one tick per interval across all processes (see the module doc).

    It works with :class:`~brokers.PGMQBroker` only: a tick is enqueued in the transaction that claims its slot.

    Parameters:
      conninfo: By default the scheduler uses the broker's :class:`~brokers.Database`. Or a connection string of the
        broker's database: the scheduler then opens its own small autocommit pool in each worker process (never
        shared across ``fork()``) and closes it at worker shutdown.
      pool: Or a pool you own (autocommit connections), used as is.
      database: Or a :class:`~brokers.Database` to share (you own it).
      prepare_statements: Let psycopg prepare the hot statements on the pool built from ``conninfo`` (its default).
        Turn it off behind a transaction-mode pooler (PgBouncer ``pool_mode = transaction``): its connections then
        run with ``prepare_threshold=None``. The broker's pool follows the broker's own ``prepare_statements``, and
        a pool passed in is configured by its owner.
      poll_interval_ms: How often each process claims due schedules and renews its leases. A tick is sent at most
        this long after its slot starts.
      lease_ms: How long a tick may go unrenewed before it is presumed lost; how long a killed worker can delay the
        schedule. Must be at least three poll intervals.

    Raises:
      ValueError: For more than one of ``conninfo``, ``pool`` and ``database``, or a lease too short for the poll
        interval.
    """

    def __init__(
        self,
        *,
        conninfo: str | None = None,
        pool: ConnectionPool[Any] | None = None,
        database: Database | None = None,
        prepare_statements: bool = True,
        poll_interval_ms: int = DEFAULT_POLL_INTERVAL_MS,
        lease_ms: int = DEFAULT_LEASE_MS,
    ) -> None:
        if sum(given is not None for given in (conninfo, pool, database)) > 1:
            msg = (
                "PeriodicScheduler takes at most one of conninfo=, pool= and database= "
                f"(got pool={pool!r}, database={database!r} and conninfo given: {conninfo is not None}); "
                "pass none of them to use the broker's own database"
            )
            raise ValueError(msg)
        if lease_ms < 3 * poll_interval_ms:
            msg = (
                f"lease_ms={lease_ms!r} is shorter than three poll intervals ({3 * poll_interval_ms} ms): a running "
                "tick could lose its lease between two renewals; raise lease_ms or lower poll_interval_ms"
            )
            raise ValueError(msg)
        self.poll_interval_ms = poll_interval_ms
        self.lease_ms = lease_ms
        self.schedules: dict[str, Schedule] = {}
        self._active: list[str] = []
        self._own_database: Database | None = None
        if conninfo is not None or pool is not None:
            self._own_database = Database(
                conninfo, pool=pool, name="periodic", max_size=4, prepare_statements=prepare_statements
            )
        self._database = database or self._own_database
        self._broker: PGMQBroker | None = None
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}  # message id -> run in this process
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def actor_options(self) -> set[str]:
        return {"periodic_ms"}

    def register(self, actor: dramatiq.Actor[Any, Any], interval: int | timedelta, *, name: str | None = None) -> None:
        """Make ``actor`` periodic, every ``interval`` (ms or a timedelta); the ``periodic_ms`` option does the same.

        Register before the worker boots. ``name`` lets one actor have several schedules.
        """
        interval_ms = _to_ms(interval)
        if interval_ms <= 0:
            msg = f"The interval of periodic actor {actor.actor_name!r} is {interval!r}; it must be positive"
            raise ValueError(msg)
        schedule = Schedule(
            name=name or actor.actor_name,
            actor_name=actor.actor_name,
            queue_name=actor.queue_name,
            interval_ms=interval_ms,
        )
        self.schedules[schedule.name] = schedule

    def after_declare_actor(self, broker: dramatiq.Broker, actor: dramatiq.Actor[Any, Any]) -> None:
        interval = actor.options.get("periodic_ms")
        if interval is not None:
            self.register(actor, interval)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if not self.schedules:
            return
        if not isinstance(broker, PGMQBroker):
            msg = (
                f"PeriodicScheduler needs a PGMQBroker to enqueue ticks transactionally, not {type(broker).__name__}; "
                "no periodic actor will run"
            )
            raise TypeError(msg)
        self._broker = broker
        # A worker that does not consume a periodic actor's queue does not send its ticks: with processors
        # deployed separately (`--queues ...`), nothing would pile up on a queue that no one here drains.
        consumed = getattr(worker, "consumer_whitelist", None)
        self._active = [name for name, s in self.schedules.items() if not consumed or s.queue_name in consumed]
        if not self._active:
            return
        with self.database.connection() as conn:
            for schedule in self.schedules.values():
                conn.execute(queries.SCHEDULE_UPSERT, {**attrs.asdict(schedule), "lease_ms": self.lease_ms})
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_scheduler, args=(broker,), name="periodic-scheduler")
        self._thread.daemon = True
        self._thread.start()
        log.info("Scheduling {} periodic actors, polling every {} ms", len(self._active), self.poll_interval_ms)

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._own_database is not None:
            self._own_database.close()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        name = message.options.get(SCHEDULE_OPTION)
        if name is None:
            return
        if self._broker is None and isinstance(broker, PGMQBroker):
            self._broker = broker
        slot_ms = message.options.get(SLOT_OPTION)
        try:
            with self.database.connection() as conn:
                token = fetch_scalar(conn, queries.SCHEDULE_START, {"name": name, "slot_ms": slot_ms})
        except (psycopg.Error, DatabaseUnavailable) as exc:
            # Running without a lease could overlap another tick; skipping costs one slot.
            log.bind(event="tick_not_started", schedule=name).warning("Skipped a tick of {}: {}", name, exc)
            msg = f"cannot start the tick of {name!r}: {exc}"
            raise SkipMessage(msg) from exc
        if token is None:
            log.bind(event="stale_tick", schedule=name).info(
                "Skipped the tick of {} for slot {}: a newer tick was sent or another run holds the lease",
                name,
                slot_ms,
            )
            msg = f"stale tick of {name!r} for slot {slot_ms!r}"
            raise SkipMessage(msg)
        with self._lock:
            self._runs[message.message_id] = _Run(name, int(token))

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        error = None if exception is None else f"{type(exception).__name__}: {exception}"
        self._finish(message, error)

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        # Another middleware may skip a tick after it started (e.g. an age limit): end the run so it is not held.
        self._finish(message, "skipped")

    def _finish(self, message: dramatiq.MessageProxy, error: str | None) -> None:
        with self._lock:
            run = self._runs.pop(message.message_id, None)
        if run is None:
            return
        with self.database.connection() as conn:
            finished = fetch_scalar(
                conn, queries.SCHEDULE_FINISH, {"name": run.name, "token": run.token, "error": error}
            )
        if not finished:
            log.bind(event="tick_lease_lost", schedule=run.name).warning(
                "The tick of {} finished after losing its lease; a later tick may have overlapped it", run.name
            )

    def _run_scheduler(self, broker: dramatiq.Broker) -> None:
        while not self._stop.is_set():
            try:
                self._renew_leases()
                self._send_due_ticks(broker)
            except DatabaseUnavailable:
                pass  # the database logs the outage once; the loop keeps polling and recovers by itself
            except Exception:
                log.opt(exception=True).critical("Unexpected failure while scheduling ticks; retrying")
            self._stop.wait(self.poll_interval_ms / 1000)

    def _renew_leases(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
        if not runs:
            return
        with self.database.connection() as conn:
            conn.execute(
                queries.SCHEDULE_RENEW, {"names": [run.name for run in runs], "tokens": [run.token for run in runs]}
            )

    def _send_due_ticks(self, broker: dramatiq.Broker) -> None:
        pgmq_broker = self._broker
        assert pgmq_broker is not None
        with self.database.connection() as conn, conn.transaction():
            with conn.cursor(row_factory=class_row(_Claim)) as cursor:
                claimed = cursor.execute(queries.SCHEDULE_CLAIM_DUE, {"names": self._active}).fetchall()
            for claim in claimed:
                name = claim.name
                actor = broker.get_actor(self.schedules[name].actor_name)
                options: dict[str, Any] = {SCHEDULE_OPTION: name, SLOT_OPTION: claim.slot_ms, "max_retries": 0}
                pgmq_broker.enqueue(actor.message_with_options(**options), connection=conn)
                if claim.lost_state is not None:
                    log.bind(event="tick_lost", schedule=name).warning(
                        "The previous tick of {} was {} but its lease ran out; sending a new one",
                        name,
                        claim.lost_state,
                    )
                if claim.slots_missed:
                    log.bind(event="slots_missed", schedule=name).debug(
                        "Skipped {} slots of {} that had no tick", claim.slots_missed, name
                    )

    @property
    def database(self) -> Database:
        """Where the schedules are: the one given, or the broker's once the worker booted."""
        if self._database is not None:
            return self._database
        assert self._broker is not None, "the scheduler is used before the worker booted"
        return self._broker.database


def _to_ms(interval: int | timedelta) -> int:
    if isinstance(interval, timedelta):
        return int(interval.total_seconds() * 1000)
    return int(interval)

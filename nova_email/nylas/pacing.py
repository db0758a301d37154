"""Pacing of Nylas API calls, shared by every worker process through Postgres (``nova_email/sql/030_nylas_pacing.sql``).

Instead of the original's fixed sleeps, each call reserves a slot in a token bucket per grant and, optionally, one
per application. The database hands out slots in arrival order and says how long to wait for ours, so a caller sleeps
once, exactly as long as needed, and never polls. Those sleeps are bounded by ``max_wait_ms``: when the next free
slot is further away, nothing is reserved and ``PacingLimitReached`` (a ``RateLimited``) is raised, so the actor
re-schedules its job with that delay and frees the worker thread, as it does for a 429.

A worker thread must not sleep on a saturated grant while other grants have work. So the first call of a job (see
:func:`start_job`, called by the worker before each job) waits at most ``max_start_wait_ms``, a fraction of one
slot: when the grant's next slot is further away, the job goes back to the queue with the delay the bucket names
and the thread takes another grant's job. Later calls of a started job wait at most ``max_wait_ms`` (a few of the
grant's slots at the default rate) and never less than two of the grant's intervals, so that a job whose calls are
spaced by ``API_DELAY_MS`` still completes. When other threads' calls of the same grant have pushed the slot
further (a rested grant's burst let several jobs start at once), the rest of the job goes back the same way, without
using an attempt. Every job is idempotent: a deferred backfill resumes from the listing page it recorded last, and
a deferred thread or webhook job makes its first call or two again.

Compatibility with the original's settings:

- ``API_DELAY_MS`` keeps its meaning, a minimum spacing between calls of one grant: when set, the grant bucket's
  interval is at least that long and its burst is 1 (no two calls closer than the delay).
- ``THREAD_DELAY_MS`` and ``MESSAGE_DELAY_MS`` were blunt throttles around work that is now paced per call. They
  stay supported by the processors but should default to 0 when pacing is on: with both, the pacing rate would be
  unreachable and every sync slower for nothing.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from loguru import logger
from psycopg.rows import scalar_row

from nova_email.nylas.errors import PacingLimitReached
from nova_email.nylas.queries import PACING_ACQUIRE

__all__ = [
    "DEFAULT_GRANT_BURST",
    "DEFAULT_GRANT_RATE_PER_S",
    "DEFAULT_MAX_START_WAIT_MS",
    "DEFAULT_MAX_WAIT_MS",
    "Pacer",
    "start_job",
]

log = logger.bind(component="Pacer")

#: Calls per second per grant. Nylas allows 200/s per grant, but the providers behind it allow far less
#: (Gmail about 10/s per user, Microsoft about 16/s per mailbox), so stay near the provider limits.
DEFAULT_GRANT_RATE_PER_S = 10.0
#: Calls a rested grant may send at once.
DEFAULT_GRANT_BURST = 10
#: Calls a rested application may send at once (when an application rate is set).
DEFAULT_APP_BURST = 20
#: Longest a later call of a job may sleep for its slot before the rest of the job is handed back as
#: ``PacingLimitReached``: two and a half slots at the default rate, so a thread never idles for seconds on one grant.
DEFAULT_MAX_WAIT_MS = 250
#: Longest the first call of a job may sleep for its slot: "nearly immediate". Beyond it the job goes back to the
#: queue and the thread serves another grant.
DEFAULT_MAX_START_WAIT_MS = 50

#: Per worker thread: whether the job it runs has not made a paced call yet.
_job = threading.local()


def start_job() -> None:
    """Mark the start of a job in this thread: its first paced call waits at most ``max_start_wait_ms``."""
    _job.starting = True


ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


class Pacer:
    """Blocks each Nylas call until the shared per-grant (and per-application) buckets allow it.

    Parameters:
        connect: returns a context-managed connection, e.g. ``pool.connection``; used for one statement per call.
        grant_rate_per_s: calls per second per grant; ``None`` or 0 leaves grants unpaced (unless ``min_interval_ms``).
        grant_burst: calls a rested grant may send back to back.
        app_rate_per_s: calls per second for the whole application; ``None`` or 0: no application bucket.
        app_burst: calls a rested application may send back to back.
        min_interval_ms: ``API_DELAY_MS``: minimum spacing between two calls of one grant (0 = none).
        max_wait_ms: longest sleep of a later call of a job (at least two of the longest bucket interval); beyond it
            ``PacingLimitReached`` is raised and nothing is reserved.
        max_start_wait_ms: the same for the first call of a job (after :func:`start_job` in this thread).
        app_key: names the application bucket when several applications share a database.
        sleep: ``time.sleep``, replaceable for tests that count waits.
    """

    def __init__(
        self,
        connect: ConnectionFactory,
        *,
        grant_rate_per_s: float | None = DEFAULT_GRANT_RATE_PER_S,
        grant_burst: int = DEFAULT_GRANT_BURST,
        app_rate_per_s: float | None = None,
        app_burst: int = DEFAULT_APP_BURST,
        min_interval_ms: int = 0,
        max_wait_ms: int = DEFAULT_MAX_WAIT_MS,
        max_start_wait_ms: int = DEFAULT_MAX_START_WAIT_MS,
        app_key: str = "default",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        for name, value in (("grant_burst", grant_burst), ("app_burst", app_burst)):
            if value < 1:
                msg = f"{name}={value!r} must be at least 1 (1 = strictly spaced calls)"
                raise ValueError(msg)
        if min(min_interval_ms, max_wait_ms, max_start_wait_ms) < 0:
            msg = (
                f"min_interval_ms={min_interval_ms!r}, max_wait_ms={max_wait_ms!r} and "
                f"max_start_wait_ms={max_start_wait_ms!r} must not be negative"
            )
            raise ValueError(msg)
        self._connect = connect
        self._sleep = sleep
        self._max_start_wait_ms = max_start_wait_ms
        self._app_key = f"app:{app_key}"
        grant_interval_ms = 1000.0 / grant_rate_per_s if grant_rate_per_s else 0.0
        self._grant_interval_ms = max(grant_interval_ms, float(min_interval_ms))
        # A minimum spacing means no bursts: that is what API_DELAY_MS promised in the original.
        burst = 1 if min_interval_ms else grant_burst
        self._grant_tolerance_ms = (burst - 1) * self._grant_interval_ms
        self._app_interval_ms = 1000.0 / app_rate_per_s if app_rate_per_s else 0.0
        self._app_tolerance_ms = (app_burst - 1) * self._app_interval_ms
        # A job's own calls are at least one interval apart: a bound below two would send back, again and again,
        # every job of more than one call on a strictly spaced grant.
        self._max_wait_ms = max(max_wait_ms, math.ceil(2 * max(self._grant_interval_ms, self._app_interval_ms)))
        #: Total ms this pacer has slept, for benchmarks.
        self.waited_ms = 0

    @property
    def enabled(self) -> bool:
        """Whether any bucket applies (a disabled pacer costs nothing per call)."""
        return bool(self._grant_interval_ms or self._app_interval_ms)

    def acquire(self, grant_id: str) -> int:
        """Wait for this grant's next slot and return the ms waited.

        Raises:
            PacingLimitReached: the slot is more than ``max_wait_ms`` away (``max_start_wait_ms`` for the first call
                of a job); re-schedule after ``retry_after_ms``.
            psycopg.Error: the database could not be reached (the job would fail on it anyway).
        """
        keys: list[str] = []
        intervals: list[float] = []
        tolerances: list[float] = []
        if self._grant_interval_ms:
            keys.append(f"grant:{grant_id}")
            intervals.append(self._grant_interval_ms)
            tolerances.append(self._grant_tolerance_ms)
        if self._app_interval_ms:
            keys.append(self._app_key)
            intervals.append(self._app_interval_ms)
            tolerances.append(self._app_tolerance_ms)
        if not keys:
            return 0
        starting = getattr(_job, "starting", False)
        max_wait_ms = self._max_start_wait_ms if starting else self._max_wait_ms
        params = {"keys": keys, "intervals_ms": intervals, "tolerances_ms": tolerances, "max_wait_ms": max_wait_ms}
        with self._connect() as conn, conn.cursor(row_factory=scalar_row) as cursor:
            wait_ms = int(cursor.execute(PACING_ACQUIRE, params).fetchone() or 0)
        if wait_ms > max_wait_ms:
            msg = (
                f"Pacing holds calls for grant {grant_id!r} for {wait_ms} ms, more than the {max_wait_ms} ms "
                f"{'a job may wait to start' if starting else 'a call may wait'}; re-schedule the job after {wait_ms} ms"
            )
            log.debug("Deferred a call for grant {} by {} ms", grant_id, wait_ms)
            raise PacingLimitReached(
                msg, retry_after_ms=wait_ms, status=429, grant_id=grant_id, error_type="local_pacing"
            )
        _job.starting = False
        if wait_ms > 0:
            self._sleep(wait_ms / 1000.0)
            self.waited_ms += wait_ms
        return wait_ms

"""The module ``dramatiq tests.brokers.test_periodic_worker_app`` loads in test_periodic.py's process tests.

It holds no tests: pytest only imports it, and without PERIODIC_TEST_DATABASE_URL it declares nothing. In a worker
process, the environment the test sets chooses PERIODIC_TEST_INTERVAL_MS (the tick interval), PERIODIC_TEST_TICK_MS
(how long a tick works), PERIODIC_TEST_LEASE_MS and PERIODIC_TEST_HANG_FIRST (the first tick ever hangs for a
minute, to be killed). Each tick writes a row to public.periodic_test_ticks, and each process writes one to
public.periodic_test_boots once its worker and scheduler have started.
"""

from __future__ import annotations

import os
import time

import dramatiq
import psycopg
from dramatiq.middleware import CurrentMessage, Middleware

from brokers import PGMQBroker
from brokers.periodic import SLOT_OPTION, PeriodicScheduler

URL = os.environ.get("PERIODIC_TEST_DATABASE_URL")

#: Created by the tests before the workers start.
TICKS_TABLE = """
create table if not exists public.periodic_test_ticks (
    id bigint generated always as identity primary key,
    slot_ms bigint not null,
    pid integer not null,
    started_at timestamptz not null default clock_timestamp(),
    finished_at timestamptz
)
"""
#: Created by the tests before the workers start.
BOOTS_TABLE = """
create table if not exists public.periodic_test_boots (
    pid integer primary key,
    booted_at timestamptz not null default clock_timestamp()
)
"""


class _RecordBoot(Middleware):
    """Records that this process is up; added before the scheduler so that its after hook runs after the scheduler's."""

    def __init__(self, url: str) -> None:
        self.url = url

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("insert into public.periodic_test_boots (pid) values (%s)", [os.getpid()])


if URL is not None:
    broker = PGMQBroker(url=URL, poll_interval_ms=50)
    broker.add_middleware(CurrentMessage())
    broker.add_middleware(_RecordBoot(URL))
    broker.add_middleware(
        PeriodicScheduler(poll_interval_ms=100, lease_ms=int(os.environ.get("PERIODIC_TEST_LEASE_MS", "3000")))
    )
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name="periodic_test", periodic_ms=int(os.environ["PERIODIC_TEST_INTERVAL_MS"]))
    def tick() -> None:
        """Record the tick's slot, start and end."""
        message = CurrentMessage.get_current_message()
        assert message is not None
        with psycopg.connect(URL, autocommit=True) as conn:
            row = conn.execute(
                "insert into public.periodic_test_ticks (slot_ms, pid) values (%s, %s) returning id",
                [message.options[SLOT_OPTION], os.getpid()],
            ).fetchone()
            assert row is not None
            if os.environ.get("PERIODIC_TEST_HANG_FIRST") and row[0] == 1:
                time.sleep(60)  # the test kills this process meanwhile
            time.sleep(int(os.environ.get("PERIODIC_TEST_TICK_MS", "0")) / 1000)
            conn.execute("update public.periodic_test_ticks set finished_at = clock_timestamp() where id = %s", row)

"""PostgreSQL stops for 12 s in the middle of a backfill: workers log it once, back off, reconnect and finish."""

from __future__ import annotations

import re
import time
from pathlib import Path

import psycopg
import pytest

from nova_email.simulator.faults import FaultConfig
from nova_email.simulator.server import start_in_thread
from tests.chaos.owned_server import owned_server
from tests.chaos.scenario import queue_backfill, run_problems, worker_env
from tests.processes import running_workers, wait_for

GRANT = "grant-outage"
#: How long the database stays down.
OUTAGE_S = 12
PROCESSES = 2


def _completed_threads(url: str) -> int:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            row = conn.execute("select count(*) from queued_threads where status = 'completed'").fetchone()
    except psycopg.OperationalError:
        return -1
    return int(row[0]) if row else 0


@pytest.mark.slow
@pytest.mark.processes
def test_a_database_outage_mid_backfill_loses_nothing_and_no_worker_gets_stuck(tmp_path: Path) -> None:
    # Given workers backfilling a 600-thread mailbox into a server this test owns, over a slow Nylas
    with owned_server() as server:
        nylas = start_in_thread(
            seed=31,
            grants=[GRANT],
            threads_per_grant=600,
            faults=FaultConfig(latency_ms=25, seed=31),
            large_body_share=0.0,
        )
        try:
            backfill = queue_backfill(server.url, nylas, GRANT)
            env = worker_env(server.url, nylas, VISIBILITY_TIMEOUT="5")
            with running_workers(env, tmp_path / "workers.log", processes=PROCESSES, threads=4) as workers:
                wait_for(lambda: _completed_threads(server.url) >= 50, timeout_s=60, what="50 threads synced")

                # When the server stops mid-run for OUTAGE_S seconds and comes back at the same address
                server.stop()
                stopped_at = time.monotonic()
                down_at = _completed_threads(server.url)
                wait_for(lambda: time.monotonic() - stopped_at >= OUTAGE_S, timeout_s=OUTAGE_S + 5, what="outage")
                assert server.start() in server.url.replace("/nova?", "/postgres?")
                assert server.is_up()
                outage_s = time.monotonic() - stopped_at

                # Then the workers finish the backfill, exactly
                def clean() -> bool:
                    return not run_problems(server.url, nylas, backfill)

                wait_for(clean, timeout_s=120, interval_s=1, what="the backfill to finish exactly after the outage")
                log = workers.log()
                assert workers.process.poll() is None, "a worker process died during the outage"
        finally:
            nylas.stop()
    assert down_at == -1
    # The outage is logged once per process by the broker, and its end once; no traceback flood
    lost = log.count("Lost the database")
    assert 1 <= lost <= PROCESSES, lost
    assert 1 <= len(re.findall(r"Database reachable again after", log)) <= PROCESSES
    # Nothing critical: the consumers wait the outage out themselves (Dramatiq would log each restart of one), and
    # a retry that could not be enqueued is one debug line (its original runs again), not a middleware failure
    assert "Consumer encountered a connection error" not in log
    assert "Unexpected failure in after_process_message" not in log
    critical = re.findall(r"^.*(?:\| CRITICAL +\||\[CRITICAL\]).*$", log, flags=re.MULTILINE)
    assert critical == [], critical[:5]
    print(f"\n[chaos] database outage survived: {outage_s:.1f} s down, {lost} outage log line(s), 0 critical")

"""Nylas misbehaving for a whole backfill: 429 storms with Retry-After, 5xx, connection resets, timeouts (requests
left hanging past the workers' NYLAS_TIMEOUT_S), and a
grant that expires mid-backfill. The healthy grant's backfill finishes exactly, with no attempt spent on rate
limits; the expired grant's inbox stops cleanly."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from nova_email import thread_sync
from nova_email.jobs import ThreadSyncJob
from nova_email.nylas.client import NylasClient
from nova_email.nylas.errors import NylasConnectionError, ServerError
from nova_email.nylas.metrics import NO_RESPONSE
from nova_email.simulator.faults import FaultConfig
from nova_email.simulator.server import start_in_thread
from tests.chaos.scenario import backfill_status, queue_backfill, queue_depths, run_problems, worker_env
from tests.mirror import mirror_differences
from tests.processes import running_workers, wait_for

STORMY = "grant-stormy"
EXPIRING = "grant-expiring"
#: Threads per grant.
THREADS = 300


def _thread_counts(db_url: str, config_id: uuid.UUID) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select status, count(*) from queued_threads where config_id = %s group by 1", [config_id]
        ).fetchall()
    return {str(status): int(count) for status, count in rows}


#: Threads per grant.
THREADS = 300


@pytest.mark.slow
@pytest.mark.processes
def test_a_backfill_through_a_storm_finishes_exactly_and_an_expired_grant_stops_cleanly(
    db_url: str, tmp_path: Path
) -> None:
    # Given two 300-thread mailboxes behind a Nylas that rate-limits each grant to 15 calls/s (with Retry-After),
    # answers 15 % of calls with a 5xx, resets 6 % of connections and leaves 4 % hanging past the workers' 0.5 s
    # timeout, and workers that do not pace themselves (at one call per thread, 300 threads make as many calls as 150
    # did at two, and the workers outrun 15/s even on a busy machine)
    faults = FaultConfig(
        rate_limit_per_s=15,
        rate_limit_burst=5,
        error_rate=0.15,
        reset_rate=0.06,
        stall_rate=0.04,
        stall_ms=1500,
        seed=41,
    )
    nylas = start_in_thread(
        seed=41, grants=[STORMY, EXPIRING], threads_per_grant=THREADS, faults=faults, large_body_share=0.0
    )
    try:
        stormy = queue_backfill(db_url, nylas, STORMY)
        expiring = queue_backfill(db_url, nylas, EXPIRING)
        env = worker_env(db_url, nylas, VISIBILITY_TIMEOUT="10", NYLAS_TIMEOUT_S="0.5")
        with running_workers(env, tmp_path / "workers.log", processes=2, threads=4) as workers:
            # When the second grant expires once some of its threads are synced
            wait_for(
                lambda: _thread_counts(db_url, expiring.config_id).get("completed", 0) >= 20,
                timeout_s=60,
                what="20 threads of the expiring grant synced",
            )
            nylas.simulator.expire_grant(EXPIRING, emit=False)
            wait_for(
                lambda: backfill_status(db_url, stormy.config_id) == "completed",
                timeout_s=80,
                interval_s=0.5,
                what="the stormy backfill to complete",
            )
            wait_for(
                lambda: not {"queued", "processing"} & set(_thread_counts(db_url, expiring.config_id)),
                timeout_s=30,
                what="every thread of the expired grant to be settled",
            )
            log = workers.log()
        calls = nylas.simulator.calls.snapshot()
        with psycopg.connect(db_url) as conn:
            depths = queue_depths(conn)
            inbox_status = conn.execute("select status from flux_inboxes where id = %s", [expiring.inbox_id]).fetchone()
            dead = conn.execute("select queue_name, reason, error_type from pgmq_broker.dead_letters").fetchall()
            expired_errors = conn.execute(
                "select distinct error_message from queued_threads where config_id = %s and status = 'failed'",
                [expiring.config_id],
            ).fetchall()
    finally:
        nylas.stop()

    # Then the stormy grant's backfill equals its mailbox, exactly, although the storm really raged
    assert run_problems(db_url, nylas, stormy) == []
    rate_limited = sum(n for (_, status), n in calls.items() if status == 429)
    server_errors = sum(n for (_, status), n in calls.items() if status >= 500)
    timeouts = nylas.simulator.injector.stalled
    resets = sum(n for (_, status), n in calls.items() if status < 100) - timeouts
    assert rate_limited >= 100, rate_limited
    assert server_errors >= 20, server_errors
    assert resets >= 5, resets
    assert timeouts >= 5, timeouts
    # and no attempt was spent on the 429s: nothing was dead-lettered, no thread failed
    assert dead == []
    assert _thread_counts(db_url, stormy.config_id) == {"completed": THREADS - _outside_window(nylas, stormy)}
    # And the expired grant's inbox stopped cleanly: marked auth_expired, its threads settled with the reason,
    # nothing left in the queues, nothing retried forever
    assert inbox_status == ("auth_expired",)
    assert [row[0] for row in expired_errors] == [thread_sync.GRANT_EXPIRED_ERROR]
    assert not any(depths.values()), depths
    assert log.count("hit a rate limit") >= rate_limited // 2  # each 429 deferred the job, none failed it
    print(
        f"\n[chaos] Nylas storm survived: {rate_limited} x 429, {server_errors} x 5xx, {resets} resets,"
        f" {timeouts} timeouts,"
        f" {sum(calls.values())} calls"
    )


def _outside_window(nylas: object, backfill: object) -> int:
    export = nylas.export(backfill.grant_id)  # type: ignore[attr-defined]
    start = backfill.window_start  # type: ignore[attr-defined]
    return sum(1 for t in export["threads"] if (t["latest_message_received_date"] or 0) <= start)


def test_thread_syncs_through_timeouts_end_equal_to_the_mailbox(conn: psycopg.Connection) -> None:
    # Given a Nylas whose answers take 0-300 ms and a client that waits at most 250 ms (urllib3 retries reads 3 times)
    nylas = start_in_thread(
        seed=43,
        grants=["grant-slow"],
        threads_per_grant=10,
        faults=FaultConfig(latency_jitter_ms=300, seed=43),
        large_body_share=0.0,
    )
    client = NylasClient(api_key="k", api_uri=nylas.base_url, timeout_s=0.25)
    try:
        row = conn.execute("insert into flux_inboxes (nylas_grant_id) values ('grant-slow') returning id").fetchone()
        assert row is not None
        export = nylas.export("grant-slow")
        timeouts = 0
        # When each thread is synced, and a timed-out sync is tried again (as the actor's retries would)
        for thread in export["threads"]:
            job = ThreadSyncJob(thread_id=thread["id"], inbox_id=row[0], grant_id="grant-slow")
            for _attempt in range(20):
                try:
                    thread_sync.sync_thread(conn, client, job)
                    break
                except (NylasConnectionError, ServerError):
                    timeouts += 1  # transient, by contract; any other error type fails the test
            else:
                pytest.fail(f"thread {thread['id']} never synced in 20 attempts")
        # Then the stored mailbox equals Nylas's, and timeouts really happened
        assert mirror_differences(conn, row[0], export) == []
        timed_out = sum(n for (_, status), n in client.counter.snapshot().items() if status == NO_RESPONSE)
        assert timed_out + timeouts > 0
    finally:
        client.close()
        nylas.stop()

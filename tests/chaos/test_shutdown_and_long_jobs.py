"""SIGTERM under load finishes or returns in-flight work, and a job longer than the visibility timeout is never
handed to a second worker while its first one is alive."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest

from nova_email.simulator.faults import FaultConfig
from nova_email.simulator.server import start_in_thread
from tests.chaos.scenario import backfill_status, count_thread_fetches, queue_backfill, run_problems, worker_env
from tests.processes import Workers, running_workers, wait_for


def _completed(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select count(*) from queued_threads where status = 'completed'").fetchone()
    return int(row[0]) if row else 0


@pytest.mark.slow
@pytest.mark.processes
def test_sigterm_under_load_loses_nothing_and_runs_nothing_twice(db_url: str, tmp_path: Path) -> None:
    # Given workers busy with a 200-thread backfill whose Nylas calls take 150 ms each
    nylas = start_in_thread(
        seed=51, grants=["grant-term"], threads_per_grant=200, faults=FaultConfig(latency_ms=150), large_body_share=0
    )
    try:
        fetches = count_thread_fetches(nylas)
        backfill = queue_backfill(db_url, nylas, "grant-term")
        env = worker_env(db_url, nylas, VISIBILITY_TIMEOUT="5")
        workers = Workers(env, tmp_path / "first.log", ["--processes", "2", "--threads", "4"])
        try:
            workers.wait_ready(2)
            wait_for(lambda: _completed(db_url) >= 30, timeout_s=60, what="30 threads synced")
            # When the supervisor sends SIGTERM to the main process while syncs are in flight (a thread's messages fetched
            # but not yet stored; polled, because at any one instant all of them may be waiting on Nylas)
            wait_for(
                lambda: sum(fetches.values()) - _completed(db_url) > 0,
                timeout_s=30,
                interval_s=0.01,
                what="a sync in flight",
            )
            terminated_at = time.monotonic()
            workers.process.send_signal(signal.SIGTERM)
            exit_code = workers.process.wait(timeout=60)
            shutdown_s = time.monotonic() - terminated_at
        finally:
            workers.stop()
        first_log = workers.log()
        with psycopg.connect(db_url) as conn:
            processing = conn.execute("select count(*) from queued_threads where status = 'processing'").fetchone()
        # Then it exits cleanly within the visibility timeout, with its in-flight syncs finished, not abandoned
        assert exit_code == 0, first_log[-3000:]
        assert shutdown_s < 5, shutdown_s
        assert processing == (0,)
        assert "Killing worker process" not in first_log

        # And a new command finishes the backfill exactly, without syncing any thread a second time
        restarted_at = time.monotonic()
        with running_workers(env, tmp_path / "second.log", processes=2, threads=4):
            wait_for(
                lambda: backfill_status(db_url, backfill.config_id) == "completed",
                timeout_s=80,
                what="the backfill to complete after the restart",
            )
        assert run_problems(db_url, nylas, backfill) == []
        assert max(fetches.values()) == 1, [t for t, n in fetches.items() if n > 1]
        print(
            f"\n[chaos] SIGTERM under load: exit in {shutdown_s:.1f} s, done {time.monotonic() - restarted_at:.0f} s later"
        )
    finally:
        nylas.stop()


@pytest.mark.slow
@pytest.mark.processes
def test_a_job_longer_than_the_visibility_timeout_is_not_taken_by_a_second_worker(db_url: str, tmp_path: Path) -> None:
    # Given a visibility timeout of 2 s and thread syncs that take about 6 s (one Nylas call of 6 s each)
    nylas = start_in_thread(
        seed=52, grants=["grant-long"], threads_per_grant=6, faults=FaultConfig(latency_ms=6000), large_body_share=0
    )
    try:
        fetches = count_thread_fetches(nylas)
        backfill = queue_backfill(db_url, nylas, "grant-long")
        env = worker_env(db_url, nylas, VISIBILITY_TIMEOUT="2", POLL_INTERVAL_MS="100")
        # When two separate commands, with idle threads to spare, poll the queue the whole time
        with (
            running_workers(env, tmp_path / "a.log", processes=1, threads=4),
            running_workers(env, tmp_path / "b.log", processes=1, threads=4),
        ):
            wait_for(
                lambda: backfill_status(db_url, backfill.config_id) == "completed",
                timeout_s=80,
                what="the slow backfill to complete",
            )
        # Then each thread was synced exactly once: the heartbeat kept every running job hidden
        export = nylas.export("grant-long")
        tracked = [t["id"] for t in export["threads"] if t["latest_message_received_date"] > backfill.window_start]
        assert tracked and all(fetches[t] == 1 for t in tracked), dict(fetches)
        assert run_problems(db_url, nylas, backfill) == []
    finally:
        nylas.stop()

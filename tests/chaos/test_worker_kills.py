"""``kill -9`` of worker processes during a 2,000+ thread backfill: nothing lost, nothing duplicated, stats exact."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from nova_email.simulator.faults import FaultConfig
from nova_email.simulator.server import start_in_thread
from tests.chaos.fleet import WORKER_KILLED, Fleet
from tests.chaos.scenario import backfill_status, backfill_threads, queue_backfill, run_problems, worker_env
from tests.processes import wait_for

GRANT = "grant-kills"
#: Kills the spec asks for, at least.
KILLS = 20


@pytest.mark.slow
@pytest.mark.processes
def test_twenty_kill_9s_during_a_backfill_lose_and_duplicate_nothing(db_url: str, tmp_path: Path) -> None:
    # Given a mailbox of 3,000 threads (over 2,000 in the one-year window), served with 80 ms of latency so the
    # backfill lasts long enough for the kills, and a 5 s visibility timeout so a killed worker's messages come back
    nylas = start_in_thread(
        seed=11,
        grants=[GRANT],
        threads_per_grant=3000,
        faults=FaultConfig(latency_ms=80, seed=11),
        large_body_share=0.0,
    )
    fleet: Fleet | None = None
    try:
        backfill = queue_backfill(db_url, nylas, GRANT)
        env = worker_env(db_url, nylas, VISIBILITY_TIMEOUT="5")
        fleet = Fleet(env, tmp_path, commands=2, processes=1, threads=4)
        fleet.wait_ready()

        # When a random worker process is killed with SIGKILL every 0.5-1.5 s (its command is restarted, as a
        # supervisor would), 20 times while the backfill runs
        rng = random.Random(20)
        kills: list[int] = []
        started = time.monotonic()
        deadline = started + 120
        next_kill = time.monotonic() + rng.uniform(0.5, 1.5)
        timeline: list[str] = []
        while len(kills) < KILLS and time.monotonic() < deadline:
            if fleet.restart_exited():
                timeline.append(f"{time.monotonic() - started:.1f} restart")
            if time.monotonic() >= next_kill:
                pid = fleet.kill_random_worker(rng)
                if pid is not None:
                    kills.append(pid)
                    timeline.append(f"{time.monotonic() - started:.1f} kill {pid}")
                    next_kill = time.monotonic() + rng.uniform(0.5, 1.5)
            time.sleep(0.1)  # the supervisor's own tick, not a synchronisation
        status_after_kills = backfill_status(db_url, backfill.config_id)
        kills_s = time.monotonic() - started

        def completed() -> bool:
            fleet.restart_exited()
            return backfill_status(db_url, backfill.config_id) == "completed"

        wait_for(completed, timeout_s=150, interval_s=0.5, what="the backfill to complete after the kills")
        completed_s = time.monotonic() - started
        # in-flight messages of the last kill come back after the visibility timeout; wait until the queues drain
        wait_for(lambda: not run_problems(db_url, nylas, backfill), timeout_s=30, interval_s=1, what="a clean state")

        # Then the kills happened while the backfill was running, and the database equals the mailbox exactly
        print("\n".join(timeline))
        assert len(kills) >= KILLS, f"only {len(kills)} kills before the deadline"
        assert status_after_kills != "completed", f"the backfill finished before the 20th kill ({completed_s:.0f} s)"
        assert fleet.restarts >= KILLS - 2, fleet.restarts
        assert run_problems(db_url, nylas, backfill) == []
        assert backfill_threads(db_url, backfill.config_id) >= 2000, "the issue asks for a 2,000+ thread backfill"
        assert fleet.exit_codes.count(WORKER_KILLED) >= KILLS - 2, fleet.exit_codes
        print(
            f"\n[chaos] kill -9 survived: {len(kills)} kills in {kills_s:.0f} s, {fleet.restarts} command restarts,"
            f" backfill completed after {completed_s:.0f} s"
        )
    finally:
        if fleet is not None:
            fleet.stop()
        nylas.stop()

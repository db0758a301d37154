"""Many inboxes at once, with real worker processes: dispatch is fair across grants, no grant exceeds its rate, and a
worker process keeps to its database connection budget while all four processors run."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import psycopg
import pytest

from nova_email.simulator.faults import FaultConfig
from nova_email.simulator.server import SimulatorHandle, start_in_thread
from tests.processes import Workers, running_workers, wait_for

pytestmark = pytest.mark.processes

#: Calls per second our pacing allows each grant; the simulator allows 10 % more, so any 429 is our pacing's fault.
RATE = 40
#: Days of mail the small inbox's backfill covers.
SMALL_WINDOW_DAYS = 45


@contextmanager
def simulator(grants: list[str], threads: int) -> Iterator[SimulatorHandle]:
    faults = FaultConfig(rate_limit_per_s=RATE * 1.1, rate_limit_burst=int(RATE * 1.1), seed=4)
    nylas = start_in_thread(seed=11, grants=grants, threads_per_grant=threads, faults=faults, large_body_share=0)
    try:
        yield nylas
    finally:
        nylas.stop()


def worker_env(db_url: str, nylas: SimulatorHandle) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "NYLAS_API_URI": nylas.base_url,
        "NYLAS_API_KEY": "e2e",
        "NYLAS_GRANT_RATE": str(RATE),
        "NYLAS_GRANT_BURST": str(RATE // 4),
        "COMPLETION_CHECK_INTERVAL_MS": "500",
        "LOG_LEVEL": "info",
    }


def queue_backfills(db_url: str, nylas: SimulatorHandle, windows: dict[str, int]) -> dict[str, uuid.UUID]:
    """One backfill per grant (`windows`: days of mail), queued in order through queue_inbox_backfill."""
    end = datetime.fromtimestamp(nylas.simulator.anchor, UTC) + timedelta(days=1)
    configs = {}
    with psycopg.connect(db_url, autocommit=True) as conn:
        for grant, days in windows.items():
            inbox = conn.execute("insert into flux_inboxes (nylas_grant_id) values (%s) returning id", [grant])
            inbox_id = inbox.fetchone()[0]  # type: ignore[index]
            row = conn.execute(
                "select config_id from queue_inbox_backfill(%s, null, %s, %s)",
                [inbox_id, end - timedelta(days=days), end],
            ).fetchone()
            assert row is not None
            configs[grant] = row[0]
    return configs


def fanned_out(db_url: str, configs: dict[str, uuid.UUID]) -> bool:
    """Whether every backfill has listed its threads and queued one job each."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select bool_and(backfill_status in ('thread_sync', 'completed')) from flux_inbox_configurations"
            " where id = any(%s)",
            [list(configs.values())],
        ).fetchone()
    return bool(row and row[0])


def completed_at(db_url: str, configs: dict[str, uuid.UUID]) -> dict[str, datetime | None]:
    """When each backfill's last thread was synced (None while it is not completed)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select c.id, case when c.backfill_status = 'completed'"
            " then coalesce(max(q.processed_at), c.backfill_completed_at) end"
            " from flux_inbox_configurations c left join queued_threads q on q.config_id = c.id"
            " where c.id = any(%s) group by c.id",
            [list(configs.values())],
        ).fetchall()
    by_config: dict[uuid.UUID, datetime | None] = dict(rows)
    return {grant: by_config.get(config) for grant, config in configs.items()}


def test_a_small_inbox_queued_behind_big_ones_finishes_first_and_no_grant_exceeds_its_rate(
    db_url: str, tmp_path: Path
) -> None:
    # Given two big mailboxes and a small one (a short window), served by a simulator that answers 429 above RATE
    grants = ["big-1", "big-2", "small"]
    with simulator(grants, threads=150) as nylas:
        # When the big backfills are queued first and have fanned out their thread jobs, and then the small one is
        # queued, for 4 worker threads paced at RATE per grant
        with running_workers(worker_env(db_url, nylas), tmp_path / "workers.log", processes=1, threads=4):
            configs = queue_backfills(db_url, nylas, {"big-1": 365, "big-2": 365})
            wait_for(lambda: fanned_out(db_url, configs), timeout_s=60, what="the big backfills' fan-out")
            configs |= queue_backfills(db_url, nylas, {"small": SMALL_WINDOW_DAYS})
            wait_for(lambda: all(completed_at(db_url, configs).values()), timeout_s=180, what="every backfill")
        done = completed_at(db_url, configs)
        calls = nylas.simulator.calls.snapshot()

    # Then the small inbox completed before either big one: it was not left behind their fan-out
    assert done["small"] is not None and done["big-1"] is not None and done["big-2"] is not None
    assert done["small"] < min(done["big-1"], done["big-2"])
    # And no grant ever went above its rate: the simulator never had to answer 429
    assert not any(status == 429 for (_, status) in calls), calls


#: The application name the worker processes connect with (libpq's PGAPPNAME), to tell their connections apart.
WORKER_APP = "nova-worker-under-test"


def worker_connections(db_url: str, workers: Workers) -> tuple[int, dict[int, int]]:
    """The worker processes' connections in pg_stat_activity: in all, and by process where TCP ports say which."""
    ports: dict[int, int] = {}
    for child in psutil.Process(workers.process.pid).children(recursive=True):
        try:
            for connection in child.net_connections(kind="tcp"):
                if connection.laddr:
                    ports[connection.laddr.port] = child.pid
        except psutil.Error:
            continue
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "select client_port from pg_stat_activity where datname = current_database() and application_name = %s",
            [WORKER_APP],
        ).fetchall()
    by_process: dict[int, int] = {}
    for (port,) in rows:
        if port in ports:  # over a Unix socket there is no port, and only the total counts
            by_process[ports[port]] = by_process.get(ports[port], 0) + 1
    return len(rows), by_process


@pytest.mark.parametrize("pooler", [False, True], ids=["direct", "transaction-pooler"])
def test_each_worker_process_holds_at_most_four_connections_while_all_four_processors_run(
    db_url: str, tmp_path: Path, pooler: bool
) -> None:
    # Given several mailboxes to backfill and webhooks arriving, so that every processor has work
    grants = [f"grant-{i}" for i in range(5)]
    with simulator(grants, threads=50) as nylas:
        env = worker_env(db_url, nylas) | {"DATABASE_TRANSACTION_POOLER": str(pooler).lower(), "PGAPPNAME": WORKER_APP}
        peak_total = 0
        peaks: dict[int, int] = {}
        errors: list[BaseException] = []
        stop = threading.Event()
        # When 2 worker processes x 8 threads run all four processors (the default: every queue)
        with running_workers(env, tmp_path / "workers.log", processes=2, threads=8) as workers:

            def sample() -> None:
                nonlocal peak_total
                try:
                    while not stop.is_set():
                        total, by_process = worker_connections(db_url, workers)
                        peak_total = max(peak_total, total)
                        for pid, held in by_process.items():
                            peaks[pid] = max(peaks.get(pid, 0), held)
                        time.sleep(0.05)
                except BaseException as exc:
                    errors.append(exc)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                configs = queue_backfills(db_url, nylas, dict.fromkeys(grants, 365))
                with psycopg.connect(db_url, autocommit=True) as conn:
                    for n in range(40):
                        conn.execute(
                            "select * from queue_nylas_webhook_notification(%s, 'thread.replied', %s, %s::jsonb)",
                            [f"wh-{n}", grants[n % len(grants)], '{"data": {"object": {"id": "nope"}}}'],
                        )
                wait_for(lambda: all(completed_at(db_url, configs).values()), timeout_s=180, what="every backfill")
            finally:
                stop.set()
                sampler.join()

    # Then no process ever held more than its pool of 3 and one LISTEN connection (none behind a transaction pooler,
    # where the workers poll), and the two together no more than twice that
    budget = 3 if pooler else 4
    assert errors == []
    assert 2 < peak_total <= 2 * budget, peak_total
    assert all(held <= budget for held in peaks.values()), peaks
    assert len(peaks) == 2 or urlsplit(db_url).hostname in (None, ""), peaks  # per process over TCP only

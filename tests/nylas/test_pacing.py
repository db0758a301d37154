"""The shared pacer on real Postgres: threads and processes together stay within the configured rates."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
import responses
from psycopg.rows import scalar_row
from psycopg_pool import ConnectionPool

from nova_email.nylas import ApiCallCounter, NylasClient, PacingLimitReached, RateLimited, build_session
from nova_email.nylas.pacing import Pacer, start_job
from nova_email.simulator import SimulatorHandle, serve_in_thread

#: The simulator's API key.
SIM_API_KEY = "sim-pacing-key-0123456789"


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(db_url, min_size=1, max_size=6, kwargs={"autocommit": True}, open=True) as p:
        yield p


def database_now(pool: ConnectionPool[Any]) -> datetime:
    with pool.connection() as conn, conn.cursor(row_factory=scalar_row) as cursor:
        now = cursor.execute("select clock_timestamp()").fetchone()
    assert isinstance(now, datetime)
    return now


def bucket_tat(pool: ConnectionPool[Any], key: str) -> datetime:
    """When the bucket's next call is due (before the burst's tolerance), as the database recorded it."""
    with pool.connection() as conn, conn.cursor(row_factory=scalar_row) as cursor:
        tat = cursor.execute("select tat from nylas_pacing_buckets where key = %s", [key]).fetchone()
    assert isinstance(tat, datetime)
    return tat


def assert_within_rate(stamps: list[float], *, rate: float, burst: int) -> None:
    """No window of calls is denser than the bucket allows (one call of slack for clock and wake-up jitter)."""
    stamps = sorted(stamps)
    for i in range(len(stamps)):
        for j in range(i + 1, len(stamps)):
            allowed = burst + rate * (stamps[j] - stamps[i]) + 1
            assert j - i + 1 <= allowed, f"{j - i + 1} calls in {stamps[j] - stamps[i]:.3f} s (rate {rate}/s)"


def test_a_rested_grant_bursts_then_is_spaced_at_its_rate(pool: ConnectionPool[Any]) -> None:
    pacer = Pacer(pool.connection, grant_rate_per_s=20, grant_burst=3)
    waits, stamps = [], []
    before = database_now(pool)

    for _ in range(7):
        waits.append(pacer.acquire("g1"))
        stamps.append(time.monotonic())

    # A slot every 50 ms after the burst (a call that came late for its slot waits less, down to 0)
    assert waits[:3] == [0, 0, 0] and all(0 <= w <= 51 for w in waits[3:]), waits
    # The seven slots were reserved one interval apart, on the database's clock
    assert bucket_tat(pool, "grant:g1") - before >= timedelta(milliseconds=7 * 50)
    assert_within_rate(stamps, rate=20, burst=3)
    assert pacer.waited_ms == sum(waits)


def test_grants_have_their_own_buckets(pool: ConnectionPool[Any]) -> None:
    pacer = Pacer(pool.connection, grant_rate_per_s=2, grant_burst=1, max_wait_ms=10_000, sleep=lambda _: None)
    for _ in range(3):
        pacer.acquire("busy")  # the next slot of "busy" is 1.5 s away

    assert pacer.acquire("idle") == 0
    with pytest.raises(PacingLimitReached):
        Pacer(pool.connection, grant_rate_per_s=2, grant_burst=1, max_wait_ms=100).acquire("busy")


def test_api_delay_ms_is_a_minimum_spacing_without_bursts(pool: ConnectionPool[Any]) -> None:
    # A spacing of 10 s, so that how long this machine takes between the calls cannot blur it
    slept: list[float] = []
    pacer = Pacer(pool.connection, grant_rate_per_s=1000, grant_burst=50, min_interval_ms=10_000, sleep=slept.append)

    waits = [pacer.acquire("g1") for _ in range(3)]

    # No burst: each call's slot is one spacing after the one before, counted from the first call
    assert waits[0] == 0 and 0 < waits[1] <= 10_000 < waits[2] <= 20_000, waits


def test_a_slot_beyond_max_wait_is_handed_back_as_rate_limited_and_not_reserved(pool: ConnectionPool[Any]) -> None:
    # Given a grant spaced 1 s apart whose next three slots are taken by other threads
    others = Pacer(pool.connection, grant_rate_per_s=1, grant_burst=1, max_wait_ms=60_000, sleep=lambda _: None)
    for _ in range(3):
        others.acquire("g1")
    # ... and a pacer whose calls wait at most 200 ms, so at most two intervals (2 s): a job's own spacing
    slept: list[float] = []
    pacer = Pacer(pool.connection, grant_rate_per_s=1, grant_burst=1, max_wait_ms=200, sleep=slept.append)

    with pytest.raises(RateLimited) as caught:
        pacer.acquire("g1")

    assert isinstance(caught.value, PacingLimitReached)
    assert 2000 < caught.value.retry_after_ms <= 3000 and caught.value.grant_id == "g1"
    assert slept == []  # nothing slept: the worker thread is free at once
    with pool.connection() as conn:
        # Only the three calls are reserved: the next slot is three intervals out, not four.
        (pending_ms,) = conn.execute(
            "select extract(epoch from tat - clock_timestamp()) * 1000 from nylas_pacing_buckets where key = 'grant:g1'"
        ).fetchone()
    assert pending_ms <= 3000


def test_a_job_whose_grant_is_saturated_goes_back_at_its_first_call_instead_of_sleeping(
    pool: ConnectionPool[Any],
) -> None:
    slept: list[float] = []
    pacer = Pacer(pool.connection, grant_rate_per_s=1, grant_burst=1, max_start_wait_ms=50, sleep=slept.append)
    start_job()
    pacer.acquire("busy")  # the grant's one slot: the next is 1 s away

    start_job()
    with pytest.raises(PacingLimitReached) as caught:
        pacer.acquire("busy")

    assert 50 < caught.value.retry_after_ms <= 1000  # the delay the bucket names
    assert slept == []


def test_later_calls_of_a_started_job_wait_for_their_slot(pool: ConnectionPool[Any]) -> None:
    slept: list[float] = []
    pacer = Pacer(pool.connection, grant_rate_per_s=1, grant_burst=1, max_start_wait_ms=50, sleep=slept.append)
    start_job()

    pacer.acquire("g1")  # the job's first call, at once
    pacer.acquire("g1")  # its second, one interval later: within a later call's wait, so it waits

    assert len(slept) == 1 and 0 < slept[0] <= 1.0


def test_the_application_bucket_caps_all_grants_together(pool: ConnectionPool[Any]) -> None:
    pacer = Pacer(pool.connection, grant_rate_per_s=None, app_rate_per_s=25, app_burst=2)
    stamps: list[float] = []

    started = time.monotonic()
    for i in range(12):
        pacer.acquire(f"grant-{i}")
        stamps.append(time.monotonic())

    assert time.monotonic() - started >= (12 - 2) / 25 * 0.95
    assert_within_rate(stamps, rate=25, burst=2)


def test_threads_sharing_a_grant_stay_within_its_rate(pool: ConnectionPool[Any]) -> None:
    rate, burst, per_thread = 50.0, 4, 12
    pacer = Pacer(pool.connection, grant_rate_per_s=rate, grant_burst=burst)
    stamps: list[float] = []
    lock = threading.Lock()
    before = database_now(pool)

    def work() -> None:
        for _ in range(per_thread):
            pacer.acquire("shared")
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(stamps) == 4 * per_thread
    assert_within_rate(stamps, rate=rate, burst=burst)
    # Every call took its own slot of the one bucket, one interval after the last (on the database's clock)
    assert bucket_tat(pool, "grant:shared") - before >= timedelta(seconds=len(stamps) / rate)


def _paced_worker(db_url: str, rate: float, burst: int, calls: int, barrier: Any, out: Any) -> None:
    with ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}, open=True) as pool:
        pacer = Pacer(pool.connection, grant_rate_per_s=rate, grant_burst=burst)
        barrier.wait(timeout=60)
        stamps = []
        for _ in range(calls):
            pacer.acquire("multi-process")
            stamps.append(time.time())
        out.put(stamps)


def test_processes_sharing_a_grant_stay_within_its_rate(db_url: str, pool: ConnectionPool[Any]) -> None:
    # Given two worker processes pacing the same grant through the same database
    rate, burst, calls = 40.0, 3, 20
    before = database_now(pool)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    out = ctx.Queue()
    procs = [ctx.Process(target=_paced_worker, args=(db_url, rate, burst, calls, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        # When both have made their calls
        stamps = [s for _ in procs for s in out.get(timeout=60)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()

    # Then the calls of both together never beat the one bucket
    assert len(stamps) == 2 * calls
    assert_within_rate(stamps, rate=rate, burst=burst)
    assert bucket_tat(pool, "grant:multi-process") - before >= timedelta(seconds=len(stamps) / rate)


def test_the_client_consults_the_pacer_before_every_call(pool: ConnectionPool[Any]) -> None:
    slept: list[float] = []
    pacer = Pacer(pool.connection, grant_rate_per_s=1, grant_burst=1, sleep=slept.append)
    counter = ApiCallCounter()
    session = build_session(max_retries=0, counter=counter)
    client = NylasClient(api_key="k" * 20, api_uri="https://api.test", pacer=pacer, session=session, counter=counter)

    with responses.RequestsMock() as mocked:
        mocked.get("https://api.test/v3/grants/g/threads/t", json={"data": {"id": "t"}})
        for _ in range(3):
            client.get_thread("g", "t")

    # The fake sleep does not wait, so each reservation lands one interval (1 s) further out than the last,
    # less the time the calls themselves took.
    assert len(slept) == 2 and 0 < slept[0] <= 1.0 < slept[1] <= 2.0, slept


def test_the_sql_function_is_usable_alone_by_rate_and_burst(conn: psycopg.Connection[Any]) -> None:
    with conn.cursor(row_factory=scalar_row) as cursor:
        waits = [cursor.execute("select nylas_pacing_acquire('grant:sql', 0.5, 2)").fetchone() for _ in range(4)]

    assert waits[:2] == [0, 0]
    # Slots 2 s apart after the burst of 2, less the time the calls themselves took.
    assert 0 < waits[2] <= 2000 < waits[3] <= 4000, waits


# -- later calls of a started job, against the simulator -------------------------------------------------------------


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    with serve_in_thread(seed=3, grants=["g-later"], threads_per_grant=5, api_key=SIM_API_KEY) as handle:
        yield handle


def sim_client(sim: SimulatorHandle, pacer: Pacer, counter: ApiCallCounter) -> NylasClient:
    session = build_session(max_retries=0, counter=counter)
    return NylasClient(api_key=SIM_API_KEY, api_uri=sim.base_url, pacer=pacer, session=session, counter=counter)


def test_a_later_call_of_a_started_job_goes_back_instead_of_holding_its_thread_for_seconds(
    pool: ConnectionPool[Any], sim: SimulatorHandle
) -> None:
    # Given a job that has made its first call to a grant paced at 10 calls/s
    slept: list[float] = []
    counter = ApiCallCounter()
    client = sim_client(sim, Pacer(pool.connection, grant_rate_per_s=10, grant_burst=1, sleep=slept.append), counter)
    start_job()
    client.list_threads("g-later", limit=5)
    # ... when other worker threads have taken the grant's next 20 slots (2 s of its budget)
    others = Pacer(pool.connection, grant_rate_per_s=10, grant_burst=1, max_wait_ms=60_000, sleep=lambda _: None)
    for _ in range(20):
        others.acquire("g-later")

    # When the job makes its next call
    with pytest.raises(PacingLimitReached) as caught:
        client.list_messages("g-later", limit=5)

    # Then it sleeps not at all: the job goes back with the delay the bucket names, and no request was sent
    assert slept == []
    assert caught.value.retry_after_ms >= 1_500 and caught.value.grant_id == "g-later"
    assert counter.total() == 1
    client.close()


def test_the_calls_of_a_job_spaced_by_api_delay_ms_still_wait_for_their_slot(
    pool: ConnectionPool[Any], sim: SimulatorHandle
) -> None:
    # Given API_DELAY_MS=1000, a spacing longer than a later call's usual bound
    slept: list[float] = []
    counter = ApiCallCounter()
    pacer = Pacer(pool.connection, grant_rate_per_s=10, min_interval_ms=1_000, sleep=slept.append)
    client = sim_client(sim, pacer, counter)
    start_job()

    client.list_threads("g-later", limit=5)
    client.list_messages("g-later", limit=5)

    # Then the second call waited for its slot one spacing later: a job of several calls is never sent back for ever
    assert len(slept) == 1 and 0 < slept[0] <= 1.0, slept
    assert counter.total() == 2
    client.close()

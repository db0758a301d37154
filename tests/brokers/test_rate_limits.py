"""PostgresBackend against a real database, alone and through Dramatiq's own rate limiters, in threads and processes."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import dramatiq
import psycopg
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit, CurrentMessage, Retries, TimeLimit
from dramatiq.rate_limits import Barrier, BucketRateLimiter, ConcurrentRateLimiter, WindowRateLimiter
from loguru import logger

from brokers import PGMQBroker
from brokers.rate_limits import PostgresBackend, RateLimitRetries, RetryAfter, use_rate_limit_retries

from .conftest import first_delivery
from .proxy import TCPProxy


@pytest.fixture
def backend(db_url: str) -> Iterator[PostgresBackend]:
    backend = PostgresBackend(conninfo=db_url, max_pool_size=8)
    yield backend
    backend.close()


def wait_until(condition: Callable[[], bool], *, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.01)


def stored_value(conn: psycopg.Connection, key: str) -> int | None:
    row = conn.execute("select pgmq_broker.rate_limit_value(%s)", [key]).fetchone()
    return None if row is None else row[0]


# --- the backend's own semantics (those of Dramatiq's Redis and stub backends) ---


def test_add_sets_a_key_only_when_it_is_absent(backend: PostgresBackend, conn: psycopg.Connection) -> None:
    assert backend.add("k", 5, ttl=60_000) is True
    assert backend.add("k", 7, ttl=60_000) is False
    assert stored_value(conn, "k") == 5


def test_expired_keys_count_as_absent(backend: PostgresBackend, conn: psycopg.Connection) -> None:
    # Given a key that lives 50 ms
    assert backend.add("k", 1, ttl=50)
    # When it has expired, add() succeeds again and incr() starts from zero
    wait_until(lambda: stored_value(conn, "k") is None)
    assert backend.add("k", 3, ttl=60_000) is True
    assert backend.incr("short", 1, maximum=1, ttl=50)
    wait_until(lambda: stored_value(conn, "short") is None)
    assert backend.incr("short", 1, maximum=1, ttl=60_000) is True
    assert stored_value(conn, "short") == 1


def test_incr_stops_at_the_maximum_and_decr_at_the_minimum(backend: PostgresBackend, conn: psycopg.Connection) -> None:
    assert backend.incr("k", 2, maximum=3, ttl=60_000) is True
    assert backend.incr("k", 2, maximum=3, ttl=60_000) is False
    assert backend.incr("k", 1, maximum=3, ttl=60_000) is True
    assert stored_value(conn, "k") == 3
    assert backend.decr("k", 2, minimum=0, ttl=60_000) is True
    assert backend.decr("k", 2, minimum=0, ttl=60_000) is False
    assert stored_value(conn, "k") == 1
    # An absent key counts as 0, as in Redis: a barrier's decr(key, 1, minimum=1) on it fails.
    assert backend.decr("absent", 1, minimum=1, ttl=60_000) is False


def test_incr_and_sum_counts_every_key_and_accepts_a_callable(backend: PostgresBackend) -> None:
    assert backend.add("w@1", 2, ttl=60_000)
    calls = []

    def keys() -> list[str]:
        calls.append(1)
        return ["w@2", "w@1"]

    assert backend.incr_and_sum("w@2", keys, 1, maximum=3, ttl=60_000) is True
    assert backend.incr_and_sum("w@2", keys, 1, maximum=3, ttl=60_000) is False
    assert backend.incr_and_sum("w@2", ["w@2", "w@1"], 1, maximum=4, ttl=60_000) is True
    assert calls == [1, 1]


def test_sweep_deletes_only_expired_rows(backend: PostgresBackend, conn: psycopg.Connection) -> None:
    backend.add("old", 1, ttl=1)
    backend.add("live", 1, ttl=60_000)
    wait_until(lambda: stored_value(conn, "old") is None)
    assert backend.sweep() == 1
    keys = [row[0] for row in conn.execute("select key from pgmq_broker.rate_limits")]
    assert keys == ["live"]


def test_wait_returns_when_another_thread_notifies(backend: PostgresBackend) -> None:
    # Given a waiter blocked on a key
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        waiting = pool.submit(backend.wait, "event", 10_000)
        time.sleep(0.2)  # not synchronisation: gives the waiter time to block, so the notify path is exercised
        # When someone notifies
        backend.wait_notify("event", ttl=5_000)
        # Then the waiter wakes long before its timeout, and later waits see the event until its ttl ends
        assert waiting.result(timeout=5) is True
    assert time.monotonic() - started < 5
    assert backend.wait("event", 1_000) is True


def test_wait_times_out_without_an_event(backend: PostgresBackend) -> None:
    started = time.monotonic()
    assert backend.wait("nothing", 300) is False
    assert 0.25 <= time.monotonic() - started < 3


def test_a_blocking_barrier_releases_all_parties_together(backend: PostgresBackend) -> None:
    barrier = Barrier(backend, "barrier-1", ttl=30_000)
    assert barrier.create(parties=3) is True
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: barrier.wait(timeout=10_000), range(3)))
    assert results == [True, True, True]


def test_a_backend_needs_exactly_one_connection_source(db_url: str) -> None:
    with pytest.raises(ValueError, match="exactly one of pool= .* or conninfo="):
        PostgresBackend()


@pytest.mark.parametrize("prepare", [True, False], ids=["prepare=on", "prepare=off"])
def test_prepare_statements_false_keeps_the_own_pool_free_of_prepared_statements(db_url: str, prepare: bool) -> None:
    # Given a backend on a one-connection pool of its own, as behind a transaction-mode pooler when prepare is off
    backend = PostgresBackend(conninfo=db_url, max_pool_size=1, prepare_statements=prepare)
    try:
        # When it runs the same statement more often than psycopg's prepare threshold
        for _ in range(10):
            backend.add("prepared", 1, 60_000)
        with backend.database.pool.connection() as conn:
            threshold = conn.prepare_threshold
            row = conn.execute("select count(*) from pg_prepared_statements").fetchone()
    finally:
        backend.close()
    # Then with prepare_statements=False nothing was prepared on the server (otherwise psycopg's default applies)
    assert row is not None
    assert (threshold, row[0] > 0) == ((5, True) if prepare else (None, False))


# --- Dramatiq's rate limiters on this backend, under concurrency ---


def run_concurrently(workers: int, job: Callable[[int], None]) -> None:
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(job, i) for i in range(workers)]:
            future.result()


def test_concurrent_rate_limiter_never_admits_more_than_its_limit_across_threads(backend: PostgresBackend) -> None:
    # Given a limit of 2 and 6 threads that each try 15 times to hold it for a moment
    limiter = ConcurrentRateLimiter(backend, "concurrent", limit=2)
    lock = threading.Lock()
    inside, peak, admitted = 0, 0, 0

    def job(_: int) -> None:
        nonlocal inside, peak, admitted
        for _attempt in range(15):
            with limiter.acquire(raise_on_failure=False) as acquired:
                if not acquired:
                    continue
                with lock:
                    inside += 1
                    admitted += 1
                    peak = max(peak, inside)
                time.sleep(0.005)
                with lock:
                    inside -= 1

    run_concurrently(6, job)
    # Then the limit held, it was reached, and every slot was released
    assert peak == 2
    assert admitted >= 2
    assert limiter.backend.add("concurrent", 0, ttl=1) is False  # key still live, its value back to zero
    assert limiter.backend.incr("concurrent", 2, maximum=2, ttl=60_000) is True


def acquired_in(limiter: WindowRateLimiter | BucketRateLimiter, period_ms: int, attempts: int) -> tuple[list[int], int]:
    """Try `attempts` times; return the period index (time // period_ms) of each success that can be dated exactly."""
    periods, undatable = [], 0
    for _attempt in range(attempts):
        before = int(time.time() * 1000) // period_ms
        with limiter.acquire(raise_on_failure=False) as acquired:
            after = int(time.time() * 1000) // period_ms
            if acquired:
                if before == after:
                    periods.append(before)
                else:
                    undatable += 1
        time.sleep(0.002)
    return periods, undatable


def test_window_rate_limiter_admits_at_most_limit_per_window_across_threads(backend: PostgresBackend) -> None:
    # Given a window of 2 s allowing 5 operations, hammered by 4 threads for a bit over 2 s
    limiter = WindowRateLimiter(backend, "window", limit=5, window=2)
    results: list[tuple[list[int], int]] = []

    def job(_: int) -> None:
        deadline = time.monotonic() + 2.2
        while time.monotonic() < deadline:
            results.append(acquired_in(limiter, 1000, 20))

    run_concurrently(4, job)
    seconds = Counter(second for periods, _ in results for second in periods)
    undatable = sum(count for _, count in results)
    # Then no two consecutive seconds (one window) admitted more than 5, and the limit was reached
    for second in seconds:
        assert seconds[second] + seconds[second - 1] <= 5
    assert sum(seconds.values()) + undatable >= 5


def test_bucket_rate_limiter_admits_at_most_limit_per_bucket_across_threads(backend: PostgresBackend) -> None:
    # Given buckets of 300 ms allowing 3 operations each, hammered by 4 threads for about 1.2 s
    limiter = BucketRateLimiter(backend, "bucket", limit=3, bucket=300)
    buckets: Counter[int] = Counter()
    lock = threading.Lock()

    def job(_: int) -> None:
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            periods, _undatable = acquired_in(limiter, 300, 10)
            with lock:
                buckets.update(periods)

    run_concurrently(4, job)
    # Then each bucket admitted at most 3, and several buckets were filled
    assert max(buckets.values()) <= 3
    assert sum(1 for count in buckets.values() if count == 3) >= 2


def hold_the_mutex(conninfo: str, key: str, rounds: int, intervals: multiprocessing.Queue[tuple[float, float]]) -> None:
    """Child process: take a distributed mutex `rounds` times and report each holding interval."""
    backend = PostgresBackend(conninfo=conninfo, max_pool_size=2)
    mutex = ConcurrentRateLimiter(backend, key, limit=1)
    done = 0
    while done < rounds:
        with mutex.acquire(raise_on_failure=False) as acquired:
            if acquired:
                start = time.time()
                time.sleep(0.01)
                intervals.put((start, time.time()))
                done += 1
    backend.close()


def test_concurrent_rate_limiter_is_a_mutex_across_processes(db_url: str, backend: PostgresBackend) -> None:
    # Given a parent that already used its backend (so its pool exists before the fork) and three child processes
    mutex = ConcurrentRateLimiter(backend, "mutex", limit=1)
    with mutex.acquire():
        pass
    context = multiprocessing.get_context("fork")
    intervals: multiprocessing.Queue[tuple[float, float]] = context.Queue()
    children = [context.Process(target=hold_the_mutex, args=(db_url, "mutex", 8, intervals)) for _ in range(3)]
    for child in children:
        child.start()
    try:
        # When each takes the mutex 8 times
        held = sorted(intervals.get(timeout=20) for _ in range(24))
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    # Then no two holding intervals overlap, and the parent's pool still works after the children's
    assert all(child.exitcode == 0 for child in children)
    for (_, end), (next_start, _) in zip(held, held[1:], strict=False):
        assert end <= next_start
    with mutex.acquire():
        pass


def test_window_limit_holds_across_processes(db_url: str, backend: PostgresBackend) -> None:
    # Given 3 processes sharing a window limiter of 4 per 1 s, each trying 200 times as fast as it can
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[tuple[list[int], int]] = context.Queue()

    def job() -> None:
        child_backend = PostgresBackend(conninfo=db_url, max_pool_size=1)
        results.put(acquired_in(WindowRateLimiter(child_backend, "shared-window", limit=4, window=1), 1000, 200))
        child_backend.close()

    children = [context.Process(target=job) for _ in range(3)]
    for child in children:
        child.start()
    try:
        collected = [results.get(timeout=30) for _ in children]
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    seconds = Counter(second for periods, _ in collected for second in periods)
    undatable = sum(count for _, count in collected)
    # Then no second admitted more than 4 (an acquisition that straddled a second may belong to either)
    assert all(count <= 4 for count in seconds.values())
    assert max(seconds.values()) + undatable >= 4


# --- RateLimitRetries: rate-limited work is deferred without using its retries ---


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    broker = StubBroker()
    broker.add_middleware(CurrentMessage())
    broker.emit_after("process_boot")
    yield broker
    broker.flush_all()
    broker.close()


def test_use_rate_limit_retries_replaces_retries_in_place_and_keeps_its_settings() -> None:
    broker = StubBroker(middleware=[AgeLimit(), Retries(max_retries=3, min_backoff=7), TimeLimit()])
    installed = use_rate_limit_retries(broker)
    assert [type(m) for m in broker.middleware] == [AgeLimit, RateLimitRetries, TimeLimit]
    assert (installed.max_retries, installed.min_backoff) == (3, 7)
    assert {"rate_limit_min_backoff_ms", "rate_limit_max_backoff_ms"} <= broker.actor_options


@pytest.mark.parametrize("retries_middleware", ["RateLimitRetries", "Retries"])
def test_a_rate_limited_message_runs_once_the_limit_frees_without_using_its_retries(
    stub_broker: StubBroker, backend: PostgresBackend, retries_middleware: str
) -> None:
    # Given an actor with no retries left to give, guarded by a distributed mutex that someone else holds
    if retries_middleware == "RateLimitRetries":
        use_rate_limit_retries(
            stub_broker, RateLimitRetries(rate_limit_min_backoff_ms=20, rate_limit_max_backoff_ms=80)
        )
    mutex = ConcurrentRateLimiter(backend, "held-elsewhere", limit=1)
    assert backend.add("held-elsewhere", 1, ttl=60_000)
    attempts: list[dict[str, object]] = []

    @dramatiq.actor(broker=stub_broker, max_retries=0)
    def guarded() -> None:
        attempts.append(dict(CurrentMessage.get_current_message().options))  # type: ignore[union-attr]
        with mutex.acquire():
            attempts[-1]["ran"] = True

    worker = dramatiq.Worker(stub_broker, worker_timeout=50)
    worker.start()
    try:
        # When the message is sent while the mutex is held, then the mutex is released
        guarded.send()
        # (an attempt is recorded before it tries the mutex: wait for its outcome, not for its start)
        wait_until(
            lambda: len(stub_broker.dead_letters) == 1 if retries_middleware == "Retries" else len(attempts) >= 3
        )
        assert backend.decr("held-elsewhere", 1, minimum=0, ttl=60_000)
        stub_broker.join(guarded.queue_name, timeout=10_000, fail_fast=False)
        worker.join()
    finally:
        worker.stop()
    if retries_middleware == "RateLimitRetries":
        # Then it ran once the mutex was free, deferred several times, its retries untouched
        assert attempts[-1].get("ran") is True
        assert attempts[-1].get("retries", 0) == 0
        assert attempts[-1]["rate_limited"] == len(attempts) - 1 >= 2
        assert stub_broker.dead_letters == []
    else:
        # (whereas Dramatiq's Retries counts the rate limit as a failure and drops the message)
        assert [attempt.get("ran") for attempt in attempts] == [None]
        assert len(stub_broker.dead_letters) == 1


def test_rate_limited_work_on_the_pgmq_broker_is_deferred_not_failed(
    make_broker: Callable[..., PGMQBroker],
    make_worker: Callable[..., dramatiq.Worker],
    backend: PostgresBackend,
    conn: psycopg.Connection,
) -> None:
    # Given a PGMQ broker with RateLimitRetries, and an actor with no retries behind a mutex held elsewhere
    broker = make_broker()
    broker.add_middleware(CurrentMessage())
    use_rate_limit_retries(broker, RateLimitRetries(rate_limit_min_backoff_ms=20, rate_limit_max_backoff_ms=100))
    mutex = ConcurrentRateLimiter(backend, "pgmq-held", limit=1)
    assert backend.add("pgmq-held", 1, ttl=60_000)
    attempts: list[dict[str, object]] = []

    @dramatiq.actor(broker=broker, queue_name="rate_limited", max_retries=0)
    def guarded() -> None:
        attempts.append(dict(CurrentMessage.get_current_message().options))  # type: ignore[union-attr]
        with mutex.acquire():
            attempts[-1]["ran"] = True

    make_worker(broker)
    # When it is sent, deferred a few times, and the mutex is then released
    guarded.send()
    wait_until(lambda: len(attempts) >= 3)
    assert backend.decr("pgmq-held", 1, minimum=0, ttl=60_000)
    wait_until(lambda: attempts[-1].get("ran") is True)
    broker.join("rate_limited", timeout=10_000)
    # Then it ran exactly once, its retries untouched, nothing dead-lettered and the queue is empty
    assert [attempt.get("ran") for attempt in attempts].count(True) == 1
    assert attempts[-1].get("retries", 0) == 0 and attempts[-1]["rate_limited"] == len(attempts) - 1
    assert broker.count_dead_letters("rate_limited") == 0


class _TooManyRequests(Exception):
    """An HTTP client's 429, carrying the server's Retry-After as the broker's protocol asks."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"429, retry after {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


@pytest.mark.parametrize(
    "too_many_requests",
    [_TooManyRequests, lambda ms: RetryAfter("429", retry_after_ms=ms)],
    ids=["any-exception-with-retry_after_ms", "RetryAfter"],
)
def test_an_exception_carrying_retry_after_ms_is_deferred_by_that_long_without_using_a_retry(
    stub_broker: StubBroker, too_many_requests: Callable[[int], Exception]
) -> None:
    # Given an actor with no retries that is told twice to come back after 300 ms
    use_rate_limit_retries(stub_broker)
    runs: list[tuple[float, dict[str, object]]] = []

    @dramatiq.actor(broker=stub_broker, max_retries=0)
    def throttled() -> None:
        runs.append((time.monotonic(), dict(CurrentMessage.get_current_message().options)))  # type: ignore[union-attr]
        if len(runs) < 3:
            raise too_many_requests(300)

    worker = dramatiq.Worker(stub_broker, worker_timeout=20)
    worker.start()
    try:
        throttled.send()
        wait_until(lambda: len(runs) >= 3)
        stub_broker.join(throttled.queue_name, timeout=10_000)
    finally:
        worker.stop()

    # Then it ran a third time, each deferral at least the server's delay, and no retry was spent
    gaps = [later[0] - earlier[0] for earlier, later in zip(runs, runs[1:], strict=False)]
    assert all(0.29 <= gap < 1.5 for gap in gaps), gaps
    assert runs[-1][1].get("retries", 0) == 0 and runs[-1][1]["rate_limited"] == 2
    assert stub_broker.dead_letters == []


@pytest.fixture
def log_records() -> Iterator[list[tuple[str, str]]]:
    """(level, message) of every loguru record, debug included."""
    records: list[tuple[str, str]] = []
    sink = logger.add(lambda m: records.append((m.record["level"].name, m.record["message"])), level="DEBUG")
    yield records
    logger.remove(sink)


@pytest.mark.parametrize(
    "exception",
    [RetryAfter("429", retry_after_ms=0), ValueError("failed")],
    ids=["rate-limited", "failed"],
)
def test_a_retry_lost_to_a_database_outage_is_one_log_line_and_the_original_runs_again(
    make_broker: Callable[..., PGMQBroker],
    proxy: TCPProxy,
    log_records: list[tuple[str, str]],
    caplog: pytest.LogCaptureFixture,
    exception: Exception,
) -> None:
    # Given a message leased through a connection about to be dropped, on a broker with RateLimitRetries
    broker = make_broker(url=proxy.url_through, pool_timeout_s=0.5, visibility_timeout_s=1)
    use_rate_limit_retries(broker, RateLimitRetries(min_backoff=10))

    @dramatiq.actor(broker=broker, queue_name="retry_down", max_retries=3)
    def job() -> None:
        pass

    job.send()
    consumer, message = first_delivery(broker, "retry_down")

    # When the database goes away as the worker retries the message, then acknowledges it, as Dramatiq does
    proxy.stop()
    broker.emit_after("process_message", message, exception=exception)
    consumer.ack(message)
    proxy.start()

    # Then one line says what happens, no middleware failure is logged, and the original delivery runs again
    # once its lease lapses
    (line,) = [m for _, m in log_records if "re-enqueue" in m]
    assert line.startswith(f"Could not re-enqueue message {message.message_id} (The database is unavailable")
    assert line.endswith("it runs again once its lease lapses")
    assert not [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert "CRITICAL" not in {level for level, _ in log_records}
    again = None
    deadline = time.monotonic() + 10
    while again is None and time.monotonic() < deadline:
        again = next(consumer)
    assert again is not None
    assert (again.message_id, again.pgmq_msg_id) == (message.message_id, message.pgmq_msg_id)  # type: ignore[attr-defined]
    consumer.ack(again)
    consumer.close()
    assert broker.metrics("retry_down").in_flight == 0

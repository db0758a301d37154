"""Worker metrics: the database gauges on a real database, the Nylas API call counts, and Dramatiq's actor metrics
served next to them by a real ``dramatiq`` process group."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from psycopg.types.json import Jsonb

from nova_email.config import Settings, load_settings
from nova_email.errors import ConfigError
from nova_email.nylas.client import NylasClient
from nova_email.nylas.errors import NotFound, ServerError
from nova_email.nylas.metrics import ApiCallCounter
from nova_email.ops.metrics import DatabaseCollector, MetricsOptions, export_api_calls, make_metrics_server
from nova_email.ops.status import collect_status
from nova_email.simulator.server import serve_in_thread, start_in_thread
from tests.processes import Workers, wait_for

from .conftest import Inbox, make_dead_letter


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _collector(db_url: str, *, interval_s: float = 0.0) -> Iterator[DatabaseCollector]:
    """A database collector as an exposition process has one; closed after, which releases the collector's lock."""
    collector = DatabaseCollector(lambda: psycopg.connect(db_url, autocommit=True), interval_s=interval_s)
    try:
        yield collector
    finally:
        collector.close()


def _text(collector: DatabaseCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def _scrape(db_url: str) -> str:
    with _collector(db_url) as collector:
        return _text(collector)


def test_scrape_reads_queue_and_backfill_gauges_from_the_database(
    conn: psycopg.Connection, db_url: str, thread_sync_backfill: uuid.UUID, inbox: Inbox
) -> None:
    # Given two thread jobs, one of them taken by a worker, and a dead letter
    for n in range(2):
        conn.execute("select flux_pgmq_send('thread_sync_jobs', %s)", [Jsonb({"thread_id": f"t{n}"})])
    conn.execute("select * from pgmq.read('thread_sync_jobs', 60, 1)")
    make_dead_letter(conn, "thread_sync_jobs", {"thread_id": "poison"})

    text = _scrape(db_url)

    assert "nova_database_up 1.0" in text
    assert "nova_metrics_database_collector 1.0" in text
    assert 'nova_queue_messages{queue="thread_sync_jobs",state="ready"} 1.0' in text
    assert 'nova_queue_messages{queue="thread_sync_jobs",state="in_flight"} 1.0' in text
    assert 'nova_queue_dead_letters{queue="thread_sync_jobs"} 1.0' in text
    assert 'nova_queue_messages{queue="inbox_backfill_jobs",state="ready"} 1.0' in text
    assert 'nova_backfills{state="thread_sync"} 1.0' in text
    # The active backfills in aggregate (per-configuration detail is `nova-email status`'s)
    assert "nova_backfill_completion_ratio 0.5" in text
    assert 'nova_backfill_threads{state="completed"} 4.0' in text
    assert 'nova_backfill_threads{state="queued"} 4.0' in text
    assert "nova_backfill_messages_synced 12.0" in text
    assert str(thread_sync_backfill) not in text and str(inbox.id) not in text
    assert re.search(r"^nova_backfill_longest_idle_seconds \d", text, re.MULTILINE)


def test_database_gauges_are_collected_once_per_interval_and_reused_within_it(
    conn: psycopg.Connection, db_url: str
) -> None:
    with _collector(db_url, interval_s=1.0) as collector:
        assert 'nova_queue_messages{queue="thread_sync_jobs",state="ready"} 0.0' in _text(collector)
        conn.execute("select flux_pgmq_send('thread_sync_jobs', %s)", [Jsonb({"thread_id": "t"})])
        # a second scrape within the interval reuses the first collection
        assert 'nova_queue_messages{queue="thread_sync_jobs",state="ready"} 0.0' in _text(collector)
        wait_for(
            lambda: 'nova_queue_messages{queue="thread_sync_jobs",state="ready"} 1.0' in _text(collector),
            timeout_s=10,
            what="the next collection",
        )


def test_one_exposition_process_collects_the_database_gauges_for_the_whole_deployment(
    conn: psycopg.Connection, db_url: str
) -> None:
    # Given two worker groups' collectors on one database
    with _collector(db_url) as first, _collector(db_url) as second:
        first_text, second_text = _text(first), _text(second)
        # Then the first to scrape collects the gauges, the other reports only that the database is up
        assert "nova_metrics_database_collector 1.0" in first_text
        assert "nova_queue_messages{" in first_text
        assert "nova_database_up 1.0" in second_text
        assert "nova_metrics_database_collector 0.0" in second_text
        assert "nova_queue_messages{" not in second_text and "nova_backfill" not in second_text

        # When the collecting group goes away, the other takes over at its next scrape
        first.close()
        assert "nova_queue_messages{" in _text(second)
        assert "nova_metrics_database_collector 1.0" in _text(second)


def test_scrape_answers_with_database_up_0_when_the_database_is_unreachable() -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{_free_port()}/nowhere?connect_timeout=2"

    text = _scrape(unreachable)

    assert "nova_database_up 0.0" in text
    assert "nova_queue_messages{" not in text


def test_metrics_are_off_without_metrics_port_and_a_bad_port_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("METRICS_PORT", raising=False)
    assert MetricsOptions.from_settings(load_settings(env_file=None)) is None

    monkeypatch.setenv("METRICS_PORT", "9300")
    monkeypatch.setenv("METRICS_HOST", "0.0.0.0")
    options = MetricsOptions.from_settings(load_settings(env_file=None))
    assert options is not None
    assert (options.port, options.host, options.directory.name) == (9300, "0.0.0.0", "nova-email-metrics-9300")

    monkeypatch.setenv("METRICS_PORT", "http")
    with pytest.raises(ConfigError, match="METRICS_PORT"):
        MetricsOptions.from_settings(load_settings(env_file=None))


def test_every_nylas_api_attempt_is_counted_and_every_call_timed_by_endpoint_in_prometheus() -> None:
    # Given a client whose counter is exported to Prometheus (exporting twice must not count twice)
    counter = ApiCallCounter()
    registry = CollectorRegistry()
    export_api_calls(counter, registry)
    export_api_calls(counter, CollectorRegistry())
    with serve_in_thread(seed=1, grants=["g"], threads_per_grant=2, large_body_share=0.0) as nylas:
        thread_id = next(iter(nylas.simulator.grants["g"].threads))
        client = NylasClient(api_key="k", api_uri=nylas.base_url, max_retries=1, counter=counter)
        try:
            # When one call succeeds, one finds nothing, and one meets a server error twice (its retry included)
            client.get_thread("g", thread_id)
            with pytest.raises(NotFound):
                client.get_thread("g", "thr_gone")
            nylas.faults.error_rate = 1.0
            with pytest.raises(ServerError):
                client.get_thread("g", thread_id)
        finally:
            client.close()

    # Then each attempt is in nova_nylas_api_calls_total, labelled as the client counted it
    text = generate_latest(registry).decode()
    calls = counter.snapshot()
    assert calls[("threads.get", 200)] == 1
    assert calls[("threads.get", 404)] == 1
    assert sum(n for (_, status), n in calls.items() if status >= 500) == 2
    for (endpoint, status), n in calls.items():
        assert f'nova_nylas_api_calls_total{{code="{status}",endpoint="{endpoint}"}} {float(n)}' in text
    # and each of the three calls (the retried one once) in the latency histogram of its endpoint
    assert 'nova_nylas_api_call_duration_seconds_count{endpoint="threads.get"} 3.0' in text
    assert 'nova_nylas_api_call_duration_seconds_bucket{endpoint="threads.get",le="+Inf"} 3.0' in text


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _a_counter_file_with_a_count(tmp_path: Path) -> Path:
    """A multiprocess counter file holding tick's count of 1000, written by a real prometheus-client in a child."""
    directory = tmp_path / "old-run"
    directory.mkdir()
    script = (
        "from prometheus_client import Counter; "
        "Counter('dramatiq_messages_total', 'x', ['queue_name', 'actor_name'])"
        ".labels('ops_metrics_test', 'tick').inc(1000)"
    )
    subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}, check=True
    )
    (path,) = directory.glob("counter_*.db")
    return path


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


@pytest.mark.processes
@pytest.mark.slow
def test_a_worker_group_serves_actor_metrics_api_calls_and_database_gauges_on_its_port(
    conn: psycopg.Connection, db_url: str, tmp_path: Path
) -> None:
    # Given a dramatiq process group (2 worker processes) with the metrics middleware on a free port
    port = _free_port()
    counts_dir = Path(tempfile.gettempdir()) / f"nova-email-metrics-{port}"
    shutil.rmtree(counts_dir, ignore_errors=True)
    # and the count file of a process of an earlier run, which must not be added in
    counts_dir.mkdir(parents=True)
    stale = counts_dir / f"counter_{_dead_pid()}.db"
    shutil.copyfile(_a_counter_file_with_a_count(tmp_path), stale)
    conn.execute("select pgmq.create('ops_metrics_test')")
    env = {"DATABASE_URL": db_url, "METRICS_PORT": str(port), "METRICS_HOST": "127.0.0.1", "LOG_LEVEL": "info"}
    nylas = start_in_thread(seed=2, grants=["g"], threads_per_grant=3, large_body_share=0.0)
    thread_ids = list(nylas.simulator.grants["g"].threads)
    workers = Workers(
        env,
        tmp_path / "workers.log",
        ["--processes", "2", "--threads", "2"],
        command=[sys.executable, "-m", "dramatiq", "tests.ops.metrics_app"],
    )
    try:
        # When five messages succeed and one fails for good (SQL producers, as any other service would send them)
        for n in range(5):
            conn.execute(
                "select pgmq.send('ops_metrics_test', pgmq_broker.dramatiq_message('ops_metrics_test', 'tick', %s))",
                [Jsonb([n])],
            )
        conn.execute(
            "select pgmq.send('ops_metrics_test', pgmq_broker.dramatiq_message('ops_metrics_test', 'explode'))"
        )
        # and six Nylas calls, four of them for threads that exist, two for one that does not
        for thread_id in [*thread_ids, thread_ids[0], "thr_gone", "thr_gone"]:
            conn.execute(
                "select pgmq.send('ops_metrics_test',"
                " pgmq_broker.dramatiq_message('ops_metrics_test', 'fetch_thread', %s))",
                [Jsonb([nylas.base_url, "g", thread_id])],
            )

        # Then the metrics port shows the actors' and the API calls' counts summed over both processes, and the
        # queue gauges
        expected = [
            'dramatiq_messages_total{actor_name="tick",queue_name="ops_metrics_test"} 5.0',
            'dramatiq_messages_total{actor_name="fetch_thread",queue_name="ops_metrics_test"} 6.0',
            'nova_nylas_api_calls_total{code="200",endpoint="threads.get"} 4.0',
            'nova_nylas_api_calls_total{code="404",endpoint="threads.get"} 2.0',
            'nova_nylas_api_call_duration_seconds_count{endpoint="threads.get"} 6.0',
            'dramatiq_message_errors_total{actor_name="explode",queue_name="ops_metrics_test"} 1.0',
            'nova_queue_dead_letters{queue="ops_metrics_test"} 1.0',
            'nova_queue_messages{queue="ops_metrics_test",state="ready"} 0.0',
            "nova_database_up 1.0",
        ]
        deadline = time.monotonic() + 60
        text = None
        while time.monotonic() < deadline:
            text = _get(f"http://127.0.0.1:{port}/metrics")
            if text is not None and all(line in text for line in expected):
                break
            assert workers.process.poll() is None, workers.log()[-3000:]
            time.sleep(0.2)
        assert text is not None, workers.log()[-3000:]
        missing = [line for line in expected if line not in text]
        assert not missing, (missing, workers.log()[-3000:])
        assert not stale.exists()
    finally:
        workers.stop()
        nylas.stop()
        shutil.rmtree(counts_dir, ignore_errors=True)
    assert workers.process.returncode == 0, workers.log()[-3000:]


def test_status_and_scrape_need_no_more_than_the_least_privilege_worker_role(
    db_url: str, thread_sync_backfill: uuid.UUID
) -> None:
    # The exposition process runs with the workers' DATABASE_URL, whose role may be only nova_worker (nova_email/sql/090).
    def as_worker() -> psycopg.Connection:
        conn = psycopg.connect(db_url, autocommit=True)
        conn.execute("set role nova_worker")
        return conn

    collector = DatabaseCollector(as_worker, interval_s=0)
    try:
        text = _text(collector)
    finally:
        collector.close()
    with as_worker() as conn:
        report = collect_status(conn, database="test")

    assert "nova_database_up 1.0" in text
    assert "nova_metrics_database_collector 1.0" in text
    assert 'nova_backfills{state="thread_sync"} 1.0' in text
    assert [b.config_id for b in report.backfills] == [thread_sync_backfill]


def test_a_stalled_client_does_not_hold_up_another_scrape(db_url: str, tmp_path: Path) -> None:
    # Given a worker group's metrics server
    options = MetricsOptions(port=_free_port(), directory=tmp_path / "prom")
    server = make_metrics_server(options, Settings(database_url=db_url))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # When one client sends half a request and then nothing
        with socket.create_connection(("127.0.0.1", options.port)) as stalled:
            stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.2)
            # Then another scrape is still answered at once
            text = _get(f"http://127.0.0.1:{options.port}/metrics")
        assert text is not None and "nova_database_up 1.0" in text
    finally:
        server.shutdown()
        server.server_close()

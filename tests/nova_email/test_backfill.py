"""Backfill against a real database and the Nylas simulator: listing, dedup, checkpoints, resume, hand-over."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import psycopg
import pytest

from nova_email import backfill
from nova_email.errors import InvalidJob
from nova_email.jobs import BackfillJob, ThreadSyncJob, structure_job
from nova_email.nylas.client import NylasClient
from nova_email.nylas.errors import ServerError
from nova_email.simulator.server import SimulatorHandle
from nova_email.thread_sync import sync_thread
from tests.nova_email.conftest import GRANT


class Crash(Exception):
    """Stands for the worker dying at this point."""


class CrashingClient(NylasClient):
    """A real client whose thread listing dies before fetching page `crash_before_page` (1-based)."""

    def __init__(self, *args: Any, crash_before_page: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash_before_page = crash_before_page
        self.pages = 0

    def list_threads(self, grant_id: str, **kwargs: Any) -> Any:
        if self.pages + 1 == self.crash_before_page:
            raise Crash
        self.pages += 1
        return super().list_threads(grant_id, **kwargs)


def queue_backfill(conn: psycopg.Connection, inbox_id: uuid.UUID, **window: datetime) -> BackfillJob:
    """Queue a backfill through the SQL API and read the job back from PGMQ, as the worker would."""
    conn.execute(
        "select * from queue_inbox_backfill(%s, null, %s, %s)", [inbox_id, window.get("start"), window.get("end")]
    )
    row = conn.execute("select message from pgmq.q_inbox_backfill_jobs order by msg_id desc limit 1").fetchone()
    assert row is not None
    return structure_job(row[0], BackfillJob)


def in_window(nylas: SimulatorHandle, job: BackfillJob) -> set[str]:
    start, end = job.start_date.timestamp(), job.end_date.timestamp()
    return {
        t["id"]
        for t in nylas.export(GRANT, with_bodies=False)["threads"]
        if start < t["latest_message_received_date"] < end
    }


def thread_jobs(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return [row[0] for row in conn.execute("select message from pgmq.q_thread_sync_jobs order by msg_id")]


def config_state(conn: psycopg.Connection, config_id: uuid.UUID) -> tuple[str, dict[str, Any]]:
    row = conn.execute(
        "select backfill_status, backfill_progress from flux_inbox_configurations where id = %s", [config_id]
    ).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.fixture
def job(conn: psycopg.Connection, inbox_id: uuid.UUID, nylas: SimulatorHandle) -> BackfillJob:
    end = datetime.fromtimestamp(nylas.simulator.anchor, UTC) + timedelta(days=1)
    return queue_backfill(conn, inbox_id, end=end)


def test_a_backfill_records_the_years_threads_and_fans_out_one_job_each(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, job: BackfillJob
) -> None:
    # When the backfill runs with small pages
    result = backfill.run_backfill(conn, client, job, page_size=7)

    # Then every thread of the last year, and only those, is tracked and has exactly one job
    expected = in_window(nylas, job)
    assert 0 < len(expected) < len(nylas.simulator.grants[GRANT].threads), "the mailbox spans more than a year"
    tracked = {
        r[0] for r in conn.execute("select nylas_thread_id from queued_threads where config_id = %s", [job.config_id])
    }
    assert tracked == expected
    jobs = thread_jobs(conn)
    assert sorted(j["thread_id"] for j in jobs) == sorted(expected)
    assert all(structure_job(j, ThreadSyncJob).config_id == job.config_id for j in jobs)
    assert result.threads_queued == result.jobs_sent == len(expected)
    assert result.pages == -(-len(expected) // 7)

    # And the configuration is in thread sync with its checkpoint cleared into last_run
    status, progress = config_state(conn, job.config_id)
    assert status == "thread_sync"
    assert "last_page_token" not in progress and progress["last_run"]["threads_queued"] == len(expected)
    stats = conn.execute(
        "select threads_total, threads_queued from inbox_sync_stats where config_id = %s", [job.config_id]
    ).fetchone()
    assert stats == (len(expected), len(expected))


@pytest.mark.parametrize("crash_before_page", [2, 4], ids=lambda n: f"crash-before-page-{n}")
def test_a_crash_mid_listing_resumes_at_the_next_page_without_fetching_a_saved_page(
    conn: psycopg.Connection,
    nylas: SimulatorHandle,
    client: NylasClient,
    job: BackfillJob,
    crash_before_page: int,
) -> None:
    expected = in_window(nylas, job)
    crashing = CrashingClient(api_key="k", api_uri=nylas.base_url, crash_before_page=crash_before_page)

    # Given a run that dies before fetching a page
    with pytest.raises(Crash):
        backfill.run_backfill(conn, crashing, job, page_size=5)
    status, progress = config_state(conn, job.config_id)
    assert status == "backfill" and progress["current_page"] == crash_before_page - 1
    assert thread_jobs(conn) == []  # nothing fanned out before the listing is complete

    # When the job runs again
    resumed = CrashingClient(api_key="k", api_uri=nylas.base_url, crash_before_page=0)
    result = backfill.run_backfill(conn, resumed, job, page_size=5)

    # Then it started after the saved page, and the union is exactly the window, each thread once
    total_pages = -(-len(expected) // 5)
    assert result.resumed_from_page == crash_before_page - 1
    assert crashing.pages + resumed.pages == total_pages
    assert sorted(j["thread_id"] for j in thread_jobs(conn)) == sorted(expected)


def test_a_crash_after_the_last_page_resumes_without_listing_again(
    conn: psycopg.Connection, nylas: SimulatorHandle, client: NylasClient, job: BackfillJob
) -> None:
    # Given a run that saved its last page and died before handing over (simulated by running the listing only)
    conn.execute("select start_backfill_run(%s)", [job.config_id])
    pages = list(
        client.iter_threads(
            GRANT,
            latest_message_after=job.start_date,
            latest_message_before=job.end_date,
            limit=200,
            select=backfill.LIST_FIELDS,
        )
    )
    threads = [
        {"id": t.id, "latest_message_received_date": int(t.latest_message_received_date.timestamp())}
        for t in pages[0].threads
    ]
    from psycopg.types.json import Jsonb

    conn.execute("select * from record_backfill_page(%s, %s, null, 1)", [job.config_id, Jsonb(threads)])
    listed_before = client.counter.snapshot().get(("threads.list", 200), 0)

    # When the job is redelivered
    result = backfill.run_backfill(conn, client, job)

    # Then no page is fetched again and every thread gets its job
    assert client.counter.snapshot().get(("threads.list", 200), 0) == listed_before
    assert result.pages == 0 and result.jobs_sent == len(threads)
    assert config_state(conn, job.config_id)[0] == "thread_sync"


def test_a_job_delivered_again_after_the_hand_over_does_nothing(
    conn: psycopg.Connection, client: NylasClient, job: BackfillJob
) -> None:
    backfill.run_backfill(conn, client, job)
    sent = len(thread_jobs(conn))
    again = backfill.run_backfill(conn, client, job)
    assert again.outcome == "already_done"
    assert len(thread_jobs(conn)) == sent


def test_a_job_for_an_unknown_configuration_is_an_invalid_job_and_calls_nothing(
    conn: psycopg.Connection, client: NylasClient, job: BackfillJob
) -> None:
    # Given a job whose configuration is gone (deleted with its inbox, or never made by queue_inbox_backfill)
    orphan = attrs.evolve(job, config_id=uuid.uuid4())

    # When it runs, it is refused with the reason (the actor dead-letters it) before any API call
    with pytest.raises(InvalidJob, match=f"configuration {orphan.config_id}, which does not exist"):
        backfill.run_backfill(conn, client, orphan)
    assert sum(client.counter.snapshot().values()) == 0

    # And recording its failure (the give-up hook does) finds no run to mark, without raising
    backfill.record_backfill_failure(conn, orphan, "invalid job, not retried: configuration does not exist")


def test_threads_already_stored_and_current_are_skipped(
    conn: psycopg.Connection, nylas: SimulatorHandle, client: NylasClient, inbox_id: uuid.UUID, job: BackfillJob
) -> None:
    expected = sorted(in_window(nylas, job))
    for thread_id in expected[:3]:
        sync_thread(conn, client, ThreadSyncJob(thread_id=thread_id, inbox_id=inbox_id, grant_id=GRANT))
    result = backfill.run_backfill(conn, client, job)
    assert result.threads_skipped == 3
    assert sorted(j["thread_id"] for j in thread_jobs(conn)) == expected[3:]


def test_a_job_over_more_than_a_year_lists_its_last_365_days(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, job: BackfillJob
) -> None:
    # Given a job of the original's, whose producer did not cap its window: two years
    two_years = attrs.evolve(job, start_date=job.end_date - timedelta(days=730))

    # When it runs
    result = backfill.run_backfill(conn, client, two_years)

    # Then it lists the year before its end, as a job of one year would, instead of being refused
    expected = in_window(nylas, attrs.evolve(job, start_date=job.end_date - timedelta(days=365)))
    assert result.threads_queued == len(expected) > 0
    tracked = {
        r[0] for r in conn.execute("select nylas_thread_id from queued_threads where config_id = %s", [job.config_id])
    }
    assert tracked == expected
    assert config_state(conn, job.config_id)[0] == "thread_sync"


def test_a_window_with_no_thread_completes_at_once(
    conn: psycopg.Connection, client: NylasClient, inbox_id: uuid.UUID, nylas: SimulatorHandle
) -> None:
    far_past = datetime(2001, 1, 1, tzinfo=UTC)
    job = queue_backfill(conn, inbox_id, start=far_past, end=far_past + timedelta(days=30))
    result = backfill.run_backfill(conn, client, job)
    assert result.jobs_sent == 0
    assert config_state(conn, job.config_id)[0] == "completed"


def test_an_expired_grant_fails_the_backfill_and_marks_the_inbox(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID, job: BackfillJob
) -> None:
    nylas.simulator.expire_grant(GRANT, emit=False)
    result = backfill.run_backfill(conn, client, job)
    assert result.outcome == "grant_expired"
    status, progress = config_state(conn, job.config_id)
    assert status == "failed" and "grant expired" in progress["error"]
    assert conn.execute("select status from flux_inboxes where id = %s", [inbox_id]).fetchone() == ("auth_expired",)


def test_a_transient_error_keeps_the_checkpoint_for_the_retry(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, job: BackfillJob
) -> None:
    nylas.faults.error_rate = 1.0
    with pytest.raises(ServerError):
        backfill.run_backfill(conn, client, job, page_size=5)
    nylas.faults.error_rate = 0.0
    result = backfill.run_backfill(conn, client, job, page_size=5)
    assert result.jobs_sent == len(in_window(nylas, job))


@pytest.fixture(autouse=True)
def _no_leftover_faults(nylas: SimulatorHandle) -> Iterator[None]:
    yield
    nylas.faults.error_rate = 0.0

"""Backfill against a real database and the Nylas simulator: listing, dedup, checkpoints, resume, hand-over."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import psycopg
import pytest
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from nova_email import backfill, queries
from nova_email.errors import InvalidJob
from nova_email.jobs import BackfillJob, ThreadSyncJob, structure_job
from nova_email.nylas.client import DEFAULT_BACKOFF_MAX_S, DEFAULT_MAX_RETRIES, THREAD_SELECT, NylasClient
from nova_email.nylas.errors import ServerError
from nova_email.simulator.server import SimulatorHandle
from nova_email.thread_sync import sync_thread
from tests.lost_webhooks import change_three_threads
from tests.mirror import mirror_differences
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
            select=THREAD_SELECT,
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


def sync_every_queued_thread(conn: psycopg.Connection, client: NylasClient) -> list[str]:
    """Run the thread job of every job on the thread queue, as the workers would; returns the thread ids."""
    jobs = [structure_job(j, ThreadSyncJob) for j in thread_jobs(conn)]
    for thread_job in jobs:
        sync_thread(conn, client, thread_job)
    conn.execute("select pgmq.purge_queue('thread_sync_jobs')")
    return [j.thread_id for j in jobs]


def complete_backfill(conn: psycopg.Connection, client: NylasClient, job: BackfillJob) -> None:
    """Run `job`'s backfill, every thread job it sends, and its completion."""
    backfill.run_backfill(conn, client, job)
    sync_every_queued_thread(conn, client)
    assert conn.execute("select complete_backfill_if_done(%s)", [job.config_id]).fetchone() is not None
    assert config_state(conn, job.config_id)[0] == "completed"


def window_start(job: BackfillJob) -> int:
    return int(job.start_date.timestamp())


def test_a_backfill_syncs_each_listed_thread_with_one_call_and_no_thread_get(
    conn: psycopg.Connection, nylas: SimulatorHandle, client: NylasClient, inbox_id: uuid.UUID, job: BackfillJob
) -> None:
    # When a backfill lists the inbox and every thread job runs
    backfill.run_backfill(conn, client, job, page_size=10)
    synced = sync_every_queued_thread(conn, client)

    # Then no thread was fetched again: one message list per thread (none has over 200 messages), and the listing
    calls = nylas.calls_by_endpoint()
    assert sorted(synced) == sorted(in_window(nylas, job))
    assert calls.get("threads.get", 0) == 0
    assert calls["messages.list"] == len(synced)
    assert calls["threads.list"] == -(-len(synced) // 10)
    # And the mirror equals the mailbox field by field
    assert mirror_differences(conn, inbox_id, nylas.export(GRANT), since=window_start(job)) == []


def test_a_thread_that_changes_between_listing_and_sync_is_fetched_and_the_newer_data_wins(
    conn: psycopg.Connection, nylas: SimulatorHandle, client: NylasClient, inbox_id: uuid.UUID, job: BackfillJob
) -> None:
    # Given a listing, after which three threads change at Nylas without webhooks: a reply, a read, a star
    backfill.run_backfill(conn, client, job)
    change_three_threads(nylas, GRANT, sorted(in_window(nylas, job)))

    # When the thread jobs run
    sync_every_queued_thread(conn, client)

    # Then exactly the changed threads were fetched again, and the mirror holds their new state
    assert nylas.calls_by_endpoint().get("threads.get", 0) == 3
    assert mirror_differences(conn, inbox_id, nylas.export(GRANT), since=window_start(job)) == []


def test_a_long_listing_runs_in_slices_each_continuing_from_the_checkpoint(
    conn: psycopg.Connection, nylas: SimulatorHandle, client: NylasClient, job: BackfillJob
) -> None:
    expected = in_window(nylas, job)
    pages = -(-len(expected) // 3)
    assert pages > 4
    runs = []
    current = job
    # When each run may list two pages of three threads
    while True:
        result = backfill.run_backfill(conn, client, current, page_size=3, slice_pages=2)
        runs.append(result)
        if result.outcome != "continued":
            break
        # Then it leaves the job that lists on, for the same inbox, grant and window
        row = conn.execute("select message from pgmq.q_inbox_backfill_jobs order by msg_id desc limit 1").fetchone()
        assert row is not None
        current = structure_job(row[0], BackfillJob)
        assert current == job
    # And together the runs listed every page once and fanned out each thread once
    assert [r.pages for r in runs] == [2] * (pages // 2) + ([pages % 2] if pages % 2 else [])
    assert sorted(j["thread_id"] for j in thread_jobs(conn)) == sorted(expected)
    assert nylas.calls_by_endpoint()["threads.list"] == pages
    assert config_state(conn, job.config_id)[0] == "thread_sync"


class InterruptingClient(NylasClient):
    """A real client; before its second page, another run of the same backfill records a page (a duplicate job)."""

    def __init__(self, *args: Any, conn: psycopg.Connection, config_id: uuid.UUID, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn, self.config_id, self.pages = conn, config_id, 0

    def list_threads(self, grant_id: str, **kwargs: Any) -> Any:
        self.pages += 1
        if self.pages == 2:
            self.conn.execute("select * from record_backfill_page(%s, %s, 'other', 2)", [self.config_id, Jsonb([])])
        return super().list_threads(grant_id, **kwargs)


def test_a_second_run_of_the_same_backfill_stops_instead_of_listing_alongside(
    conn: psycopg.Connection, nylas: SimulatorHandle, job: BackfillJob
) -> None:
    racing = InterruptingClient(api_key="k", api_uri=nylas.base_url, conn=conn, config_id=job.config_id)
    result = backfill.run_backfill(conn, racing, job, page_size=3)
    assert result.outcome == "superseded" and result.pages == 1
    status, progress = config_state(conn, job.config_id)
    assert status == "backfill" and progress["current_page"] == 2 and progress["last_page_token"] == "other"
    assert thread_jobs(conn) == []


def test_a_new_backfill_repairs_a_damaged_mirror_and_leaves_current_threads_alone(
    conn: psycopg.Connection, nylas: SimulatorHandle, client: NylasClient, inbox_id: uuid.UUID, job: BackfillJob
) -> None:
    # Given a completed backfill
    complete_backfill(conn, client, job)
    assert mirror_differences(conn, inbox_id, nylas.export(GRANT), since=window_start(job)) == []

    # And damage: messages of two threads deleted, one thread row deleted, three threads changed at Nylas with
    # their webhooks lost (a reply, a read, a star)
    threads = sorted(in_window(nylas, job))
    lost_messages, lost_thread = threads[0:2], threads[2]
    for thread_id in lost_messages:
        conn.execute(
            "delete from flux_email_messages where id = (select min(id::text)::uuid from flux_email_messages"
            " where inbox_id = %s and nylas_thread_id = %s)",
            [inbox_id, thread_id],
        )
    conn.execute("delete from flux_email_threads where inbox_id = %s and nylas_thread_id = %s", [inbox_id, lost_thread])
    changed = change_three_threads(nylas, GRANT, threads[3:])
    damaged = {*lost_messages, lost_thread, *changed}

    # When a new backfill of the inbox runs
    again = queue_backfill(conn, inbox_id, end=job.end_date)
    result = backfill.run_backfill(conn, client, again)
    synced = sync_every_queued_thread(conn, client)

    # Then exactly the damaged threads were synced again, whatever the first run recorded for them
    assert sorted(synced) == sorted(damaged)
    assert result.threads_queued == len(damaged) and result.threads_skipped == len(threads) - len(damaged)
    # And the mirror equals the mailbox again, field by field, and the backfill can complete
    assert mirror_differences(conn, inbox_id, nylas.export(GRANT), since=window_start(job)) == []
    conn.execute("select complete_backfill_if_done(%s)", [job.config_id])
    assert config_state(conn, job.config_id)[0] == "completed"


def test_a_listed_thread_with_a_draft_is_fetched_since_its_messages_cannot_vouch_for_it(
    conn: psycopg.Connection, nylas: SimulatorHandle, client: NylasClient, inbox_id: uuid.UUID, job: BackfillJob
) -> None:
    # Given a thread of the year holding a draft (drafts are not among the messages a thread job fetches)
    drafted = sorted(in_window(nylas, job))[0]
    nylas.simulator.add_draft(GRANT, thread_id=drafted, body="<p>not sent yet</p>")

    # When a backfill lists the inbox and every thread job runs
    backfill.run_backfill(conn, client, job)
    sync_every_queued_thread(conn, client)

    # Then that thread alone was fetched, and the mirror equals the mailbox
    assert nylas.calls_by_endpoint().get("threads.get", 0) == 1
    assert mirror_differences(conn, inbox_id, nylas.export(GRANT), since=window_start(job)) == []


def test_a_draft_saved_after_the_listing_is_mirrored_as_listed_until_the_next_backfill(
    conn: psycopg.Connection, nylas: SimulatorHandle, client: NylasClient, inbox_id: uuid.UUID, job: BackfillJob
) -> None:
    # Given a listing, after which a draft is saved in a thread listed without one: Nylas sends no webhook for it,
    # lists no draft among the thread's messages, and moves none of the thread's dates
    backfill.run_backfill(conn, client, job)
    drafted = sorted(in_window(nylas, job))[0]
    nylas.simulator.add_draft(GRANT, thread_id=drafted, body="<p>saved after the listing</p>")

    # When the thread jobs run
    sync_every_queued_thread(conn, client)

    # Then no thread was fetched, so that thread is mirrored as listed: the mirror lacks the draft, and only it
    assert nylas.calls_by_endpoint().get("threads.get", 0) == 0
    differences = mirror_differences(conn, inbox_id, nylas.export(GRANT), since=window_start(job))
    assert any(d.startswith(f"thread {drafted} has_drafts:") for d in differences)
    assert all(d.startswith(f"thread {drafted} ") for d in differences)
    # And the next backfill of the inbox brings the draft in: the mirror equals the mailbox
    conn.execute("select complete_backfill_if_done(%s)", [job.config_id])
    backfill.run_backfill(conn, client, queue_backfill(conn, inbox_id, end=job.end_date))
    assert sync_every_queued_thread(conn, client) == [drafted]
    assert mirror_differences(conn, inbox_id, nylas.export(GRANT), since=window_start(job)) == []


@attrs.frozen
class RunTimes:
    backfill_started_at: datetime
    sync_started_at: datetime


def run_times(conn: psycopg.Connection, config_id: uuid.UUID) -> RunTimes:
    with conn.cursor(row_factory=class_row(RunTimes)) as cur:
        times = cur.execute(
            "select c.backfill_started_at, s.sync_started_at from flux_inbox_configurations c"
            " join inbox_sync_stats s on s.config_id = c.id where c.id = %s",
            [config_id],
        ).fetchone()
    assert times is not None
    return times


def next_backfill_job(conn: psycopg.Connection) -> BackfillJob:
    row = conn.execute("select message from pgmq.q_inbox_backfill_jobs order by msg_id desc limit 1").fetchone()
    assert row is not None
    return structure_job(row[0], BackfillJob)


def test_a_continuation_keeps_the_runs_start_times(
    conn: psycopg.Connection, client: NylasClient, job: BackfillJob
) -> None:
    # Given a run that listed one slice and handed the rest to a new job
    assert backfill.run_backfill(conn, client, job, page_size=3, slice_pages=1).outcome == "continued"
    first = run_times(conn, job.config_id)

    # When the continuations list on
    while backfill.run_backfill(conn, client, next_backfill_job(conn), page_size=3, slice_pages=1).outcome == (
        "continued"
    ):
        pass

    # Then the run still started when its first slice did: progress and durations cover the whole listing
    assert run_times(conn, job.config_id) == first


def test_a_listing_hands_over_after_slice_s_seconds_however_few_pages(
    conn: psycopg.Connection, client: NylasClient, job: BackfillJob
) -> None:
    # When a run may list many pages but no time at all
    result = backfill.run_backfill(conn, client, job, page_size=3, slice_pages=1_000, slice_s=0.0)

    # Then it lists one page (a run always makes progress) and leaves the job that lists on
    assert result.outcome == "continued" and result.pages == 1
    assert next_backfill_job(conn) == job


def test_a_runs_time_limit_grows_with_the_nylas_timeout_and_holds_a_slice_and_its_slowest_page() -> None:
    for timeout_s in (5.0, 30.0, 120.0):
        limit_s = backfill.run_time_limit_ms(timeout_s) / 1000
        # A page is at most every attempt timing out on connect and read, plus the backoff between attempts
        slowest_page_s = (DEFAULT_MAX_RETRIES + 1) * 2 * timeout_s + DEFAULT_MAX_RETRIES * DEFAULT_BACKOFF_MAX_S
        assert limit_s >= backfill.SLICE_S + slowest_page_s
    assert backfill.run_time_limit_ms(120.0) > backfill.run_time_limit_ms(30.0)


def test_the_backfill_actors_time_limit_follows_nylas_timeout_s(db_url: str) -> None:
    # A worker process applies its settings to the actors when it boots (importing them reads none)
    boot = "from nova_email import actors; actors.broker.emit_after('process_boot')"
    shown = subprocess.run(
        [sys.executable, "-c", f"{boot}; print(actors.run_backfill.options['time_limit'])"],
        env={**os.environ, "DATABASE_URL": db_url, "NYLAS_API_KEY": "k", "NYLAS_TIMEOUT_S": "120"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert int(shown.stdout.strip().splitlines()[-1]) == backfill.run_time_limit_ms(120.0)


def test_a_finished_run_is_refused_under_the_configurations_lock(
    conn: psycopg.Connection, client: NylasClient, job: BackfillJob
) -> None:
    # Given a run that handed over to thread sync
    backfill.run_backfill(conn, client, job)
    # When a stale job of it starts a slice (after any status check of its own)
    with pytest.raises(psycopg.DatabaseError) as refused:
        conn.execute(queries.START_BACKFILL_SLICE, {"config_id": job.config_id})
    # Then the database refuses it, and the run stays handed over
    assert refused.value.sqlstate == backfill.RUN_FINISHED
    assert config_state(conn, job.config_id)[0] == "thread_sync"


def test_a_superseded_run_cannot_queue_a_continuation(
    conn: psycopg.Connection, client: NylasClient, job: BackfillJob
) -> None:
    # Given a run that listed page 1, and another run of the same backfill that recorded page 2 since
    backfill.run_backfill(conn, client, job, page_size=3, slice_pages=1)
    conn.execute("select pgmq.purge_queue('inbox_backfill_jobs')")
    conn.execute("select * from record_backfill_page(%s, %s, 'other', 2)", [job.config_id, Jsonb([])])
    # When the first run ends its slice at page 1
    with pytest.raises(psycopg.DatabaseError) as refused:
        conn.execute(queries.CONTINUE_BACKFILL_LISTING, {"config_id": job.config_id, "page": 1})
    # Then the database refuses it as superseded and no second listing job exists
    assert refused.value.sqlstate == backfill.SUPERSEDED
    assert conn.execute("select count(*) from pgmq.q_inbox_backfill_jobs").fetchone() == (0,)


def test_a_new_backfill_resyncs_a_thread_whose_message_was_deleted_at_nylas(
    conn: psycopg.Connection, nylas: SimulatorHandle, client: NylasClient, inbox_id: uuid.UUID, job: BackfillJob
) -> None:
    # Given a completed backfill, and then an older message of a thread deleted at Nylas with its webhook lost
    complete_backfill(conn, client, job)
    threads = nylas.simulator.grants[GRANT].threads
    thread_id = next(t for t in sorted(in_window(nylas, job)) if len(threads[t].messages) >= 2)
    nylas.simulator.delete_message(GRANT, threads[thread_id].messages[0].id, emit=False)

    # When a new backfill of the inbox runs
    backfill.run_backfill(conn, client, queue_backfill(conn, inbox_id, end=job.end_date))
    synced = sync_every_queued_thread(conn, client)

    # Then that thread alone was synced again, and its row lists exactly the messages Nylas holds
    assert synced == [thread_id]
    row = conn.execute(
        "select message_ids from flux_email_threads where inbox_id = %s and nylas_thread_id = %s", [inbox_id, thread_id]
    ).fetchone()
    assert row is not None and sorted(row[0]) == sorted(m.id for m in threads[thread_id].messages)


def test_a_new_backfill_resyncs_a_thread_that_gained_a_draft_at_nylas(
    conn: psycopg.Connection, nylas: SimulatorHandle, client: NylasClient, inbox_id: uuid.UUID, job: BackfillJob
) -> None:
    # Given a completed backfill, and then a draft saved in one of its threads (drafts have no webhook)
    complete_backfill(conn, client, job)
    drafted = sorted(in_window(nylas, job))[0]
    nylas.simulator.add_draft(GRANT, thread_id=drafted, body="<p>later</p>")

    # When a new backfill of the inbox runs
    backfill.run_backfill(conn, client, queue_backfill(conn, inbox_id, end=job.end_date))

    # Then that thread alone is synced again, and the mirror equals the mailbox after it
    assert sync_every_queued_thread(conn, client) == [drafted]
    assert mirror_differences(conn, inbox_id, nylas.export(GRANT), since=window_start(job)) == []

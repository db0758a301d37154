"""Backfills by real worker processes against the simulator, counting Nylas calls per endpoint: one call per thread,
the newer data winning over the listing, a re-run repairing a damaged mirror, and a 50,000-thread listing."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from nova_email import backfill
from nova_email.simulator.server import SimulatorHandle, serve_in_thread
from tests.mirror import mirror_differences
from tests.processes import ROOT, running_workers, wait_for

GRANT = "grant-calls"
BACKFILL_QUEUE = "inbox_backfill_jobs"


def worker_env(db_url: str, nylas: SimulatorHandle) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "NYLAS_API_URI": nylas.base_url,
        "NYLAS_API_KEY": "calls",
        "NYLAS_GRANT_RATE": "0",
        "THREAD_DELAY_MS": "0",
        "MESSAGE_DELAY_MS": "0",
        "API_DELAY_MS": "0",
        "COMPLETION_CHECK_INTERVAL_MS": "300",
        "POLL_INTERVAL_MS": "200",
        "LOG_LEVEL": "info",
    }


def start_backfill(db_url: str, nylas: SimulatorHandle) -> tuple[uuid.UUID, uuid.UUID]:
    """An inbox of the simulator's grant and a backfill of it queued through the SQL API: (inbox id, config id)."""
    end = datetime.fromtimestamp(nylas.simulator.anchor, UTC) + timedelta(days=1)
    with psycopg.connect(db_url, autocommit=True) as conn:
        inbox = conn.execute("insert into flux_inboxes (nylas_grant_id) values (%s) returning id", [GRANT]).fetchone()
        assert inbox is not None
        row = conn.execute("select config_id from queue_inbox_backfill(%s, null, null, %s)", [inbox[0], end]).fetchone()
    assert row is not None
    return inbox[0], row[0]


def config_row(db_url: str, config_id: uuid.UUID) -> dict[str, Any]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select backfill_status, backfill_start_date, backfill_end_date from flux_inbox_configurations where id = %s",
            [config_id],
        ).fetchone()
    assert row is not None
    return {"status": row[0], "start": int(row[1].timestamp()), "end": int(row[2].timestamp())}


def calls_by_endpoint(nylas: SimulatorHandle) -> dict[str, int]:
    calls: dict[str, int] = {}
    for (endpoint, _status), count in nylas.simulator.calls.snapshot().items():
        calls[endpoint] = calls.get(endpoint, 0) + count
    return calls


def change_three_threads(nylas: SimulatorHandle, candidates: list[str]) -> list[str]:
    """Three threads change at Nylas and their webhooks are lost: a reply comes, the one unread message of a thread is
    read, a message of an unstarred thread is starred."""
    threads = nylas.simulator.grants[GRANT].threads
    replied = candidates[0]
    read = next(t for t in candidates[1:] if sum(m.unread for m in threads[t].messages) == 1)
    starred = next(t for t in candidates[1:] if t != read and not any(m.starred for m in threads[t].messages))
    nylas.simulator.add_message(GRANT, thread_id=replied, emit=False)
    nylas.simulator.mark_read(GRANT, next(m for m in threads[read].messages if m.unread).id, emit=False)
    nylas.simulator.update_message(GRANT, threads[starred].messages[0].id, starred=True, emit=False)
    return [replied, read, starred]


def tracked_threads(db_url: str, config_id: uuid.UUID) -> list[str]:
    with psycopg.connect(db_url) as conn:
        return sorted(
            r[0] for r in conn.execute("select nylas_thread_id from queued_threads where config_id = %s", [config_id])
        )


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize("changed", [0, 3], ids=["listing-fresh", "three-changed-after-listing"])
def test_a_backfill_costs_one_call_per_thread_and_the_newer_data_wins(
    db_url: str, tmp_path: Path, changed: int
) -> None:
    # Given a mailbox of 300 threads (about 200 in the year) and a backfill whose listing the backfill processor
    # alone completes and fans out
    with serve_in_thread(seed=21, grants=[GRANT], threads_per_grant=300, large_body_share=0.0) as nylas:
        inbox_id, config_id = start_backfill(db_url, nylas)
        env = worker_env(db_url, nylas)
        with running_workers(env, tmp_path / "listing.log", queues=[BACKFILL_QUEUE]):
            wait_for(lambda: config_row(db_url, config_id)["status"] == "thread_sync", timeout_s=120, what="listing")
        listed = tracked_threads(db_url, config_id)
        # And `changed` threads change at Nylas before their jobs run, without webhooks
        if changed:
            change_three_threads(nylas, listed)

        # When every processor runs until the backfill completes
        with running_workers(env, tmp_path / "workers.log", processes=2, threads=4):
            wait_for(lambda: config_row(db_url, config_id)["status"] == "completed", timeout_s=180, what="completion")

        # Then each thread cost one message list, the listing one call per 200 threads, and only a thread that
        # changed after the listing was fetched again
        calls = calls_by_endpoint(nylas)
        assert 150 < len(listed) < 300
        assert calls.get("threads.get", 0) == changed
        assert calls["messages.list"] == len(listed)
        assert calls["threads.list"] == -(-len(listed) // 200)
        assert sum(calls.values()) / len(listed) <= 1.05
        # And the mirror holds what Nylas holds now, field by field
        with psycopg.connect(db_url) as conn:
            since = config_row(db_url, config_id)["start"]
            assert mirror_differences(conn, inbox_id, nylas.export(GRANT), since=since) == []


@pytest.mark.slow
@pytest.mark.processes
def test_a_new_backfill_repairs_a_damaged_mirror_end_to_end(db_url: str, tmp_path: Path) -> None:
    with serve_in_thread(seed=22, grants=[GRANT], threads_per_grant=200, large_body_share=0.0) as nylas:
        # Given a completed backfill
        inbox_id, config_id = start_backfill(db_url, nylas)
        env = worker_env(db_url, nylas)
        with running_workers(env, tmp_path / "first.log", processes=2, threads=4):
            wait_for(lambda: config_row(db_url, config_id)["status"] == "completed", timeout_s=180, what="first run")
        threads = tracked_threads(db_url, config_id)

        # And damage: a message of each of three threads deleted, one thread row deleted, three threads changed at
        # Nylas with their webhooks lost
        with psycopg.connect(db_url, autocommit=True) as conn:
            for thread_id in threads[0:3]:
                conn.execute(
                    "delete from flux_email_messages where id = (select min(id::text)::uuid from flux_email_messages"
                    " where inbox_id = %s and nylas_thread_id = %s)",
                    [inbox_id, thread_id],
                )
            conn.execute(
                "delete from flux_email_threads where inbox_id = %s and nylas_thread_id = %s", [inbox_id, threads[3]]
            )
            assert mirror_differences(conn, inbox_id, nylas.export(GRANT)) != []
        changed = change_three_threads(nylas, threads[4:])
        damaged = {*threads[0:4], *changed}
        calls_before = calls_by_endpoint(nylas)

        # When `nova-email backfill start` queues a new backfill of the inbox and the workers run it
        started = subprocess.run(
            [sys.executable, "-m", "nova_email.cli", "backfill", "start", str(inbox_id)],
            cwd=ROOT,
            env={**env, "PATH": str(Path(sys.executable).parent)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        wait_for(lambda: config_row(db_url, config_id)["status"] == "pending", timeout_s=10, what="the new backfill")
        with running_workers(env, tmp_path / "second.log", processes=2, threads=4):
            wait_for(lambda: config_row(db_url, config_id)["status"] == "completed", timeout_s=180, what="second run")

        # Then exactly the damaged threads were synced again (one message list each; the changed ones also fetched),
        # whatever the first run had recorded for them
        calls = calls_by_endpoint(nylas)
        assert calls["messages.list"] - calls_before["messages.list"] == len(damaged)
        assert calls.get("threads.get", 0) - calls_before.get("threads.get", 0) <= len(damaged)
        # And the mirror equals the mailbox again, field by field
        with psycopg.connect(db_url) as conn:
            since = config_row(db_url, config_id)["start"]
            assert mirror_differences(conn, inbox_id, nylas.export(GRANT), since=since) == []
            done = conn.execute(
                "select count(*) from queued_threads where config_id = %s and status = 'completed'", [config_id]
            ).fetchone()
        assert done == (len(threads),)


@pytest.mark.slow
@pytest.mark.processes
def test_a_listing_of_50000_threads_completes_in_slices(db_url: str, tmp_path: Path) -> None:
    # Given a mailbox of 50,000 threads (about 33,000 in the year: more pages than one run lists)
    with serve_in_thread(seed=23, grants=[GRANT], threads_per_grant=50_000, large_body_share=0.0) as nylas:
        inbox_id, config_id = start_backfill(db_url, nylas)
        with psycopg.connect(db_url) as conn:
            window = conn.execute(
                "select extract(epoch from backfill_start_date)::bigint, extract(epoch from backfill_end_date)::bigint"
                " from flux_inbox_configurations where id = %s",
                [config_id],
            ).fetchone()
        assert window is not None
        in_year = sum(
            1
            for t in nylas.simulator.grants[GRANT].threads.values()
            if window[0] <= (t.latest_received or 0) <= window[1]
        )
        pages = -(-in_year // 200)
        assert pages > backfill.SLICE_PAGES

        # When the backfill processor lists it
        with running_workers(worker_env(db_url, nylas), tmp_path / "listing.log", queues=[BACKFILL_QUEUE]) as w:
            wait_for(lambda: config_row(db_url, config_id)["status"] != "pending", timeout_s=60, what="start")
            wait_for(lambda: config_row(db_url, config_id)["status"] != "backfill", timeout_s=600, what="the listing")
            log = w.log()

        # Then the listing completed, over more than one run, and every thread of the year got its one job
        assert config_row(db_url, config_id)["status"] == "thread_sync"
        assert log.count("a new job lists on") >= 1
        with psycopg.connect(db_url) as conn:
            rows = conn.execute(
                "select count(*), count(distinct nylas_thread_id), count(msg_id) from queued_threads"
            ).fetchone()
            jobs = conn.execute("select count(*) from pgmq.q_thread_sync_jobs").fetchone()
        assert rows == (in_year, in_year, in_year)
        assert jobs == (in_year,)
        assert calls_by_endpoint(nylas) == {"threads.list": pages}

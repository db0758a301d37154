"""End to end: dramatiq worker processes backfill a 500+ thread inbox through 429s and 5xx while webhooks arrive."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from nova_email.simulator.faults import FaultConfig
from nova_email.simulator.server import start_in_thread
from nova_email.simulator.webhooks import SqlIntakeEmitter
from tests.mirror import mirror_differences
from tests.processes import running_workers, wait_for

GRANT = "grant-e2e"


@pytest.mark.slow
@pytest.mark.processes
def test_a_faulty_backfill_with_live_webhooks_ends_equal_to_the_mailbox(db_url: str, tmp_path: Path) -> None:
    # Given a mailbox of about 800 threads over 18 months, served with server errors and a rate limit (60/s) below
    # what our pacing allows (100/s), so 429s with Retry-After really happen
    faults = FaultConfig(rate_limit_per_s=60, rate_limit_burst=10, error_rate=0.03, seed=5)
    nylas = start_in_thread(
        seed=3,
        grants=[GRANT],
        threads_per_grant=800,
        faults=faults,
        emitter=SqlIntakeEmitter(db_url),
        large_body_share=0.0,
    )
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            inbox_id = conn.execute(
                "insert into flux_inboxes (nylas_grant_id) values (%s) returning id", [GRANT]
            ).fetchone()[0]  # type: ignore[index]
            end = datetime.fromtimestamp(nylas.simulator.anchor, UTC) + timedelta(days=1)
            config_id = conn.execute(
                "select config_id from queue_inbox_backfill(%s, null, null, %s)", [inbox_id, end]
            ).fetchone()[0]  # type: ignore[index]
            window_start = int((end - timedelta(days=365)).timestamp())

        env = {
            "DATABASE_URL": db_url,
            "NYLAS_API_URI": nylas.base_url,
            "NYLAS_API_KEY": "e2e",
            "NYLAS_GRANT_RATE": "100",
            "NYLAS_GRANT_BURST": "20",
            "COMPLETION_CHECK_INTERVAL_MS": "500",
            "POLL_INTERVAL_MS": "200",
            "LOG_LEVEL": "info",
        }
        # When two worker processes run every processor, while new mail and flag changes arrive as webhooks
        with running_workers(env, tmp_path / "workers.log", processes=2, threads=4) as workers:
            rng = random.Random(9)
            threads = list(nylas.simulator.grants[GRANT].threads)
            for i in range(30):
                if i % 3 == 0:
                    nylas.simulator.add_message(GRANT)  # a new conversation
                elif i % 3 == 1:
                    nylas.simulator.add_message(GRANT, thread_id=rng.choice(threads))
                else:
                    message_id = rng.choice(list(nylas.simulator.grants[GRANT].messages))
                    nylas.simulator.update_message(GRANT, message_id, starred=True)

            def finished() -> bool:
                with psycopg.connect(db_url) as conn:
                    status = conn.execute(
                        "select backfill_status from flux_inbox_configurations where id = %s", [config_id]
                    ).fetchone()
                    open_webhooks = conn.execute(
                        "select count(*) from flux_webhook_notifications where status not in ('processed', 'ignored')"
                    ).fetchone()
                return status == ("completed",) and open_webhooks == (0,)

            wait_for(finished, timeout_s=240, interval_s=1, what="the backfill to complete and webhooks to settle")
            log = workers.log()

        # Then the database equals the mailbox for the last year, field by field, with no duplicates
        export = nylas.export(GRANT)
        with psycopg.connect(db_url) as conn:
            assert mirror_differences(conn, inbox_id, export, since=window_start) == []
            stats = conn.execute(
                "select threads_total, threads_completed, threads_failed, percent_complete from get_sync_progress(%s)",
                [config_id],
            ).fetchone()
            webhooks = conn.execute("select status, count(*) from flux_webhook_notifications group by 1").fetchall()
            duplicates = conn.execute(
                "select count(*) - count(distinct (inbox_id, nylas_message_id)) from flux_email_messages"
            ).fetchone()
        tracked = [t for t in export["threads"] if t["latest_message_received_date"] > window_start]
        assert stats is not None and stats[0] >= 500 and stats[1] == stats[0] and stats[2] == 0
        assert stats[3] == 100
        assert sum(m["thread_id"] in {t["id"] for t in tracked} for m in export["messages"]) >= 2000
        assert duplicates == (0,)
        assert dict(webhooks).get("processed", 0) >= 30
        # And the faults really happened
        calls = nylas.simulator.calls.snapshot()
        assert any(status == 429 for (_, status) in calls), calls
        assert any(status >= 500 for (_, status) in calls), calls
        assert "Traceback" not in log or "RateLimited" in log or "ServerError" in log
    finally:
        nylas.stop()

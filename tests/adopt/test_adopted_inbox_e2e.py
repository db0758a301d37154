"""End to end on an adopted database: the original's queued jobs, a backfill and a webhook, by real workers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

from nova_email.migrate import migrate
from nova_email.simulator.server import start_in_thread
from tests.adopt.test_migrate_adopts import CONFIG, INBOX
from tests.mirror import mirror_differences
from tests.processes import running_workers, wait_for

GRANT = "grant-adopt"


def _scalar(url: str, query: str, *params: object) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(query.encode(), params).fetchone()
    return None if row is None else row[0]


@pytest.mark.slow
@pytest.mark.processes
def test_an_adopted_inbox_is_synced_by_our_workers(original_url: str, tmp_path: Path) -> None:
    nylas = start_in_thread(seed=11, grants=[GRANT], threads_per_grant=40)
    try:
        grant = nylas.simulator.grants[GRANT]
        waiting_thread = sorted(grant.threads)[0]
        updated_message = sorted(grant.messages)[-1]
        nylas.simulator.update_message(GRANT, updated_message, starred=True, emit=False)
        # Given the original's database, with a thread job and a webhook its producers queued before the switch
        with psycopg.connect(original_url, autocommit=True) as conn:
            conn.execute("select queue_thread_sync(%s, %s, %s, %s)", [waiting_thread, GRANT, INBOX, CONFIG])
            body = {"id": "wh-before", "type": "message.updated", "data": {"object": {"id": updated_message}}}
            conn.execute(
                "select queue_nylas_webhook_notification('wh-before', 'message.updated', %s, %s)", [GRANT, Jsonb(body)]
            )
            # When it is migrated and our workers start
            migrate(conn)
        env = {
            "DATABASE_URL": original_url,
            "NYLAS_API_URI": nylas.base_url,
            "NYLAS_API_KEY": "adopt",
            "COMPLETION_CHECK_INTERVAL_MS": "300",
            "POLL_INTERVAL_MS": "200",
        }
        with running_workers(env, tmp_path / "workers.log", processes=1, threads=4) as workers:
            # Then the jobs the original left on its queues are done
            wait_for(
                lambda: (
                    _scalar(
                        original_url, "select status from flux_webhook_notifications where webhook_id = 'wh-before'"
                    )
                    == "processed"
                ),
                timeout_s=60,
                what=f"the original's queued webhook\n{workers.log()[-2000:]}",
            )
            wait_for(
                lambda: (
                    _scalar(
                        original_url,
                        "select count(*) from flux_email_messages m join flux_email_threads t on t.id = m.thread_id"
                        " where t.nylas_thread_id = %s",
                        waiting_thread,
                    )
                    == sum(m.thread_id == waiting_thread for m in grant.messages.values())
                ),
                timeout_s=60,
                what="the original's queued thread job",
            )
            # And a backfill of the adopted inbox completes
            end = datetime.fromtimestamp(nylas.simulator.anchor, UTC) + timedelta(days=1)
            with psycopg.connect(original_url, autocommit=True) as conn:
                conn.execute("select queue_inbox_backfill(%s, null, null, %s)", [INBOX, end])
            wait_for(
                lambda: (
                    _scalar(original_url, "select backfill_status from flux_inbox_configurations where id = %s", CONFIG)
                    == "completed"
                ),
                timeout_s=120,
                what=f"the backfill of the adopted inbox\n{workers.log()[-2000:]}",
            )
            # And a webhook recorded by the original's receiver (an audit row, nothing else) is applied
            new = nylas.simulator.add_message(GRANT, thread_id=waiting_thread, emit=False)
            with psycopg.connect(original_url, autocommit=True) as conn:
                conn.execute(
                    "insert into flux_webhook_notifications (webhook_id, notification_type, grant_id, payload)"
                    " values ('wh-after', 'message.created', %s, %s)",
                    [GRANT, Jsonb({"id": "wh-after", "type": "message.created", "data": {"object": new}})],
                )
            wait_for(
                lambda: (
                    _scalar(original_url, "select status from flux_webhook_notifications where webhook_id = 'wh-after'")
                    == "processed"
                ),
                timeout_s=60,
                what="the webhook written by the original's receiver",
            )

        # And the inbox equals the mailbox, next to the original's history, which is still there
        with psycopg.connect(original_url) as conn:
            differences = mirror_differences(
                conn, INBOX, nylas.export(GRANT), since=int((end - timedelta(days=365)).timestamp())
            )
            history = conn.execute(
                "select count(*) from flux_email_messages where nylas_message_id like 'msg_orig_%'"
            ).fetchone()
        assert [d for d in differences if "_orig_" not in d] == []
        assert history == (3,)
        assert _scalar(
            original_url, "select starred from flux_email_messages where nylas_message_id = %s", updated_message
        )
    finally:
        nylas.stop()

"""Smoke tests of the two ways in: ``nova_email.start_backfill`` from Python, and ``nova-email run`` as a process."""

from __future__ import annotations

import signal
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

import nova_email
from nova_email.config import Settings
from tests.processes import Workers


def test_start_backfill_returns_the_config_id_and_queues_one_backfill_job(
    conn: psycopg.Connection, settings: Settings
) -> None:
    # Given an inbox
    row = conn.execute(
        "insert into flux_inboxes (nylas_grant_id, email) values ('grant-entry', 'a@b.example') returning id"
    ).fetchone()
    assert row is not None
    inbox_id: uuid.UUID = row[0]
    end = datetime(2025, 6, 1, tzinfo=UTC)

    # When another program starts its backfill through the package's public function
    config_id, msg_id = nova_email.start_backfill(str(inbox_id), end_date=end, settings=settings)

    # Then the inbox's configuration is that id, waiting for the job that now sits on the backfill queue
    with conn.cursor(row_factory=dict_row) as cur:
        config = cur.execute(
            "select id, inbox_id, backfill_status, backfill_msg_id from flux_inbox_configurations where id = %s",
            [config_id],
        ).fetchone()
        jobs = cur.execute("select msg_id, message from pgmq.q_inbox_backfill_jobs").fetchall()
    assert config == {"id": config_id, "inbox_id": inbox_id, "backfill_status": "pending", "backfill_msg_id": msg_id}
    assert [job["msg_id"] for job in jobs] == [msg_id]
    # (a bare payload, as any SQL producer sends it; the broker hands it to the queue's actor)
    payload = jobs[0]["message"]
    assert {k: payload[k] for k in ("inbox_id", "config_id", "grant_id")} == {
        "inbox_id": str(inbox_id),
        "config_id": str(config_id),
        "grant_id": "grant-entry",
    }
    # with the default window: the year before the end date
    assert datetime.fromisoformat(payload["end_date"]) == end
    assert datetime.fromisoformat(payload["start_date"]) == end - timedelta(days=365)


def _script() -> list[str]:
    """The installed ``nova-email`` console script, as a user runs it."""
    script = Path(sys.executable).with_name("nova-email")
    if not script.exists():
        pytest.fail(f"{script} is missing; install the project (pip install -e .) so its console script exists")
    return [str(script)]


@pytest.mark.processes
@pytest.mark.slow
def test_nova_email_run_completion_starts_workers_and_exits_0_on_sigterm(db_url: str, tmp_path: Path) -> None:
    # Given the completion processor started as an operator would
    env = {"DATABASE_URL": db_url, "NYLAS_API_KEY": "entry-points", "LOG_LEVEL": "info"}
    args = ["run", "completion", "--processes", "1", "--threads", "1"]
    workers = Workers(env, tmp_path / "run.log", args, command=_script())
    try:
        workers.wait_ready(1)

        # When it is asked to stop
        workers.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = workers.process.wait(timeout=15)
        stopped_after_s = time.monotonic() - started
    finally:
        workers.stop()

    # Then it stopped cleanly within a few seconds, having consumed only the completion queue
    log = workers.log()
    assert code == 0, log[-3000:]
    assert stopped_after_s < 10, log[-3000:]
    assert "--queues completion_monitor" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

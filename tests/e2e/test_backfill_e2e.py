"""End to end: dramatiq worker processes backfill a 500+ thread inbox through 429s and 5xx while webhooks arrive."""

from __future__ import annotations

import random
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from nova_email.simulator.faults import FaultConfig
from nova_email.simulator.server import SimulatorHandle, start_in_thread
from nova_email.simulator.webhooks import TRUNCATE_OVER_BYTES, SqlIntakeEmitter
from tests.mirror import mirror_differences
from tests.processes import running_workers

GRANT = "grant-e2e"
#: The backfill progress (percent of threads finished) that releases each wave of mailbox changes.
WAVE_AT_PERCENT = (0, 20, 40, 60, 80)
#: The wave whose reply is too large for a webhook, so Nylas sends ``message.created.truncated`` without its body.
LARGE_WAVE = 2
#: A body just over the webhook limit, so the whole message JSON is too.
LARGE_BODY = "<p>" + "Quarterly figures, line by line. " * (TRUNCATE_OVER_BYTES // 33 + 1000) + "</p>"
#: The first line of a log record: ours (loguru) or the dramatiq main process's own.
_RECORD_START = re.compile(
    r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \| (?P<level>[A-Z]+) +\| "
    r"|\[\d{4}-\d\d-\d\d [\d:,]+\] \[PID \d+\] \[[^]]*\] \[[^]]*\] \[(?P<main_level>[A-Z]+)\] )"
)
#: The one failure a healthy run may log: a call that met a 5xx on its every attempt (3 % error rate, 4 attempts, so
#: about one run in 300), which dramatiq reports with its traceback before it retries the job.
_EXPECTED_FAILURE = re.compile(
    r"\| ERROR +\| \[WorkerThread\] Failed to process message \w+\[[\w-]+\](?: \(.*\))? with unhandled exception\.\n"
    r"Traceback \(most recent call last\):\n(?:  .*\n)+"
    r"nova_email\.nylas\.errors\.ServerError: Nylas failed on .* \(5\d\d [^)]*\).* after 3 retries; retry later\n?$"
)


def unexpected_log_records(log: str) -> list[str]:
    """The records of a worker log at WARNING or above, or with a traceback, that are not `_EXPECTED_FAILURE`."""
    records: list[list[str]] = []
    for line in log.splitlines():
        if _RECORD_START.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)
    unexpected = []
    for lines in records:
        record = "\n".join(lines)
        start = _RECORD_START.match(lines[0])
        level = (start.group("level") or start.group("main_level")) if start else None
        if level in {"WARNING", "ERROR", "CRITICAL"} or "Traceback" in record or start is None:
            if not _EXPECTED_FAILURE.search(record):
                unexpected.append(record)
    return unexpected


def _progress(db_url: str, config_id: uuid.UUID) -> tuple[str, float]:
    """The backfill's status and percent of threads finished."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select backfill_status, coalesce(percent_complete, 0) from get_sync_progress(%s)", [config_id]
        ).fetchone()
    assert row is not None
    return row[0], float(row[1])


def _open_webhooks(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select count(*) from flux_webhook_notifications where status not in ('processed', 'ignored')"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _send_wave(nylas: SimulatorHandle, wave: int, rng: random.Random) -> str | None:
    """Six changes to the mailbox, each announced by a webhook; returns the id of the large message, if any."""
    grant = nylas.simulator.grants[GRANT]
    nylas.simulator.add_message(GRANT)  # a new conversation
    for _ in range(2):
        nylas.simulator.add_message(GRANT, thread_id=rng.choice(sorted(grant.threads)))  # a reply
    nylas.simulator.update_message(GRANT, rng.choice(sorted(grant.messages)), starred=True)
    nylas.simulator.mark_read(GRANT, rng.choice(sorted(grant.messages)))
    if wave != LARGE_WAVE:
        nylas.simulator.add_message(GRANT, thread_id=rng.choice(sorted(grant.threads)))
        return None
    large = nylas.simulator.add_message(GRANT, thread_id=rng.choice(sorted(grant.threads)), body=LARGE_BODY)
    return str(large["id"])


@pytest.mark.slow
@pytest.mark.processes
def test_a_faulty_backfill_with_live_webhooks_ends_equal_to_the_mailbox(db_url: str, tmp_path: Path) -> None:
    # Given a mailbox of about 800 threads over 18 months, a few of its messages with 100-400 kB bodies, served with
    # server errors and a rate limit (25/s) well below what our pacing allows (100/s), so 429s with Retry-After happen
    # even on a busy machine (at one call per thread the workers ask for fewer calls per second than they used to)
    faults = FaultConfig(rate_limit_per_s=25, rate_limit_burst=10, error_rate=0.03, seed=5)
    nylas = start_in_thread(
        seed=3,
        grants=[GRANT],
        threads_per_grant=800,
        faults=faults,
        emitter=SqlIntakeEmitter(db_url),
        large_body_share=0.002,
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
        # When two worker processes run every processor, while new mail and flag changes arrive as webhooks in
        # waves spread over the backfill (one of them with a message too large for its webhook)
        rng = random.Random(9)
        waves: list[tuple[str, float]] = []
        large_id = None
        with running_workers(env, tmp_path / "workers.log", processes=2, threads=4) as workers:
            deadline = time.monotonic() + 240
            while True:
                status, percent = _progress(db_url, config_id)
                if status == "completed" and _open_webhooks(db_url) == 0:
                    break
                if len(waves) < len(WAVE_AT_PERCENT) and percent >= WAVE_AT_PERCENT[len(waves)]:
                    large_id = _send_wave(nylas, len(waves), rng) or large_id
                    waves.append((status, percent))
                assert time.monotonic() < deadline, f"not done after 240 s: {status} {percent}%, waves {waves}"
                time.sleep(0.2)
            log = workers.log()

        # Then every wave arrived while the backfill was still running
        assert len(waves) == len(WAVE_AT_PERCENT), waves
        assert all(status != "completed" for status, _ in waves), waves
        # And the database equals the mailbox for the last year, field by field, with no duplicates
        export = nylas.export(GRANT)
        with psycopg.connect(db_url) as conn:
            assert mirror_differences(conn, inbox_id, export, since=window_start) == []
            stats = conn.execute(
                "select threads_total, threads_completed, threads_failed, percent_complete from get_sync_progress(%s)",
                [config_id],
            ).fetchone()
            webhooks = conn.execute("select status, count(*) from flux_webhook_notifications group by 1").fetchall()
            truncated = conn.execute(
                "select status, count(*) from flux_webhook_notifications"
                " where notification_type = 'message.created.truncated' group by 1"
            ).fetchall()
            large_body = conn.execute(
                "select length(body) from flux_email_messages where nylas_message_id = %s", [large_id]
            ).fetchone()
            duplicates = conn.execute(
                "select count(*) - count(distinct (inbox_id, nylas_message_id)) from flux_email_messages"
            ).fetchone()
        tracked = [t for t in export["threads"] if t["latest_message_received_date"] > window_start]
        assert stats is not None and stats[0] >= 500 and stats[1] == stats[0] and stats[2] == 0
        assert stats[3] == 100
        assert sum(m["thread_id"] in {t["id"] for t in tracked} for m in export["messages"]) >= 2000
        assert duplicates == (0,)
        assert dict(webhooks).get("processed", 0) >= 6 * len(WAVE_AT_PERCENT)
        # And the truncated webhook's message was fetched whole
        assert truncated == [("processed", 1)]
        assert large_body == (len(LARGE_BODY),)
        # And the faults really happened, and the workers logged nothing else going wrong
        calls = nylas.simulator.calls.snapshot()
        assert any(status == 429 for (_, status) in calls), calls
        assert any(status >= 500 for (_, status) in calls), calls
        assert unexpected_log_records(log) == []
    finally:
        nylas.stop()


def test_the_log_check_lets_through_only_a_server_error_that_outlasted_its_retries() -> None:
    info = "2026-11-29 18:39:19.128 | INFO     | [Periodic] Scheduling 2 periodic actors, polling every 500 ms"
    main = "[2026-11-29 18:39:19,131] [PID 9643] [MainThread] [dramatiq.MainProcess] [INFO] Dramatiq is booting up."
    failed = (
        "2026-11-29 18:40:23.652 | ERROR    | [WorkerThread] Failed to process message"
        " sync_thread[4f6c1a52-0d1e-4a55-9a3e-0c2b7d2f9b10] (thread_id=thr_1)"
        " with unhandled exception.\nTraceback (most recent call last):\n"
        '  File "/app/nova_email/actors.py", line 147, in sync_thread\n'
        "    result = thread_sync.sync_thread(conn, nylas_client(settings), job)\n"
        "EXCEPTION"
    )
    server_error = (
        "nova_email.nylas.errors.ServerError: Nylas failed on thread 'thr_1' of grant 'g' (503 api.internal_error,"
        " request r1): - after 3 retries; retry later"
    )
    rate_limited = "nova_email.nylas.errors.RateLimited: Nylas rate-limited thread 'thr_1'; retry after 1000 ms"
    warning = "2026-11-29 18:40:24.000 | WARNING  | [Retries] Retries exceeded for message 'abc'."
    main_warning = "[2026-11-29 18:39:19,131] [PID 9643] [MainThread] [dramatiq.MainProcess] [WARNING] Worker died."
    expected = failed.replace("EXCEPTION", server_error)

    assert unexpected_log_records("\n".join([main, info, expected, info])) == []
    for bad in (failed.replace("EXCEPTION", rate_limited), warning, main_warning, f"{info}\nTraceback (most recent"):
        assert unexpected_log_records("\n".join([info, bad, info])) == [bad]

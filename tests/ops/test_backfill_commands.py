"""``nova-email backfill start|progress|retry`` against a real database, changes made through the SQL API."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import LiteralString

import psycopg
import pytest
from psycopg.rows import dict_row

from nova_email.config import Settings
from nova_email.ops.backfill import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    add_backfill_arguments,
    run_backfill,
    watch_progress,
)
from nova_email.ops.progress import BackfillProgress, render_progress_line

from .conftest import Inbox, parse, queue_backfill


def _backfill(settings: Settings, *argv: str) -> int:
    return run_backfill(settings, parse(add_backfill_arguments, list(argv)))


def _config(conn: psycopg.Connection, config_id: uuid.UUID) -> dict[str, object]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("select * from flux_inbox_configurations where id = %s", [config_id]).fetchone()
    assert row is not None
    return row


def _jobs(conn: psycopg.Connection) -> list[dict[str, object]]:
    return [row[0] for row in conn.execute("select message from pgmq.q_inbox_backfill_jobs order by msg_id")]


@pytest.mark.parametrize("ref", ["id", "email", "grant_id"])
def test_start_queues_a_backfill_of_an_inbox_named_by_id_address_or_grant(
    conn: psycopg.Connection, settings: Settings, inbox: Inbox, ref: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _backfill(settings, "start", str(getattr(inbox, ref))) == 0

    (job,) = _jobs(conn)
    assert job["inbox_id"] == str(inbox.id)
    config = _config(conn, uuid.UUID(str(job["config_id"])))
    assert config["backfill_status"] == "pending"
    assert f"Queued backfill {job['config_id']} of inbox {inbox.id}" in capsys.readouterr().out


def test_start_with_a_window_passes_it_to_queue_inbox_backfill(
    conn: psycopg.Connection, settings: Settings, inbox: Inbox
) -> None:
    assert _backfill(settings, "start", inbox.email, "--start", "2026-01-01", "--end", "2026-03-01T12:00:00+00:00") == 0

    (job,) = _jobs(conn)
    config = _config(conn, uuid.UUID(str(job["config_id"])))
    assert config["backfill_start_date"] == datetime(2026, 1, 1, tzinfo=UTC)
    assert config["backfill_end_date"] == datetime(2026, 3, 1, 12, tzinfo=UTC)


def test_start_refuses_a_second_backfill_while_one_is_active(
    conn: psycopg.Connection, settings: Settings, inbox: Inbox, capsys: pytest.CaptureFixture[str]
) -> None:
    queue_backfill(conn, inbox)

    assert _backfill(settings, "start", str(inbox.id)) == EXIT_FAILED

    assert len(_jobs(conn)) == 1
    assert "already" in capsys.readouterr().err


def test_start_of_an_unknown_inbox_says_so(
    conn: psycopg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _backfill(settings, "start", "nobody@nowhere.example") == 2
    assert "no single inbox" in capsys.readouterr().err
    assert _jobs(conn) == []


def test_retry_of_a_failed_backfill_keeps_its_window_and_checkpoint(
    conn: psycopg.Connection, settings: Settings, inbox: Inbox, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a backfill that failed on page 3 with a checkpoint
    config_id = queue_backfill(conn, inbox)
    conn.execute("select start_backfill_run(%s)", [config_id])
    conn.execute("select update_backfill_orchestration_progress(%s, 250, 3, 'page-token-3')", [config_id])
    conn.execute("select record_backfill_failure(%s, 'Nylas 503 three times')", [config_id])
    before = _config(conn, config_id)

    # When the operator retries it
    assert _backfill(settings, "retry", str(config_id)) == 0

    # Then it is pending again over the same window, with a new job, resuming from page 3
    after = _config(conn, config_id)
    assert after["backfill_status"] == "pending"
    assert (after["backfill_start_date"], after["backfill_end_date"]) == (
        before["backfill_start_date"],
        before["backfill_end_date"],
    )
    progress = after["backfill_progress"]
    assert isinstance(progress, dict)
    assert (progress["last_page_token"], progress["current_page"]) == ("page-token-3", 3)
    assert len(_jobs(conn)) == 2
    assert "resumes from its checkpoint" in capsys.readouterr().out


def test_retry_of_an_active_backfill_needs_force_and_records_why(
    conn: psycopg.Connection, settings: Settings, inbox: Inbox, capsys: pytest.CaptureFixture[str]
) -> None:
    config_id = queue_backfill(conn, inbox)
    conn.execute("select start_backfill_run(%s)", [config_id])

    assert _backfill(settings, "retry", str(config_id)) == EXIT_FAILED
    assert "--force" in capsys.readouterr().err
    assert _config(conn, config_id)["backfill_status"] == "backfill"

    assert _backfill(settings, "retry", str(config_id), "--force") == 0
    config = _config(conn, config_id)
    assert config["backfill_status"] == "pending"
    progress = config["backfill_progress"]
    assert isinstance(progress, dict)
    assert progress["errors"][-1]["error"] == "retry forced by an operator while backfill"
    assert len(_jobs(conn)) == 2


def test_retry_of_an_unknown_config_and_of_a_non_uuid_exit_2(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _backfill(settings, "retry", str(uuid.uuid4())) == 2
    assert "no backfill configuration" in capsys.readouterr().err
    assert _backfill(settings, "retry", "not-a-uuid") == 2
    assert "is not a configuration id" in capsys.readouterr().err


@contextmanager
def _in_background(
    db_url: str, statements: Sequence[tuple[LiteralString, Sequence[object]]], after: threading.Event
) -> Iterator[None]:
    """Run `statements` on their own connection once `after` is set (the progress bar has drawn once)."""

    def work() -> None:
        assert after.wait(10)
        with psycopg.connect(db_url, autocommit=True) as conn:
            for query, params in statements:
                conn.execute(query, params)

    thread = threading.Thread(target=work)
    thread.start()
    try:
        yield
    finally:
        after.set()
        thread.join(10)


class _Output(io.StringIO):
    """Captures the bar's lines and signals after the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.first_line = threading.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        if "\n" in text:
            self.first_line.set()
        return written


def test_progress_follows_the_backfill_until_sql_completes_it(
    db_url: str, conn: psycopg.Connection, settings: Settings, thread_sync_backfill: uuid.UUID
) -> None:
    # Given a backfill at 50%, and another connection that finishes its threads and completes it through SQL
    out = _Output()
    finish = [
        (
            "update queued_threads set status = 'completed', messages_synced = 3 where config_id = %s and status <> 'failed'",
            [thread_sync_backfill],
        ),
        ("select complete_backfill_if_done(%s)", [thread_sync_backfill]),
    ]
    with _in_background(db_url, finish, out.first_line):
        # When the operator watches it
        code = watch_progress(
            lambda: psycopg.connect(db_url, autocommit=True),
            thread_sync_backfill,
            interval_s=0.05,
            timeout_s=20,
            out=out,
        )

    # Then the bar went from 50% to 100% and the command exits 0 with a summary
    lines = out.getvalue().splitlines()
    assert code == 0, lines
    assert " 50.0%" in lines[0] and "threads 5/10" in lines[0]
    assert any("100.0%" in line and "completed" in line for line in lines)
    assert lines[-1] == f"Backfill {thread_sync_backfill} completed: 9 threads, 1 failed, 27 messages."


def test_progress_exits_1_with_the_error_when_the_backfill_fails(
    db_url: str, settings: Settings, thread_sync_backfill: uuid.UUID
) -> None:
    out = _Output()
    fail = [("select record_backfill_failure(%s, 'grant expired')", [thread_sync_backfill])]
    with _in_background(db_url, fail, out.first_line):
        code = watch_progress(
            lambda: psycopg.connect(db_url, autocommit=True),
            thread_sync_backfill,
            interval_s=0.05,
            timeout_s=20,
            out=out,
        )

    assert code == EXIT_FAILED
    assert f"Backfill {thread_sync_backfill} failed: grant expired" in out.getvalue()
    assert f"nova-email backfill retry {thread_sync_backfill}" in out.getvalue()


def test_progress_gives_up_after_its_timeout(
    settings: Settings, thread_sync_backfill: uuid.UUID, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _backfill(settings, "progress", str(thread_sync_backfill), "--interval", "0.05", "--timeout", "0.3")

    assert code == EXIT_TIMEOUT
    assert "Timed out after 0.3 s; the backfill is still thread_sync." in capsys.readouterr().out


def test_progress_of_an_unknown_config_exits_2(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert _backfill(settings, "progress", str(uuid.uuid4()), "--timeout", "1") == 2
    assert "no backfill configuration" in capsys.readouterr().err


def _progress(**changes: object) -> BackfillProgress:
    start = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    values: dict[str, object] = {
        "config_id": uuid.UUID(int=1),
        "inbox_id": uuid.UUID(int=2),
        "email": "a@example.org",
        "backfill_status": "thread_sync",
        "threads_total": 1000,
        "threads_queued": 700,
        "threads_processing": 50,
        "threads_completed": 240,
        "threads_failed": 10,
        "messages_synced": 2400,
        "percent_complete": Decimal("25.00"),
        "backfill_started_at": start,
        "backfill_completed_at": None,
        "sync_started_at": start,
        "last_thread_at": start + timedelta(seconds=100),
        "sync_completed_at": None,
        "backfill_requested_at": start,
        "last_error": None,
        "observed_at": start + timedelta(seconds=100),
    }
    values.update(changes)
    return BackfillProgress(**values)  # type: ignore[arg-type]


def test_rate_and_eta_come_from_finished_threads_since_the_run_started() -> None:
    progress = _progress()

    assert progress.rate_per_s == pytest.approx(2.5)  # 250 threads in 100 s
    assert progress.eta_s == pytest.approx(300.0)  # 750 left at 2.5/s
    line = render_progress_line(progress)
    assert line.startswith("[########----------------------]  25.0%")
    assert "threads 250/1,000 (queued 700, processing 50, failed 10)" in line
    assert "messages 2,400" in line and "rate 2.5/s" in line and "ETA 5m00s" in line


def test_eta_is_unknown_before_the_first_thread_and_zero_once_finished() -> None:
    assert _progress(threads_completed=0, threads_failed=0).eta_s is None
    assert "ETA -" in render_progress_line(_progress(threads_completed=0, threads_failed=0))
    assert _progress(backfill_status="completed").eta_s == 0.0


def test_on_a_terminal_the_bar_is_redrawn_in_place(db_url: str, thread_sync_backfill: uuid.UUID) -> None:
    out = io.StringIO()

    code = watch_progress(
        lambda: psycopg.connect(db_url, autocommit=True),
        thread_sync_backfill,
        interval_s=0.05,
        timeout_s=0.3,
        out=out,
        live=True,
    )

    text = out.getvalue()
    assert code == EXIT_TIMEOUT
    bar, summary = text.rsplit("\n", 2)[:2]
    assert bar.count("\r") >= 2 and "\n" not in bar  # several refreshes, all on one line
    assert summary.startswith("Timed out after 0.3 s")

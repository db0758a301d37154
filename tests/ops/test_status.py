"""``nova-email status`` against a real database: each section shows what the SQL API reports."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.types.json import Jsonb

from nova_email.config import Settings
from nova_email.errors import DatabaseError
from nova_email.ops.status import add_status_arguments, collect_status, render_status, run_status

from ..conftest import with_database
from .conftest import Inbox, make_dead_letter, parse


def _status(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert run_status(settings, parse(add_status_arguments, list(argv))) == 0
    return capsys.readouterr().out


def test_status_of_an_idle_service_lists_the_empty_queues_and_no_backfills(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _status(settings, capsys)

    for queue in ("nylas_webhook_notifications", "inbox_backfill_jobs", "thread_sync_jobs"):
        assert any(line.split()[:2] == [queue, "0"] for line in out.splitlines()), out
    active = out.split("Active backfills")[1].split("Webhooks in the last")[0]
    assert "(none)" in active
    assert "Webhooks in the last 1h00m" in out
    assert out.rstrip().endswith("(none)")  # no recent failures


def test_status_reports_depth_in_flight_dead_letters_backfills_webhooks_and_failures(
    conn: psycopg.Connection,
    settings: Settings,
    thread_sync_backfill: uuid.UUID,
    inbox: Inbox,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given three thread jobs, one of them taken by a worker, and one dead letter on the thread queue
    for n in range(3):
        conn.execute("select flux_pgmq_send('thread_sync_jobs', %s)", [Jsonb({"thread_id": f"t{n}"})])
    conn.execute("select * from pgmq.read('thread_sync_jobs', 60, 1)")
    make_dead_letter(conn, "thread_sync_jobs", {"thread_id": "poison"}, error="cannot decode thread t-poison")
    # and webhooks: two processed, one in error
    for n, status in enumerate(["processed", "processed", "error"]):
        row = conn.execute(
            "select notification_id from queue_nylas_webhook_notification(%s, 'message.created', %s, %s)",
            [f"wh-{n}", inbox.grant_id, Jsonb({"type": "message.created"})],
        ).fetchone()
        assert row is not None
        conn.execute(
            "select acknowledge_webhook_notification(%s, %s, %s, 12)",
            [row[0], status, "Nylas said 500 twice" if status == "error" else None],
        )
    # and the backfill's failed thread carries an error
    conn.execute(
        "update queued_threads set status = 'failed', error_message = 'thread vanished at Nylas'"
        " where config_id = %s and status = 'failed'",
        [thread_sync_backfill],
    )

    # When the operator asks for the status
    out = _status(settings, capsys)
    report = json.loads(_status(settings, capsys, "--json"))

    # Then the thread queue shows 2 ready, 1 in flight and the dead letter
    queues = {q["queue_name"]: q for q in report["queues"]}
    assert queues["thread_sync_jobs"]["queued"] == 2
    assert queues["thread_sync_jobs"]["in_flight"] == 1
    assert queues["thread_sync_jobs"]["dead_lettered"] == 1
    assert queues["inbox_backfill_jobs"]["queued"] == 1  # the backfill's own job, never consumed here
    # the active backfill with its percent (5 of 10 threads finished) and counters
    (backfill,) = report["backfills"]
    assert backfill["config_id"] == str(thread_sync_backfill)
    assert backfill["backfill_status"] == "thread_sync"
    assert backfill["percent_complete"] == 50.0
    assert (backfill["threads_completed"], backfill["threads_failed"], backfill["threads_queued"]) == (4, 1, 4)
    assert backfill["messages_synced"] == 12
    # webhook activity by type and status
    webhooks = {(w["notification_type"], w["status"]): w["count"] for w in report["webhooks"]}
    assert webhooks == {("message.created", "processed"): 2, ("message.created", "error"): 1}
    # and the recent failures of every kind, with their errors
    errors = {f["kind"]: f["error"] for f in report["failures"]}
    assert errors["webhook"] == "Nylas said 500 twice"
    assert errors["thread"] == "thread vanished at Nylas"
    assert "cannot decode thread t-poison" in errors["dead_letter"]
    # The table says the same for humans
    assert "thread_sync" in out and "50.0%" in out and "5/10" in out
    assert "Nylas said 500 twice" in out and "thread vanished at Nylas" in out
    assert inbox.email in out


def test_status_lists_a_failed_backfill_among_recent_failures(
    conn: psycopg.Connection, inbox: Inbox, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    row = conn.execute("select config_id from queue_inbox_backfill(%s)", [inbox.id]).fetchone()
    assert row is not None
    conn.execute("select record_backfill_failure(%s, 'grant expired during listing')", [row[0]])

    report = json.loads(_status(settings, capsys, "--json"))

    assert report["backfills"] == []  # failed is not active
    assert {"kind": "backfill", "error": "grant expired during listing"}.items() <= report["failures"][0].items()


def test_status_never_shows_the_database_password(
    db_url: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    parts = urlsplit(db_url)
    user = parts.username or "postgres"
    host = parts.netloc.rsplit("@", 1)[-1]
    # A server that trusts local connections accepts any password; one that checks them (the embedded server)
    # keeps its own, which must then stay hidden.
    password = parts.password or "hunter2-secret"
    with_password = urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))
    secret_settings = Settings(database_url=with_password, data_dir=settings.data_dir)

    text = _status(secret_settings, capsys)
    as_json = _status(secret_settings, capsys, "--json")

    for out in (text, as_json):
        assert password not in out
        assert f"{user}:***@{host}" in out


def test_render_status_cuts_long_multi_line_errors_to_one_line(conn: psycopg.Connection, inbox: Inbox) -> None:
    make_dead_letter(conn, "thread_sync_jobs", {"thread_id": "x"}, error="line one\nline two " + "x" * 500)

    text = render_status(collect_status(conn, database="test"))

    failure_lines = [line for line in text.splitlines() if "dead_letter" in line]
    assert len(failure_lines) == 1
    assert "line one line two" in failure_lines[0]
    assert failure_lines[0].endswith("…")


def test_status_of_an_unreachable_or_unmigrated_database_says_what_to_do(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    down = Settings(database_url=f"postgresql://nova:pw@127.0.0.1:{free_port}/nova", data_dir=tmp_path)
    with pytest.raises(DatabaseError, match="cannot connect to postgresql://nova:\\*\\*\\*@.*check DATABASE_URL"):
        _status(down, capsys)

    empty_db = f"nova_ops_unmigrated_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(f'create database "{empty_db}"')
    try:
        unmigrated = Settings(database_url=with_database(db_url, empty_db), data_dir=tmp_path)
        with pytest.raises(DatabaseError, match="run `nova-email migrate` first"):
            _status(unmigrated, capsys)
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(f'drop database "{empty_db}" with (force)')

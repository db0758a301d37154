"""``nova-email dead-letters list|show|replay`` on dead letters recorded by the broker's own function."""

from __future__ import annotations

import json

import psycopg
import pytest

from nova_email.config import Settings
from nova_email.ops.dead_letters import add_dead_letters_arguments, run_dead_letters

from .conftest import make_dead_letter, parse


def _dead_letters(settings: Settings, *argv: str) -> int:
    return run_dead_letters(settings, parse(add_dead_letters_arguments, list(argv)))


def _ids(conn: psycopg.Connection) -> list[int]:
    return [row[0] for row in conn.execute("select id from pgmq_broker.dead_letters order by id")]


@pytest.fixture
def dead_letters(conn: psycopg.Connection) -> list[int]:
    """Two dead thread jobs and one dead webhook job."""
    make_dead_letter(conn, "thread_sync_jobs", {"thread_id": "t1"}, error="thread t1 exploded")
    make_dead_letter(conn, "thread_sync_jobs", {"thread_id": "t2"}, error="thread t2 exploded")
    make_dead_letter(conn, "nylas_webhook_notifications", {"webhook_id": "w1"}, error="bad", actor="process_webhook")
    return _ids(conn)


def test_list_counts_dead_letters_per_queue_and_shows_the_newest(
    settings: Settings, dead_letters: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _dead_letters(settings, "list") == 0
    out = capsys.readouterr().out

    assert any(line.split()[:2] == ["thread_sync_jobs", "2"] for line in out.splitlines()), out
    assert any(line.split()[:2] == ["nylas_webhook_notifications", "1"] for line in out.splitlines()), out
    rows = out.split("(details: nova-email dead-letters show ID)")[1]
    # newest first
    assert rows.index(f"  {dead_letters[2]} ") < rows.index(f"  {dead_letters[0]} ")
    assert "failed: RuntimeError: thread t1 exploded" in rows


def test_list_of_one_queue_as_json(
    settings: Settings, dead_letters: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _dead_letters(settings, "list", "--queue", "thread_sync_jobs", "--json") == 0
    data = json.loads(capsys.readouterr().out)

    assert [d["id"] for d in data["dead_letters"]] == [dead_letters[1], dead_letters[0]]
    assert {q["queue_name"]: q["count"] for q in data["queues"]} == {
        "nylas_webhook_notifications": 1,
        "thread_sync_jobs": 2,
    }
    assert data["dead_letters"][0]["message"] == {"thread_id": "t2"}


def test_show_prints_the_message_error_and_traceback(
    settings: Settings, dead_letters: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _dead_letters(settings, "show", str(dead_letters[0])) == 0
    out = capsys.readouterr().out

    assert "queue:       thread_sync_jobs" in out
    assert "error:       RuntimeError: thread t1 exploded" in out
    assert '"thread_id": "t1"' in out
    assert "traceback:\nTraceback: boom" in out


def test_show_of_an_unknown_id_exits_2(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert _dead_letters(settings, "show", "999999") == 2
    assert "no dead letter #999999" in capsys.readouterr().err


def test_replay_of_a_queue_sends_its_messages_back_and_leaves_the_others(
    conn: psycopg.Connection, settings: Settings, dead_letters: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _dead_letters(settings, "replay", "--queue", "thread_sync_jobs") == 0

    assert "Replayed 2 dead letter(s) of queue thread_sync_jobs" in capsys.readouterr().out
    assert _ids(conn) == [dead_letters[2]]
    bodies = [row[0] for row in conn.execute("select message from pgmq.q_thread_sync_jobs order by msg_id")]
    assert bodies == [{"thread_id": "t1"}, {"thread_id": "t2"}]


def test_replay_by_id_and_replay_needs_a_selection(
    conn: psycopg.Connection, settings: Settings, dead_letters: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _dead_letters(settings, "replay") == 2
    assert "--queue QUEUE, --id ID" in capsys.readouterr().err
    assert _ids(conn) == dead_letters

    assert _dead_letters(settings, "replay", "--id", str(dead_letters[2])) == 0
    assert _ids(conn) == dead_letters[:2]
    assert conn.execute("select count(*) from pgmq.q_nylas_webhook_notifications").fetchone() == (1,)

    assert _dead_letters(settings, "replay", "--all") == 0
    assert _ids(conn) == []

"""Compare the database's copy of a mailbox with the simulator's ground truth, field by field.

Every column the service fills from a Nylas object is compared (``nova_email/sql/040_sync_api.sql`` lists them). Not compared:
columns the service keeps for itself (``nylas_updated_at``, ``synced_at``, row ids and timestamps) and Nylas fields
it does not store (``grant_id``, ``object``, a message's ``created_at``, a thread's ``draft_ids`` and
``latest_draft_or_message``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

THREAD_FIELDS = (
    "subject",
    "snippet",
    "participants",
    "folders",
    "message_ids",
    "unread",
    "starred",
    "has_attachments",
    "has_drafts",
)
THREAD_DATES = {
    "latest_message_received_date": "latest_message_received_date",
    "latest_message_sent_date": "latest_message_sent_date",
    "earliest_message_date": "earliest_message_date",
}
#: Nylas message field -> column, compared when the ground truth has the field.
MESSAGE_FIELDS = {
    "thread_id": "nylas_thread_id",
    "subject": "subject",
    "snippet": "snippet",
    "body": "body",
    "to": "to_recipients",
    "cc": "cc_recipients",
    "bcc": "bcc_recipients",
    "reply_to": "reply_to",
    "attachments": "attachments",
    "folders": "folders",
    "unread": "unread",
    "starred": "starred",
    "metadata": "metadata",
}


def _ts(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _in_reply_to(headers: list[dict[str, str]]) -> str | None:
    return next((h["value"] for h in headers if h["name"].lower() == "in-reply-to"), None)


def _message_differences(message_id: str, want: dict[str, Any], row: dict[str, Any]) -> list[str]:
    problems = []
    if row["parent"] != want["thread_id"]:
        problems.append(f"message {message_id} in thread {row['parent']} != {want['thread_id']}")
    if _clean(want["from"][0] if want["from"] else None) != _clean(row["sender"]):
        problems.append(f"message {message_id} sender: {row['sender']!r} != {want['from']!r}")
    if _ts(want["date"]) != row["received_date"]:
        problems.append(f"message {message_id} date: {row['received_date']!r} != {_ts(want['date'])!r}")
    for key, column in MESSAGE_FIELDS.items():
        if key not in want:
            continue
        if _clean(want[key]) != _clean(row[column]):
            problems.append(f"message {message_id} {key}: stored {str(row[column])[:80]!r} != {str(want[key])[:80]!r}")
    # The service never asks for headers (no fields=include_headers) nor tracking options (not in its select),
    # so Nylas sends none and none may be stored; a ground truth that has them says what should be there.
    headers = want.get("headers", [])
    expected = {
        "headers": headers,
        "in_reply_to": _in_reply_to(headers),
        "tracking_options": want.get("tracking_options"),
    }
    for column, value in expected.items():
        if _clean(value) != _clean(row[column]):
            problems.append(f"message {message_id} {column}: stored {str(row[column])[:80]!r} != {str(value)[:80]!r}")
    return problems


def mirror_differences(
    conn: psycopg.Connection, inbox_id: uuid.UUID, export: dict[str, Any], *, since: int | None = None
) -> list[str]:
    """Every difference between the stored inbox and `export` (threads whose latest message is after `since`).

    Threads and messages stored but gone at Nylas are reported whatever their date.
    """
    problems: list[str] = []
    threads = [t for t in export["threads"] if since is None or (t["latest_message_received_date"] or 0) > since]
    wanted_threads = {t["id"]: t for t in threads}
    wanted_messages = {m["id"]: m for m in export["messages"] if m["thread_id"] in wanted_threads}
    with conn.cursor(row_factory=dict_row) as cur:
        stored_threads = {
            r["nylas_thread_id"]: r
            for r in cur.execute("select * from flux_email_threads where inbox_id = %s", [inbox_id]).fetchall()
        }
        stored_messages = {
            r["nylas_message_id"]: r
            for r in cur.execute(
                "select m.*, t.nylas_thread_id as parent from flux_email_messages m"
                " join flux_email_threads t on t.id = m.thread_id where m.inbox_id = %s",
                [inbox_id],
            ).fetchall()
        }
    for missing in sorted(set(wanted_threads) - set(stored_threads)):
        problems.append(f"thread {missing} missing")
    for extra in sorted(set(stored_threads) - {t["id"] for t in export["threads"]}):
        problems.append(f"thread {extra} stored but not at Nylas")
    for thread_id, want in wanted_threads.items():
        row = stored_threads.get(thread_id)
        if row is None:
            continue
        for field in THREAD_FIELDS:
            if _clean(want[field]) != _clean(row[field]):
                problems.append(f"thread {thread_id} {field}: stored {row[field]!r} != {want[field]!r}")
        for key, column in THREAD_DATES.items():
            if _ts(want[key]) != row[column]:
                problems.append(f"thread {thread_id} {key}: stored {row[column]!r} != {_ts(want[key])!r}")
    for missing in sorted(set(wanted_messages) - set(stored_messages)):
        problems.append(f"message {missing} missing")
    for extra in sorted(set(stored_messages) - {m["id"] for m in export["messages"]}):
        problems.append(f"message {extra} stored but not at Nylas (thread {stored_messages[extra]['parent']})")
    for message_id, want in wanted_messages.items():
        row = stored_messages.get(message_id)
        if row is not None:
            problems += _message_differences(message_id, want, row)
    return problems

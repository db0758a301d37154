"""Queue payloads: the documented shapes are read, anything else is an InvalidJob with a readable reason."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nova_email.errors import InvalidJob
from nova_email.jobs import BackfillJob, ThreadSyncJob, WebhookJob, structure_job, unstructure_job

INBOX = "6a1c1c56-2b2f-4b8a-9a53-3e2a6f0d7c11"
CONFIG = "0b7d3d0e-8a5c-4d35-b0a9-2f3c7c5d1e22"


def test_a_thread_job_from_sql_is_read_and_unknown_keys_are_ignored() -> None:
    job = structure_job(
        {"thread_id": "thr_1", "grant_id": None, "inbox_id": INBOX, "config_id": CONFIG, "added_later": 1},
        ThreadSyncJob,
    )
    assert job == ThreadSyncJob(thread_id="thr_1", inbox_id=uuid.UUID(INBOX), config_id=uuid.UUID(CONFIG))
    assert unstructure_job(job) == {"thread_id": "thr_1", "grant_id": None, "inbox_id": INBOX, "config_id": CONFIG}


def test_a_backfill_job_keeps_aware_dates() -> None:
    job = structure_job(
        {
            "inbox_id": INBOX,
            "config_id": CONFIG,
            "grant_id": "g",
            "start_date": "2025-11-29T15:18:47.123456+00:00",
            "end_date": "2026-11-29T15:18:47+00:00",
        },
        BackfillJob,
    )
    assert job.start_date == datetime(2025, 11, 29, 15, 18, 47, 123456, tzinfo=UTC)


def backfill_payload(start: datetime, end: datetime) -> dict[str, Any]:
    return {"inbox_id": INBOX, "config_id": CONFIG, "start_date": start.isoformat(), "end_date": end.isoformat()}


def test_an_inverted_backfill_window_is_an_invalid_job() -> None:
    # It would ask Nylas for threads after its "before" and finish with none, silently
    with pytest.raises(InvalidJob, match="end_date .* is before start_date"):
        structure_job(backfill_payload(datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)), BackfillJob)


@pytest.mark.parametrize(
    "length",
    [timedelta(0), timedelta(days=365), timedelta(days=365, hours=3), timedelta(days=730)],
    ids=["empty-window", "365-days", "365-days-and-3-hours", "two-years"],
)
def test_a_backfill_window_within_365_days_is_read(length: timedelta) -> None:
    end = datetime(2026, 11, 29, 15, 18, 47, tzinfo=UTC)
    job = structure_job(backfill_payload(end - length, end), BackfillJob)
    assert job.end_date - job.start_date == length


@pytest.mark.parametrize("time_zone", ["UTC", "America/New_York"])
def test_every_window_queue_inbox_backfill_produces_is_a_valid_job(conn: psycopg.Connection, time_zone: str) -> None:
    # Given a session time zone with daylight saving, where "365 days" is not 365 * 24 hours
    conn.execute("select set_config('TimeZone', %s, false)", [time_zone])
    inbox = conn.execute("insert into flux_inboxes (nylas_grant_id) values ('g-window') returning id").fetchone()
    assert inbox is not None
    # When the SQL producer caps a window at 365 days, ending just after New York left daylight saving time
    row = conn.execute(
        "select msg_id from queue_inbox_backfill(%s, null, '2024-01-01T00:00:00Z', '2026-11-01T17:00:00Z')", [inbox[0]]
    ).fetchone()
    assert row is not None
    message = conn.execute("select message from pgmq.q_inbox_backfill_jobs where msg_id = %s", [row[0]]).fetchone()
    assert message is not None

    # Then the worker reads it as a job
    job = structure_job(message[0], BackfillJob)
    assert timedelta(days=364) < job.end_date - job.start_date < timedelta(days=366)


@pytest.mark.parametrize(
    ("payload", "cls", "expected"),
    [
        ([], ThreadSyncJob, "ThreadSyncJob payload must be a JSON object, got list"),
        ({"thread_id": "t"}, ThreadSyncJob, r"required field missing @ \$.inbox_id"),
        ({"thread_id": 7, "inbox_id": INBOX}, ThreadSyncJob, r"expected str @ \$.thread_id"),
        (
            {"thread_id": "t", "inbox_id": "not-a-uuid"},
            ThreadSyncJob,
            r"badly formed hexadecimal UUID string @ \$.inbox_id",
        ),
        ({"thread_id": "  ", "inbox_id": INBOX}, ThreadSyncJob, "thread_id must be a non-empty string"),
        ({"thread_id": "..", "inbox_id": INBOX}, ThreadSyncJob, "thread_id '..' cannot be a Nylas id"),
        ({"notification_type": "message.created", "payload": "x"}, WebhookJob, r"expected dict @ \$.payload"),
        (
            {"inbox_id": INBOX, "config_id": CONFIG, "start_date": "2025-01-01T00:00:00", "end_date": "x"},
            BackfillJob,
            r"\$.start_date",
        ),
    ],
    ids=["list", "missing", "wrong-type", "bad-uuid", "blank", "dot-segment", "payload-not-object", "naive-date"],
)
def test_a_malformed_payload_is_an_invalid_job_naming_the_field(payload: Any, cls: type, expected: str) -> None:
    with pytest.raises(InvalidJob, match=expected):
        structure_job(payload, cls)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(payload=json_values | st.dictionaries(st.sampled_from(["thread_id", "inbox_id", "grant_id"]), json_values))
@pytest.mark.parametrize("cls", [ThreadSyncJob, BackfillJob, WebhookJob])
def test_any_json_is_either_a_job_or_an_invalid_job(cls: type, payload: Any) -> None:
    try:
        job = structure_job(payload, cls)
    except InvalidJob as exc:
        assert str(exc)
    else:
        assert isinstance(job, cls)

"""Hostile input, as hypothesis strategies: JSON of every shape, strings that look like SQL or carry control
characters, wrong types for every field, unknown types and grants."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hypothesis import strategies as st

SQLISH = [
    "'; drop table flux_email_messages; --",
    '"); delete from pgmq.q_thread_sync_jobs; --',
    "1 or 1=1",
    "$$; select pg_sleep(10); $$",
    "\\x00\\u0000",
    "%(thread_id)s",
    "{}",
    "' || (select string_agg(usename, ',') from pg_user) || '",
]
CONTROL = ["\x01\x02\x1b[31m", "\r\n\t", "\u202e\u200b", "\ufeff", "\U0001f4a5" * 20, "a\x7fb"]

#: Strings a hostile or broken producer may send (no NUL: Postgres jsonb cannot hold it, so it never reaches a queue).
hostile_text = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40),
    st.sampled_from(SQLISH + CONTROL),
)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)
json_value: st.SearchStrategy[Any] = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4),
    max_leaves=12,
)

THREAD_FIELDS = ["thread_id", "inbox_id", "grant_id", "config_id"]
BACKFILL_FIELDS = ["inbox_id", "config_id", "grant_id", "start_date", "end_date"]
WEBHOOK_FIELDS = [
    "notification_id",
    "webhook_id",
    "inbox_id",
    "notification_type",
    "grant_id",
    "payload",
    "received_at",
]
WEBHOOK_TYPES = ["message.created", "message.updated", "thread.replied", "grant.expired", "message.deleted"]
FIELDS = {"thread_sync_jobs": THREAD_FIELDS, "inbox_backfill_jobs": BACKFILL_FIELDS}
#: The grant the bad-input target's inbox has (tests/badinput/conftest.py), so some jobs reach a real mailbox.
GRANT_ANYWHERE = "grant-bad-input"
FIELDS["nylas_webhook_notifications"] = WEBHOOK_FIELDS


def plausible_value(field: str) -> st.SearchStrategy[Any]:
    """A value that has the right type for `field` but names nothing that exists, or a hostile one."""
    right_type: st.SearchStrategy[Any]
    if field.endswith("_id") and field not in ("thread_id", "grant_id", "webhook_id"):
        right_type = st.uuids().map(str)
    elif field.endswith("_date") or field == "received_at":
        right_type = st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()) | hostile_text
    elif field == "notification_type":
        right_type = st.sampled_from(WEBHOOK_TYPES) | hostile_text
    elif field == "payload":
        right_type = st.dictionaries(hostile_text, json_value, max_size=4)
    else:
        right_type = hostile_text
    return st.one_of(right_type, json_value)


def _uuid_text() -> st.SearchStrategy[str]:
    return st.uuids().map(str)


def _id_text() -> st.SearchStrategy[str]:
    return hostile_text.filter(lambda t: bool(t.strip().strip(".")))


def _backfill_window() -> st.SearchStrategy[dict[str, str]]:
    """Windows of up to a year (what the worker must accept), and a few inverted ones."""
    end = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.timezones())
    return st.tuples(end, st.integers(min_value=-86_400, max_value=365 * 86_400)).map(
        lambda pair: {
            "start_date": (pair[0] - timedelta(seconds=pair[1])).isoformat(),
            "end_date": pair[0].isoformat(),
        }
    )


def well_formed_job(queue: str) -> st.SearchStrategy[dict[str, Any]]:
    """A job that decodes (every field of the right type) but was not made by the SQL producers: its ids name
    nothing that exists, and optional fields may be missing, ``notification_id`` included."""
    grant = st.none() | st.just(GRANT_ANYWHERE) | _id_text()
    if queue == "nylas_webhook_notifications":
        return st.fixed_dictionaries(
            {"notification_type": st.sampled_from(WEBHOOK_TYPES), "payload": st.dictionaries(hostile_text, json_value)},
            optional={
                "notification_id": st.none() | _uuid_text(),
                "webhook_id": st.none() | _id_text(),
                "inbox_id": st.none() | _uuid_text(),
                "grant_id": grant,
                "received_at": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
            },
        )
    if queue == "inbox_backfill_jobs":
        ids = st.fixed_dictionaries({"inbox_id": _uuid_text(), "config_id": _uuid_text()}, optional={"grant_id": grant})
        return st.tuples(ids, _backfill_window()).map(lambda pair: {**pair[0], **pair[1]})
    return st.fixed_dictionaries(
        {"thread_id": _id_text(), "inbox_id": _uuid_text()},
        optional={"grant_id": grant, "config_id": st.none() | _uuid_text()},
    )


def queue_message(queue: str) -> st.SearchStrategy[Any]:
    """Any JSON a producer might put on `queue`: not an object, an object of junk, a job with bad fields, or a
    well-formed job that names nothing that exists."""
    fields = FIELDS[queue]
    job_like = st.fixed_dictionaries({}, optional={f: plausible_value(f) for f in fields})
    return st.one_of(
        json_value, st.dictionaries(hostile_text, json_value, max_size=5), job_like, well_formed_job(queue)
    )

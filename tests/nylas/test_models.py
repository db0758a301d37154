"""The Nylas models and their converter: tolerant where Nylas is loose, precise errors where it breaks shape."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nova_email.nylas import Message, Participant, ResponseShapeError, Thread
from nova_email.nylas.models import structure, to_json

# The composed examples of docs/nylas-v3.md (b.4, b.5).
DOC_MESSAGE: dict[str, Any] = {
    "object": "message",
    "id": "msg_a1_1",
    "grant_id": "grant-123",
    "thread_id": "thr_a1",
    "subject": "Quarterly numbers",
    "from": [{"name": "Ada", "email": "ada@example.org"}],
    "to": [{"name": "Bob", "email": "bob@example.net"}],
    "cc": [],
    "bcc": [],
    "reply_to": [],
    "date": 1735689600,
    "created_at": 1735689601,
    "unread": False,
    "starred": False,
    "snippet": "Hi Bob, here is the draft",
    "body": "<p>Hi Bob, here is the draft</p>",
    "folders": ["SENT"],
    "attachments": [
        {
            "id": "att_1",
            "grant_id": "grant-123",
            "filename": "q.pdf",
            "content_type": "application/pdf",
            "size": 20480,
            "is_inline": False,
        }
    ],
    "metadata": {},
}
DOC_THREAD: dict[str, Any] = {
    "object": "thread",
    "id": "thr_a1",
    "grant_id": "grant-123",
    "subject": "Quarterly numbers",
    "snippet": "Attached are the figures we discussed",
    "participants": [{"name": "Ada", "email": "ada@example.org"}, {"email": "bob@example.net"}],
    "message_ids": ["msg_a1_1", "msg_a1_2"],
    "draft_ids": [],
    "folders": ["INBOX", "UNREAD"],
    "unread": True,
    "starred": False,
    "has_attachments": True,
    "has_drafts": False,
    "earliest_message_date": 1735689600,
    "latest_message_received_date": 1735776000,
    "latest_message_sent_date": 1735700000,
    "latest_draft_or_message": {"object": "message", "id": "msg_a1_2", "date": 1735776000, "unread": True},
}


def test_the_documented_message_round_trips() -> None:
    message = structure(DOC_MESSAGE, Message)

    assert message.from_ == (Participant(email="ada@example.org", name="Ada"),)
    assert message.date == datetime(2025, 1, 1, tzinfo=UTC)
    assert message.attachments[0].size == 20480
    assert to_json(message) | {"headers": [], "tracking_options": None} == to_json(structure(to_json(message), Message))
    assert to_json(message)["from"] == DOC_MESSAGE["from"]


def test_the_documented_thread_has_aware_dates_and_a_nested_latest_message() -> None:
    thread = structure(DOC_THREAD, Thread)

    assert thread.latest_message_received_date == datetime(2025, 1, 2, tzinfo=UTC)
    assert thread.latest_message_received_date.tzinfo is UTC
    assert thread.participants[1] == Participant(email="bob@example.net")
    assert isinstance(thread.latest_draft_or_message, Message) and thread.latest_draft_or_message.unread


def test_unknown_fields_are_ignored_and_nulls_count_as_absent() -> None:
    message = structure(
        {"id": "m", "brand_new_field": {"x": 1}, "subject": None, "folders": None, "date": None, "unread": None},
        Message,
    )

    assert (message.subject, message.folders, message.date, message.unread) == (None, (), None, False)


def test_a_select_answer_with_only_an_id_is_a_valid_object() -> None:
    assert structure({"id": "t"}, Thread) == Thread(id="t")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"subject": "x"}, "required field missing @ $.id"),
        ({"id": "m", "date": "2025-01-01"}, "invalid value for type, expected datetime.datetime | None @ $.date"),
        ({"id": "m", "attachments": [{"id": "a", "size": "big"}]}, "expected int | None @ $.attachments[0].size"),
        (["not", "an", "object"], "expected a JSON object for Message"),
    ],
    ids=["missing id", "iso date", "bad size", "list"],
)
def test_shape_errors_name_the_field_path(value: object, expected: str) -> None:
    with pytest.raises(ResponseShapeError) as caught:
        structure(value, Message)

    assert any(expected in line for line in caught.value.details), caught.value.details


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
message_like = st.fixed_dictionaries(
    {}, optional={k: json_values for k in ("id", "subject", "from", "date", "attachments", "folders", "unread")}
)


@given(value=st.one_of(json_values, message_like))
def test_any_json_either_structures_or_raises_response_shape_error(value: object) -> None:
    try:
        message = structure(value, Message)
    except ResponseShapeError as exc:
        assert exc.details
    else:
        assert isinstance(message.id, str)

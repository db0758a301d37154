"""Decoding PGMQ bodies: Dramatiq envelopes, foreign JSON objects, and anything else, never an exception."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from dramatiq import Message
from hypothesis import given
from hypothesis import strategies as st

from brokers.envelope import Undecodable, decode_body, foreign_message_id

ENQUEUED_AT = datetime(2026, 1, 1, tzinfo=UTC)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def decode(body: str, handlers: dict[str, str] | None = None) -> Message[Any] | Undecodable:
    return decode_body(body, queue_name="jobs", msg_id=42, enqueued_at=ENQUEUED_AT, handlers=handlers or {})


@given(st.text())
def test_any_text_decodes_to_a_message_or_a_reason(body: str) -> None:
    assert isinstance(decode(body, {"jobs": "handler"}), Message | Undecodable)


@given(json_values)
def test_any_json_decodes_to_a_message_or_a_reason(value: object) -> None:
    result = decode(json.dumps(value), {"jobs": "handler"})
    if isinstance(value, dict):
        assert isinstance(result, Message)  # an object: an envelope or the handler's argument
    else:
        assert isinstance(result, Undecodable)
        assert result.reason == "undecodable"


@given(st.dictionaries(st.sampled_from(["actor_name", "args", "kwargs", "options", "message_id"]), json_values))
def test_envelope_like_objects_never_raise(fields: dict[str, Any]) -> None:
    assert isinstance(decode(json.dumps(fields)), Message | Undecodable)


def test_an_envelope_keeps_its_fields_but_takes_the_queue_it_was_read_from_and_drops_eta() -> None:
    envelope = {
        "queue_name": "elsewhere",
        "actor_name": "act",
        "args": [1],
        "kwargs": {"k": 2},
        "options": {"eta": 1, "retries": 1},
        "message_id": "m-1",
        "message_timestamp": 5,
    }
    message = decode(json.dumps(envelope))
    assert isinstance(message, Message)
    assert (message.queue_name, message.actor_name, message.args, message.kwargs) == ("jobs", "act", (1,), {"k": 2})
    assert (message.options, message.message_id, message.message_timestamp) == ({"retries": 1}, "m-1", 5)


def test_a_foreign_object_goes_to_the_handler_with_an_id_derived_from_queue_and_msg_id() -> None:
    message = decode('{"thread_id": "t"}', {"jobs": "sync_thread"})
    assert isinstance(message, Message)
    assert (message.actor_name, message.args) == ("sync_thread", ({"thread_id": "t"},))
    assert message.message_id == foreign_message_id("jobs", 42) != foreign_message_id("jobs", 43)
    assert message.message_timestamp == int(ENQUEUED_AT.timestamp() * 1000)


def test_a_foreign_object_without_a_handler_says_how_to_fix_it() -> None:
    result = decode('{"thread_id": "t"}')
    assert isinstance(result, Undecodable)
    assert result.reason == "no_handler"
    assert "queue_handler=True" in result.error_message

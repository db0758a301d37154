"""Turn a PGMQ message body into a Dramatiq message: a Dramatiq envelope, or a foreign JSON object.

Producers other than Dramatiq (SQL functions, other services) put plain JSON objects on a queue. Such a
*foreign* message goes to the actor registered as the queue's handler, as its single positional argument,
with a message id derived from the queue and the PGMQ ``msg_id``, so every delivery of it has the same id.
SQL producers that want a specific actor build a full envelope with ``pgmq_broker.dramatiq_message(...)``.

Anything else (invalid JSON, a non-object, a malformed envelope, a foreign object on a queue without a
handler) becomes an :class:`Undecodable` that the consumer dead-letters.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs
from dramatiq import Message, get_encoder
from dramatiq.middleware import Middleware

__all__ = [
    "ENVELOPE_KEYS",
    "FOREIGN_MESSAGE_NAMESPACE",
    "MAX_COUNT_OPTION",
    "NUMBER_OPTIONS",
    "QueueHandlerOption",
    "Undecodable",
    "decode_body",
    "foreign_message_id",
]

#: The keys that make a JSON object a Dramatiq envelope rather than a foreign message.
ENVELOPE_KEYS = frozenset({"actor_name", "args", "kwargs", "options", "message_id"})

#: Largest count an envelope's ``retries`` or ``max_retries`` may hold (a dead letter's ``attempts`` is an integer).
MAX_COUNT_OPTION = 2**31 - 2
#: Largest duration, in milliseconds, an envelope's duration options may hold.
MAX_DURATION_OPTION_MS = 2**53
#: Envelope options Dramatiq's middleware reads as numbers, and the largest value each may hold.
NUMBER_OPTIONS = {
    "retries": MAX_COUNT_OPTION,
    "max_retries": MAX_COUNT_OPTION,
    "min_backoff": MAX_DURATION_OPTION_MS,
    "max_backoff": MAX_DURATION_OPTION_MS,
    "time_limit": MAX_DURATION_OPTION_MS,
    "max_age": MAX_DURATION_OPTION_MS,
}

#: UUID namespace of foreign message ids (uuid5 over "<queue>:<msg_id>").
FOREIGN_MESSAGE_NAMESPACE = uuid.UUID("6f1f3c62-61a7-4e53-9c55-8f4a5d0e2b1e")


class QueueHandlerOption(Middleware):
    """Registers the ``queue_handler`` actor option: the actor receives its queue's foreign messages."""

    @property
    def actor_options(self) -> set[str]:
        return {"queue_handler"}


@attrs.frozen
class Undecodable:
    """Why a message body could not become a Dramatiq message; recorded as the dead letter's reason."""

    reason: str
    error_type: str
    error_message: str


def foreign_message_id(queue_name: str, msg_id: int) -> str:
    """The Dramatiq message id of a foreign message: the same for every delivery of one PGMQ message."""
    return str(uuid.uuid5(FOREIGN_MESSAGE_NAMESPACE, f"{queue_name}:{msg_id}"))


def decode_body(
    body: str, *, queue_name: str, msg_id: int, enqueued_at: datetime, handlers: Mapping[str, str]
) -> Message[Any] | Undecodable:
    """Decode one PGMQ body read from `queue_name` into a message, or say why it cannot be one.

    The returned message always names `queue_name` as its queue (Dramatiq's worker settles a message through
    the consumer of that queue), and never carries an ``eta``: this broker delays natively, in the database.
    """
    try:
        fields = get_encoder().decode(body.encode("utf-8"))
    except Exception as exc:  # any encoder: json raises ValueError, custom ones raise their own
        return Undecodable("undecodable", type(exc).__name__, f"The body is not valid JSON: {exc}")
    if not isinstance(fields, dict):
        return Undecodable(
            "undecodable",
            "TypeError",
            f"The body is a JSON {type(fields).__name__}, expected an object (a Dramatiq envelope or a foreign message)",
        )
    if ENVELOPE_KEYS <= fields.keys():
        return _decode_envelope(fields, queue_name=queue_name, enqueued_at=enqueued_at)
    handler = handlers.get(queue_name)
    if handler is None:
        return Undecodable(
            "no_handler",
            "LookupError",
            f"Queue {queue_name!r} received a JSON object that is not a Dramatiq envelope and no actor handles "
            "foreign messages on it; declare one with queue_handler=True, or send pgmq_broker.dramatiq_message(...)",
        )
    return Message(
        queue_name=queue_name,
        actor_name=handler,
        args=(fields,),
        kwargs={},
        options={},
        message_id=foreign_message_id(queue_name, msg_id),
        message_timestamp=int(enqueued_at.timestamp() * 1000),
    )


def _decode_envelope(fields: dict[str, Any], *, queue_name: str, enqueued_at: datetime) -> Message[Any] | Undecodable:
    problems = [
        f"{key} must be {kind.__name__}"
        for key, kind in (("actor_name", str), ("args", list), ("kwargs", dict), ("options", dict), ("message_id", str))
        if not isinstance(fields.get(key), kind)
    ]
    timestamp = fields.get("message_timestamp", int(enqueued_at.timestamp() * 1000))
    if not isinstance(timestamp, int | float):
        problems.append("message_timestamp must be a number")
    if not problems:
        problems.extend(_option_problems(fields["options"]))
    if problems:
        return Undecodable("undecodable", "TypeError", "Malformed Dramatiq envelope: " + "; ".join(problems))
    options = {k: v for k, v in fields["options"].items() if k != "eta"}
    return Message(
        queue_name=queue_name,
        actor_name=fields["actor_name"],
        args=tuple(fields["args"]),
        kwargs=fields["kwargs"],
        options=options,
        message_id=fields["message_id"],
        message_timestamp=int(timestamp),
    )


def _option_problems(options: dict[str, Any]) -> list[str]:
    """The options Dramatiq's middleware would choke on: numbers that are not numbers, or out of range."""
    return [
        f"options.{key} must be a number from 0 to {largest}"
        for key, largest in NUMBER_OPTIONS.items()
        if key in options
        and (
            isinstance(options[key], bool)
            or not isinstance(options[key], int | float)
            or not 0 <= options[key] <= largest  # also refuses NaN
        )
    ]

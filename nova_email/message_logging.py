"""Log lines about a queue message name it, never show its payload.

Dramatiq formats a message as ``actor(args...)`` in its log lines ("Failed to process message %s with unhandled
exception", "Received message %s", "Message %s was skipped"), and a webhook job's argument is the whole Nylas
notification: subjects, snippets, password-reset codes. `MessagePayloadFilter`, on the handler every stdlib record
passes through (`nova_email.log`), replaces each message among a record's arguments by its summary: the actor, the
message id and, for our jobs, their id fields (grant, inbox, thread, notification, ...).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_ID_CHARS", "MessagePayloadFilter", "summarize_message"]

#: Longest id value shown; a longer "id" is not an id we issued or Nylas did, and is shown by its length only.
MAX_ID_CHARS = 100


def _is_message(value: object) -> bool:
    # dramatiq.Message and the MessageProxy wrapping it during processing both have these.
    return all(hasattr(value, name) for name in ("actor_name", "message_id", "args", "kwargs"))


def _id_fields(payload: Mapping[Any, Any]) -> list[str]:
    fields = []
    for key, value in payload.items():
        if not (isinstance(key, str) and key.endswith("_id")):
            continue
        if isinstance(value, uuid.UUID | int) or (isinstance(value, str) and len(value) <= MAX_ID_CHARS):
            fields.append(f"{key}={value}")
        elif value is not None:
            fields.append(f"{key}=<{len(str(value))} characters>")
    return fields


def summarize_message(message: Any) -> str:
    """``actor[message id]``, followed by the id fields of its first argument when that is a job object."""
    summary = f"{message.actor_name}[{message.message_id}]"
    first = message.args[0] if message.args else None
    fields = _id_fields(first) if isinstance(first, Mapping) else []
    return f"{summary} ({', '.join(fields)})" if fields else summary


class MessagePayloadFilter(logging.Filter):
    """Replaces every queue message among a log record's arguments by `summarize_message` of it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(_is_message(arg) for arg in record.args):
            record.args = tuple(summarize_message(arg) if _is_message(arg) else arg for arg in record.args)
        elif isinstance(record.args, Mapping) and any(_is_message(arg) for arg in record.args.values()):
            record.args = {key: summarize_message(arg) if _is_message(arg) else arg for key, arg in record.args.items()}
        return True

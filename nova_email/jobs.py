"""The three queue payloads as attrs classes, and the one converter that reads them.

Payloads are plain JSON objects (docs/sql-api.md, section 1): SQL functions, the webhook
receiver and other systems produce them. `structure_job` turns one into a job or raises
`InvalidJob` with cattrs' field-by-field explanation, which ends up in the dead-letter record.
Unknown keys are ignored, since later versions may add fields.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

import attrs
import cattrs

from .errors import InvalidJob

__all__ = ["BackfillJob", "ThreadSyncJob", "WebhookJob", "structure_job", "unstructure_job"]

J = TypeVar("J")


def _non_empty(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.strip():
        msg = f"{attribute.name} must be a non-empty string"
        raise ValueError(msg)


def _object_id(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    _non_empty(instance, attribute, value)
    if not value.strip("."):
        # As a URL path segment, "." or ".." would be resolved away and name another resource.
        msg = f"{attribute.name} {value!r} cannot be a Nylas id"
        raise ValueError(msg)


@attrs.frozen(kw_only=True)
class WebhookJob:
    """A Nylas webhook event to apply (queue ``nylas_webhook_notifications``)."""

    notification_id: uuid.UUID | None = None
    webhook_id: str | None = None
    inbox_id: uuid.UUID | None = None
    notification_type: str = attrs.field(validator=_non_empty)
    grant_id: str | None = None
    payload: dict[str, Any] = attrs.field(factory=dict)
    received_at: datetime | None = None


def _window_end(instance: BackfillJob, attribute: attrs.Attribute[datetime], value: datetime) -> None:
    # queue_inbox_backfill refuses an inverted window too; an equal start and end is the empty window it accepts.
    if value < instance.start_date:
        msg = (
            f"end_date {value.isoformat()} is before start_date {instance.start_date.isoformat()}; "
            "queue backfills with queue_inbox_backfill, which refuses an inverted window"
        )
        raise ValueError(msg)


@attrs.frozen(kw_only=True)
class BackfillJob:
    """Discover an inbox's threads in a date window (queue ``inbox_backfill_jobs``).

    A window longer than a year is listed over its last 365 days (`nova_email.nylas.one_year_window`), not refused.
    """

    inbox_id: uuid.UUID
    config_id: uuid.UUID
    grant_id: str | None = None
    start_date: datetime
    end_date: datetime = attrs.field(validator=_window_end)


@attrs.frozen(kw_only=True)
class ThreadSyncJob:
    """Fetch one thread and its messages (queue ``thread_sync_jobs``); ``grant_id`` may be missing."""

    thread_id: str = attrs.field(validator=_object_id)
    inbox_id: uuid.UUID
    grant_id: str | None = None
    config_id: uuid.UUID | None = None


def _structure_datetime(value: Any, _type: type) -> datetime:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        msg = f"expected an ISO-8601 timestamp string, got {type(value).__name__}"
        raise TypeError(msg)
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        msg = f"timestamp {value!r} has no time zone"
        raise ValueError(msg)
    return parsed


def _structure_uuid(value: Any, _type: type) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        msg = f"expected a UUID string, got {type(value).__name__}"
        raise TypeError(msg)
    return uuid.UUID(value)


def _structure_str(value: Any, _type: type) -> str:
    if not isinstance(value, str):
        msg = f"expected a string, got {type(value).__name__}"
        raise TypeError(msg)
    return value


def _structure_dict(value: Any, _type: type) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        msg = f"expected a JSON object, got {type(value).__name__}"
        raise TypeError(msg)
    return dict(value)


def _build_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    conv.register_structure_hook(datetime, _structure_datetime)
    conv.register_unstructure_hook(datetime, datetime.isoformat)
    conv.register_structure_hook(uuid.UUID, _structure_uuid)
    conv.register_unstructure_hook(uuid.UUID, str)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook_func(lambda t: t == dict[str, Any], _structure_dict)
    return conv


#: The converter for queue payloads; never cattrs' global one.
converter = _build_converter()


def _describe(exc: BaseException, type_: type | None) -> str:
    # Our own validators say what is wrong in words; cattrs' default would only say "invalid value".
    if isinstance(exc, ValueError) and not isinstance(exc, cattrs.BaseValidationError) and str(exc):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


def structure_job(payload: object, cls: type[J]) -> J:
    """Build a job of type `cls` from a queue payload.

    Raises:
        InvalidJob: the payload is not an object or a field is missing or malformed; the message lists each problem
            as ``<problem> @ $.field``.
    """
    if not isinstance(payload, Mapping):
        msg = f"{cls.__name__} payload must be a JSON object, got {type(payload).__name__}"
        raise InvalidJob(msg)
    try:
        return converter.structure(dict(payload), cls)
    except cattrs.BaseValidationError as exc:
        details = "; ".join(cattrs.transform_error(exc, format_exception=_describe))
        msg = f"Invalid {cls.__name__} payload: {details}"
        raise InvalidJob(msg) from exc
    except (TypeError, ValueError) as exc:
        msg = f"Invalid {cls.__name__} payload: {exc}"
        raise InvalidJob(msg) from exc


def unstructure_job(job: object) -> dict[str, Any]:
    """A job as the JSON object its queue carries."""
    result: dict[str, Any] = converter.unstructure(job)
    return result

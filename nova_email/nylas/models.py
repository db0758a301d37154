"""Nylas v3 objects as frozen attrs classes, and the one cattrs converter that reads and writes them.

The converter follows the API reference (docs/nylas-v3.md, b.4/b.5) and is tolerant where Nylas is loose:
unknown keys are ignored (Nylas adds fields), a key whose value is ``null`` counts as absent (so the field's default
applies), and unix-second dates become aware UTC datetimes. ``select`` may strip any field but ``id``, so every other
field has a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from nova_email.nylas.errors import ResponseShapeError

__all__ = [
    "Attachment",
    "Header",
    "Message",
    "MessagePage",
    "Participant",
    "Thread",
    "ThreadPage",
    "converter",
    "from_unix",
    "structure",
    "to_json",
]

T = TypeVar("T")


@attrs.frozen
class Participant:
    """A sender or recipient: ``{"name"?, "email"}``."""

    email: str = ""
    name: str | None = None


@attrs.frozen(kw_only=True)
class Attachment:
    """Attachment metadata as listed on a message (the content itself is never fetched)."""

    id: str
    grant_id: str | None = None
    filename: str | None = None
    content_type: str | None = None
    size: int | None = None
    content_id: str | None = None
    content_disposition: str | None = None
    is_inline: bool = False


@attrs.frozen
class Header:
    """One MIME header; only present when the call asked for ``fields=include_headers``."""

    name: str
    value: str


@attrs.frozen(kw_only=True)
class Message:
    """A Nylas message (``object`` is ``"draft"`` when a thread's latest item is a draft)."""

    id: str
    object: str = "message"
    grant_id: str = ""
    thread_id: str | None = None
    subject: str | None = None
    # "from" is a Python keyword; the converter renames it on the wire.
    from_: tuple[Participant, ...] = ()
    to: tuple[Participant, ...] = ()
    cc: tuple[Participant, ...] = ()
    bcc: tuple[Participant, ...] = ()
    reply_to: tuple[Participant, ...] = ()
    date: datetime | None = None
    created_at: datetime | None = None
    unread: bool = False
    starred: bool = False
    snippet: str = ""
    body: str | None = None
    #: Folder ids as Nylas lists them on a message (e.g. "INBOX", "UNREAD", or a provider's opaque id); no folder
    #: objects are fetched, as the original did not fetch them either.
    folders: tuple[str, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    headers: tuple[Header, ...] = ()
    metadata: dict[str, Any] = attrs.field(factory=dict)
    tracking_options: dict[str, Any] | None = None


@attrs.frozen(kw_only=True)
class Thread:
    """A Nylas thread with the fields Nylas derives from its messages."""

    id: str
    object: str = "thread"
    grant_id: str = ""
    subject: str | None = None
    snippet: str = ""
    participants: tuple[Participant, ...] = ()
    message_ids: tuple[str, ...] = ()
    draft_ids: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    unread: bool = False
    starred: bool = False
    has_attachments: bool = False
    has_drafts: bool = False
    earliest_message_date: datetime | None = None
    latest_message_received_date: datetime | None = None
    latest_message_sent_date: datetime | None = None
    latest_draft_or_message: Message | None = None


@attrs.frozen(kw_only=True)
class ThreadPage:
    """One page of ``GET /threads``. Checkpoint ``next_cursor`` after storing ``threads``; ``None`` means last page."""

    threads: tuple[Thread, ...]
    next_cursor: str | None
    page_token: str | None = None
    request_id: str | None = None


@attrs.frozen(kw_only=True)
class MessagePage:
    """One page of ``GET /messages``; ``next_cursor`` is ``None`` on the last page."""

    messages: tuple[Message, ...]
    next_cursor: str | None
    page_token: str | None = None
    request_id: str | None = None


def from_unix(value: object) -> datetime:
    """Convert unix seconds (int, float or digit string) to an aware UTC datetime."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        msg = f"expected unix seconds (int), got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    try:
        return datetime.fromtimestamp(float(value), tz=UTC)
    except (ValueError, OverflowError, OSError) as exc:
        msg = f"expected unix seconds, got {value!r}"
        raise ValueError(msg) from exc


def _build_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    conv.register_structure_hook(datetime, lambda value, _type: from_unix(value))
    conv.register_unstructure_hook(datetime, lambda value: int(value.timestamp()))

    def structure_hook_factory(cls: type[Any]) -> Any:
        if cls is Message:
            generated = make_dict_structure_fn(cls, conv, from_=override(rename="from"))
        else:
            generated = make_dict_structure_fn(cls, conv)

        def structure_dropping_nulls(value: Any, type_: type[Any]) -> Any:
            if not isinstance(value, Mapping):
                msg = f"expected a JSON object for {cls.__name__}, got {type(value).__name__}"
                raise TypeError(msg)
            return generated({k: v for k, v in value.items() if v is not None}, type_)

        return structure_dropping_nulls

    def unstructure_hook_factory(cls: type[Any]) -> Any:
        if cls is Message:
            return make_dict_unstructure_fn(cls, conv, from_=override(rename="from"))
        return make_dict_unstructure_fn(cls, conv)

    conv.register_structure_hook_factory(attrs.has, structure_hook_factory)
    conv.register_unstructure_hook_factory(attrs.has, unstructure_hook_factory)
    return conv


#: The converter for the Nylas boundary. Use it (or ``structure``/``to_json``), never cattrs' global one.
converter = _build_converter()


def structure(value: object, cls: type[T], *, where: str = "$", grant_id: str | None = None) -> T:
    """Build ``cls`` from decoded JSON.

    Raises:
        ResponseShapeError: the JSON breaks the shape; ``details`` holds one line per bad field.
    """
    try:
        return converter.structure(value, cls)
    except Exception as exc:  # cattrs raises ClassValidationError, or plain errors on non-dict input
        details = cattrs.transform_error(exc, path=where) if isinstance(exc, cattrs.BaseValidationError) else [str(exc)]
        msg = f"Nylas returned a {cls.__name__} that does not match the documented shape: {'; '.join(details)}"
        raise ResponseShapeError(msg, grant_id=grant_id, details=details) from exc


def to_json(value: object) -> Any:
    """Turn a model back into Nylas-shaped JSON (``from`` key, unix-second dates); e.g. for jsonb columns."""
    return converter.unstructure(value)

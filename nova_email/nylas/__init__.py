"""Client for the Nylas v3 API: HTTP transport, models, typed errors, shared pacing and call counts."""

from __future__ import annotations

from nova_email.nylas.client import (
    MAX_PAGE_LIMIT,
    MESSAGE_SELECT,
    THREAD_SELECT,
    NylasClient,
    build_session,
    one_year_window,
    parse_retry_after_ms,
)
from nova_email.nylas.errors import (
    BadRequest,
    GrantExpired,
    InvalidApiKey,
    InvalidObjectId,
    NotFound,
    NylasConnectionError,
    NylasError,
    NylasHTTPError,
    PacingLimitReached,
    RateLimited,
    ResponseShapeError,
    ServerError,
)
from nova_email.nylas.metrics import ApiCallCounter, process_counter
from nova_email.nylas.models import Attachment, Header, Message, MessagePage, Participant, Thread, ThreadPage
from nova_email.nylas.pacing import Pacer

__all__ = [
    # Client
    "MAX_PAGE_LIMIT",
    "MESSAGE_SELECT",
    "THREAD_SELECT",
    "NylasClient",
    "Pacer",
    "build_session",
    "one_year_window",
    "parse_retry_after_ms",
    # Metrics
    "ApiCallCounter",
    "process_counter",
    # Models
    "Attachment",
    "Header",
    "Message",
    "MessagePage",
    "Participant",
    "Thread",
    "ThreadPage",
    # Errors
    "BadRequest",
    "GrantExpired",
    "InvalidApiKey",
    "InvalidObjectId",
    "NotFound",
    "NylasConnectionError",
    "NylasError",
    "NylasHTTPError",
    "PacingLimitReached",
    "RateLimited",
    "ResponseShapeError",
    "ServerError",
]

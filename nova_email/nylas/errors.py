"""Errors raised by the Nylas client.

Hierarchy::

    NylasError                      base: anything the client could not do
    ├── InvalidObjectId             an id that cannot be a URL path segment ("", ".", ".."); nothing was sent
    ├── NylasConnectionError        no HTTP answer after the transport retries (DNS, reset, timeout)
    ├── ResponseShapeError          a 2xx answer whose JSON breaks the documented shapes
    └── NylasHTTPError              an HTTP error status (status, request_id, grant_id, object_id, error_type)
        ├── BadRequest              400/422: our request is wrong; retrying the same request is pointless
        │   └── InvalidApiKey       the application's API key was refused; fix NYLAS_API_KEY
        ├── GrantExpired            401: the grant is expired or revoked; mark the inbox ``auth_expired``
        ├── NotFound                404: the object (or grant) is gone; a normal event, not a failure
        ├── RateLimited             429: retry after ``retry_after_ms``; never slept on inside a worker
        │   └── PacingLimitReached  our own shared pacer would make the call wait longer than allowed
        └── ServerError             5xx after the transport retries were used up; retry later with backoff

Messages never contain the API key: the client never puts it in any text it builds.
"""

from __future__ import annotations

from typing import Any

__all__ = [
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


class NylasError(Exception):
    """Base class of every error the Nylas client raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce unpickles by calling the class with `args`, which cannot carry a keyword-only
        # argument (``status=``). Unpickle as any object instead: made without __init__, attributes restored.
        return _uninitialised, (type(self), *self.args), self.__dict__


class InvalidObjectId(NylasError, ValueError):
    """An id that cannot name one object in a URL path (empty, "." or ".."); nothing was sent.

    The job or event that carried it is malformed: fix its producer. Retrying cannot help.
    """


class NylasConnectionError(NylasError):
    """Nylas gave no HTTP answer (connection refused/reset, timeout) even after the transport retries.

    Transient: re-schedule the job with a backoff.
    """

    def __init__(self, message: str, *, grant_id: str | None = None, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.grant_id = grant_id
        self.endpoint = endpoint


class ResponseShapeError(NylasError):
    """A successful answer whose JSON does not match the documented shapes.

    ``details`` holds cattrs ``transform_error`` lines (``invalid value for type, expected int @ $.data[3].date``)
    so the failure can be recorded as is; retrying will usually give the same answer.
    """

    def __init__(self, message: str, *, grant_id: str | None = None, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.grant_id = grant_id
        self.details = details or []


class NylasHTTPError(NylasError):
    """Nylas answered with an error status.

    Attributes carry everything a handler needs, so nobody parses the message: ``status``, ``request_id``
    (quote it to Nylas support), ``grant_id``, ``object_id`` (thread or message id, when the call named one),
    ``endpoint`` (e.g. ``threads.get``), ``error_type`` (Nylas ``error.type``, e.g. ``not_found_error``) and
    ``provider_error`` (the provider's raw error object, when Nylas passed one on).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        request_id: str | None = None,
        grant_id: str | None = None,
        object_id: str | None = None,
        endpoint: str | None = None,
        error_type: str | None = None,
        provider_error: object | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id
        self.grant_id = grant_id
        self.object_id = object_id
        self.endpoint = endpoint
        self.error_type = error_type
        self.provider_error = provider_error


class BadRequest(NylasHTTPError):
    """Nylas rejected the request as malformed (400/422). Retrying the same request will fail the same way."""


class InvalidApiKey(BadRequest):
    """Nylas refused the application's API key (``token.unauthorized_access``). Fix NYLAS_API_KEY; no grant is at fault."""


class GrantExpired(NylasHTTPError):
    """The grant is expired or revoked (401). Mark the inbox ``auth_expired`` and stop its jobs; retrying is pointless."""


class NotFound(NylasHTTPError):
    """The object does not exist (404): deleted or moved since we heard of it. Treat it as gone, not as a failure."""


class RateLimited(NylasHTTPError):
    """Too many requests (429). Re-schedule the work after ``retry_after_ms`` instead of sleeping in a worker thread.

    ``retry_after_given`` tells whether the server sent ``Retry-After``; when it did not, ``retry_after_ms`` is the
    client's default delay.
    """

    def __init__(self, message: str, *, retry_after_ms: int, retry_after_given: bool = True, **kwargs: object) -> None:
        kwargs.setdefault("status", 429)
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after_ms = retry_after_ms
        self.retry_after_given = retry_after_given


class PacingLimitReached(RateLimited):
    """The shared pacer would hold this call longer than its ``max_wait_ms``; no request was sent.

    It is a ``RateLimited`` so callers re-schedule it the same way, after ``retry_after_ms``.
    """


class ServerError(NylasHTTPError):
    """Nylas or the provider failed (5xx) and the transport retries were used up. Retry later with a backoff."""


def _uninitialised(cls: type[NylasError], *args: Any) -> NylasError:
    """An error of `cls` with `args` but no attributes yet: unpickling restores them next."""
    return cls.__new__(cls, *args)

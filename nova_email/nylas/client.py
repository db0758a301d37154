"""The Nylas v3 HTTP client: one pooled ``requests.Session``, transport retries, typed errors, paginated iterators.

Policy, in one place:

- Connection errors, read errors and 5xx are retried by urllib3's ``Retry`` inside the call, with exponential backoff
  plus jitter, at most ``max_retries`` times (only GETs, which are all we send). A 503's ``Retry-After`` is honoured
  up to ``DEFAULT_RETRY_AFTER_MAX_S``.
- A 429 is never slept on: it raises ``RateLimited`` at once with the server's ``Retry-After`` (seconds or HTTP-date),
  so the actor can re-schedule its job with that delay and free the worker thread.
- Every HTTP attempt (retried ones too) is counted per (endpoint, status) in an ``ApiCallCounter``.
- The API key travels only in the ``Authorization`` header; it is in no log line, exception text or repr.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import requests
from loguru import logger
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from nova_email.nylas import errors
from nova_email.nylas.metrics import NO_RESPONSE, ApiCallCounter, endpoint_of, process_counter
from nova_email.nylas.models import Message, MessagePage, Thread, ThreadPage, structure

if TYPE_CHECKING:
    from urllib3.connectionpool import ConnectionPool
    from urllib3.response import BaseHTTPResponse

    from nova_email.nylas.pacing import Pacer

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "MAX_PAGE_LIMIT",
    "MESSAGE_SELECT",
    "ONE_YEAR",
    "THREAD_SELECT",
    "NylasClient",
    "build_session",
    "one_year_window",
    "parse_retry_after_ms",
]

log = logger.bind(component="NylasClient")

#: Seconds to wait for a connection and then for each read of an answer.
DEFAULT_TIMEOUT_S = 30.0
#: Transport retries (connection errors, read errors, 5xx) inside one call.
DEFAULT_MAX_RETRIES = 3
#: urllib3 backoff: factor * 2**(n-1) seconds, plus up to ``DEFAULT_BACKOFF_JITTER_S`` of jitter, capped below.
DEFAULT_BACKOFF_FACTOR_S = 0.5
DEFAULT_BACKOFF_JITTER_S = 0.5
DEFAULT_BACKOFF_MAX_S = 8.0
#: Longest 503 ``Retry-After`` slept on inside a call; longer ones are cut to this.
DEFAULT_RETRY_AFTER_MAX_S = 10
#: Delay carried by ``RateLimited`` when a 429 has no ``Retry-After`` header.
DEFAULT_RATE_LIMIT_DELAY_MS = 2_000
#: Upper bound on a ``Retry-After`` we pass on (one hour): a wild header must not park a job for days.
MAX_RATE_LIMIT_DELAY_S = 3_600
#: API keys shorter than this are not masked in error texts (real keys are much longer).
MIN_REDACTED_KEY_CHARS = 8
#: Connections kept per host; one per worker thread is enough.
DEFAULT_POOL_MAXSIZE = 16
#: The API's maximum ``limit`` for thread and message lists (docs: default 50, max 200).
MAX_PAGE_LIMIT = 200
#: The backfill never looks further back than this; the database's backfill_window() (migration 065) is the same span,
#: which tests/sql/test_backfill_api.py checks.
ONE_YEAR = timedelta(days=365)
#: Thread fields the service stores; listing only these keeps pages small (``latest_draft_or_message`` would carry a
#: whole message). With them a listed thread can be written without fetching it again.
THREAD_SELECT: tuple[str, ...] = (
    "id", "grant_id", "subject", "snippet", "participants", "message_ids", "draft_ids", "folders", "unread", "starred",
    "has_attachments", "has_drafts", "earliest_message_date", "latest_message_received_date",
    "latest_message_sent_date",
)  # fmt: skip
#: Message fields the service stores (``headers`` would need ``fields=include_headers``, which we do not ask for).
MESSAGE_SELECT: tuple[str, ...] = (
    "id", "grant_id", "thread_id", "subject", "from", "to", "cc", "bcc", "reply_to", "date", "created_at",
    "unread", "starred", "snippet", "body", "folders", "attachments", "metadata",
)  # fmt: skip


def _version_of(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "0"


#: Sent on every call so Nylas can tell our traffic apart.
USER_AGENT = f"nova-email/{_version_of('nova-email')} python-requests/{_version_of('requests')}"


class _CountingRetry(Retry):
    """urllib3 ``Retry`` that counts each retried attempt and never retries a 429 by itself."""

    # A 429 must reach the caller as RateLimited; only a 503's Retry-After is honoured in-call.
    RETRY_AFTER_STATUS_CODES = frozenset({503})

    def __init__(self, *args: Any, counter: ApiCallCounter | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counter = counter

    def new(self, **kw: Any) -> Self:
        retry = super().new(**kw)
        retry.counter = self.counter
        return retry

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        # When retries are exhausted super() raises and the caller sees the final outcome, which it counts itself.
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        if self.counter is not None:
            status = response.status if response is not None and response.status else NO_RESPONSE
            self.counter.record(endpoint_of(url), status)
        return retry


def build_session(
    *,
    max_retries: int = DEFAULT_MAX_RETRIES,
    counter: ApiCallCounter | None = None,
    pool_maxsize: int = DEFAULT_POOL_MAXSIZE,
    backoff_factor_s: float = DEFAULT_BACKOFF_FACTOR_S,
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
    backoff_jitter_s: float = DEFAULT_BACKOFF_JITTER_S,
) -> requests.Session:
    """A pooled session whose adapters retry transient faults with backoff and jitter. One per process is enough."""
    retry = _CountingRetry(
        total=max_retries,
        connect=max_retries,
        read=max_retries,
        status=max_retries,
        other=0,
        redirect=0,
        allowed_methods=frozenset({"GET"}),
        status_forcelist=frozenset({500, 502, 503, 504}),
        backoff_factor=backoff_factor_s,
        backoff_jitter=backoff_jitter_s,
        backoff_max=backoff_max_s,
        retry_after_max=DEFAULT_RETRY_AFTER_MAX_S,
        raise_on_status=False,
        raise_on_redirect=False,
        counter=counter,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=4, pool_maxsize=pool_maxsize)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
    return session


class _BearerAuth(requests.auth.AuthBase):
    """Adds the API key at send time, so it sits in no session attribute a traceback would print."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._api_key}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(api_key='***')"


def parse_retry_after_ms(value: str | None, *, default_ms: int = DEFAULT_RATE_LIMIT_DELAY_MS) -> tuple[int, bool]:
    """Read a ``Retry-After`` header (delta seconds or HTTP-date) as milliseconds; ``(ms, header_was_usable)``."""
    if value is None or not value.strip():
        return default_ms, False
    try:
        seconds = Retry(retry_after_max=MAX_RATE_LIMIT_DELAY_S).parse_retry_after(value)
    except InvalidHeader:
        return default_ms, False
    return math.ceil(seconds * 1000), True


def one_year_window(
    latest_message_after: datetime, latest_message_before: datetime | None = None, *, now: datetime | None = None
) -> tuple[datetime, datetime | None]:
    """Cap a backfill window to one year back from its end (or from now when it is open-ended)."""
    for name, value in (
        ("latest_message_after", latest_message_after),
        ("latest_message_before", latest_message_before),
    ):
        if value is not None and value.tzinfo is None:
            msg = f"{name}={value!r} is a naive datetime; pass an aware one (e.g. datetime.now(UTC))"
            raise ValueError(msg)
    end = latest_message_before or now or datetime.now(UTC)
    if latest_message_after < end - ONE_YEAR:
        return end - ONE_YEAR, latest_message_before
    return latest_message_after, latest_message_before


def _unix(value: datetime) -> int:
    return int(value.timestamp())


def _path(grant_id: str, collection: str, object_id: str | None = None) -> str:
    """``/v3/grants/{grant}/{collection}[/{object}]`` with each id quoted as one path segment.

    Raises:
        InvalidObjectId: an id is empty or dots only, which URL normalisation would resolve to another resource.
    """
    path = f"/v3/grants/{_segment(grant_id)}/{collection}"
    return path if object_id is None else f"{path}/{_segment(object_id)}"


def _segment(object_id: str) -> str:
    if not object_id.strip("."):
        msg = f"{object_id!r} cannot be a Nylas id; the job or event that carried it is malformed"
        raise errors.InvalidObjectId(msg)
    return quote(object_id, safe="")


def _list_params(
    limit: int, page_token: str | None, select: Sequence[str] | None, filters: Mapping[str, object]
) -> dict[str, Any]:
    """Query parameters of a list call: the filters that are set (datetimes as unix seconds), cursor and fields."""
    params: dict[str, Any] = {"limit": limit}
    for name, value in filters.items():
        if value is not None:
            params[name] = _unix(value) if isinstance(value, datetime) else value
    if page_token:
        params["page_token"] = page_token
    if select:
        params["select"] = ",".join(select)
    return params


class NylasClient:
    """Talks to the Nylas v3 API for one application (API key). Thread-safe; keep one per process.

    Parameters:
        api_key: the application's API key; sent as ``Authorization: Bearer``, never logged.
        api_uri: the region's base URL, e.g. ``https://api.us.nylas.com`` (or the simulator's URL).
        timeout_s: connect and read timeout of every HTTP attempt.
        max_retries: transport retries per call (connection errors, 5xx). Ignored when ``session`` is given.
        pacer: shared token bucket consulted before every call; ``None`` sends at once.
        session: a ready session (tests); by default one is built with ``build_session``.
        counter: where attempts are counted; by default the process-wide ``metrics.process_counter()``.
        pool_maxsize: HTTP connections kept open for reuse: the number of threads that call at once. A caller beyond
            it opens a connection and closes it after its call. Ignored when ``session`` is given.
    """

    def __init__(
        self,
        *,
        api_key: str,
        api_uri: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        pacer: Pacer | None = None,
        session: requests.Session | None = None,
        counter: ApiCallCounter | None = None,
        pool_maxsize: int = DEFAULT_POOL_MAXSIZE,
    ) -> None:
        self._api_key = api_key
        self._base = api_uri.rstrip("/")
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._pacer = pacer
        self.counter = counter or process_counter()
        self._session = session or build_session(
            max_retries=max_retries, counter=self.counter, pool_maxsize=pool_maxsize
        )
        self._auth = _BearerAuth(api_key)

    def __repr__(self) -> str:
        return f"NylasClient(api_uri={self._base!r}, api_key='***')"

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    # -- single objects ------------------------------------------------------------------------------------------

    def get_thread(self, grant_id: str, thread_id: str) -> Thread:
        """Fetch one thread. Raises ``NotFound`` when it was deleted."""
        path = _path(grant_id, "threads", thread_id)
        body = self._get(path, {}, grant_id=grant_id, endpoint="threads.get", object_id=thread_id)
        return structure(body.get("data"), Thread, where="$.data", grant_id=grant_id)

    def get_message(self, grant_id: str, message_id: str, *, select: Sequence[str] | None = None) -> Message:
        """Fetch one message with its body. Raises ``NotFound`` when it was deleted."""
        path = _path(grant_id, "messages", message_id)
        params = {"select": ",".join(select)} if select else {}
        body = self._get(path, params, grant_id=grant_id, endpoint="messages.get", object_id=message_id)
        return structure(body.get("data"), Message, where="$.data", grant_id=grant_id)

    # -- lists ---------------------------------------------------------------------------------------------------

    def list_threads(
        self,
        grant_id: str,
        *,
        latest_message_after: datetime | None = None,
        latest_message_before: datetime | None = None,
        page_token: str | None = None,
        limit: int = MAX_PAGE_LIMIT,
        select: Sequence[str] | None = THREAD_SELECT,
    ) -> ThreadPage:
        """Fetch one page of threads; prefer ``iter_threads``, which follows the cursor."""
        filters = {"latest_message_after": latest_message_after, "latest_message_before": latest_message_before}
        params = _list_params(limit, page_token, select, filters)
        path = _path(grant_id, "threads")
        body = self._get(path, params, grant_id=grant_id, endpoint="threads.list")
        items, cursor = self._page_of(body, grant_id=grant_id)
        threads = tuple(
            structure(item, Thread, where=f"$.data[{i}]", grant_id=grant_id) for i, item in enumerate(items)
        )
        return ThreadPage(threads=threads, next_cursor=cursor, page_token=page_token, request_id=body.get("request_id"))

    def iter_threads(
        self,
        grant_id: str,
        *,
        latest_message_after: datetime,
        latest_message_before: datetime | None = None,
        page_token: str | None = None,
        limit: int = MAX_PAGE_LIMIT,
        select: Sequence[str] | None = THREAD_SELECT,
    ) -> Iterator[ThreadPage]:
        """Yield every page of threads whose latest message falls in the window, capped to one year back.

        Start from ``page_token`` to resume from a checkpoint; store each page's ``next_cursor`` after handling it.
        Google does not list threads in date order, so never stop early on "older than the window" heuristics.
        """
        after, before = one_year_window(latest_message_after, latest_message_before)
        if after != latest_message_after:
            log.info("Capped the thread window of grant {} to one year: from {}", grant_id, after.isoformat())
        token = page_token
        while True:
            page = self.list_threads(
                grant_id,
                latest_message_after=after,
                latest_message_before=before,
                page_token=token,
                limit=limit,
                select=select,
            )
            yield page
            if page.next_cursor is None:
                return
            token = self._advance(token, page.next_cursor, grant_id=grant_id)

    def list_messages(
        self,
        grant_id: str,
        *,
        thread_id: str | None = None,
        received_after: datetime | None = None,
        received_before: datetime | None = None,
        page_token: str | None = None,
        limit: int = MAX_PAGE_LIMIT,
        select: Sequence[str] | None = MESSAGE_SELECT,
    ) -> MessagePage:
        """Fetch one page of messages (newest first); prefer ``iter_thread_messages``."""
        filters = {"thread_id": thread_id, "received_after": received_after, "received_before": received_before}
        params = _list_params(limit, page_token, select, filters)
        path = _path(grant_id, "messages")
        body = self._get(path, params, grant_id=grant_id, endpoint="messages.list", object_id=thread_id)
        items, cursor = self._page_of(body, grant_id=grant_id)
        messages = tuple(
            structure(item, Message, where=f"$.data[{i}]", grant_id=grant_id) for i, item in enumerate(items)
        )
        return MessagePage(
            messages=messages, next_cursor=cursor, page_token=page_token, request_id=body.get("request_id")
        )

    def iter_thread_messages(
        self,
        grant_id: str,
        thread_id: str,
        *,
        limit: int = MAX_PAGE_LIMIT,
        select: Sequence[str] | None = MESSAGE_SELECT,
    ) -> Iterator[Message]:
        """Yield every message of a thread, following the cursor, so no long thread is cut short."""
        token: str | None = None
        while True:
            page = self.list_messages(grant_id, thread_id=thread_id, page_token=token, limit=limit, select=select)
            yield from page.messages
            if page.next_cursor is None:
                return
            token = self._advance(token, page.next_cursor, grant_id=grant_id)

    # -- transport -----------------------------------------------------------------------------------------------

    def _advance(self, token: str | None, next_cursor: str, *, grant_id: str) -> str:
        if next_cursor == token:
            # A cursor that points at its own page would loop forever.
            msg = f"Nylas returned next_cursor equal to the page_token just used (grant {grant_id!r}); stopping"
            raise errors.ResponseShapeError(msg, grant_id=grant_id, details=["$.next_cursor repeats page_token"])
        return next_cursor

    def _page_of(self, body: Mapping[str, Any], *, grant_id: str) -> tuple[list[Any], str | None]:
        data = body.get("data")
        cursor = body.get("next_cursor")
        # The Python SDK also accepts {"data": {"items": [...], "next_cursor": ...}} from a few newer endpoints.
        if isinstance(data, Mapping) and isinstance(data.get("items"), list):
            cursor = cursor or data.get("next_cursor")
            data = data["items"]
        if data is None:
            data = []
        if not isinstance(data, list) or (cursor is not None and not isinstance(cursor, str)):
            details = (
                ["$.data: expected a list"] if not isinstance(data, list) else ["$.next_cursor: expected a string"]
            )
            msg = f"Nylas returned a list envelope that does not match the documented shape: {details[0]}"
            raise errors.ResponseShapeError(msg, grant_id=grant_id, details=details)
        return data, cursor or None

    def _get(
        self, path: str, params: Mapping[str, Any], *, grant_id: str, endpoint: str, object_id: str | None = None
    ) -> dict[str, Any]:
        if self._pacer is not None:
            self._pacer.acquire(grant_id)
        what = _describe(endpoint, grant_id, object_id)
        started = time.monotonic()
        try:
            response = self._session.get(self._base + path, params=params, timeout=self._timeout_s, auth=self._auth)
        except requests.RequestException as exc:
            self.counter.record(endpoint, NO_RESPONSE, seconds=time.monotonic() - started)
            msg = self._redact(
                f"No answer from Nylas for {what} after {self._max_retries} retries "
                f"({type(exc).__name__}: {exc}); retry later"
            )
            raise errors.NylasConnectionError(msg, grant_id=grant_id, endpoint=endpoint) from exc
        self.counter.record(endpoint, response.status_code, seconds=time.monotonic() - started)
        if response.status_code >= 400:
            raise self._error_for(response, what=what, grant_id=grant_id, endpoint=endpoint, object_id=object_id)
        try:
            body = response.json()
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than Python's stack
            msg = f"Nylas answered {what} with {response.status_code} but a body that is not JSON"
            raise errors.ResponseShapeError(msg, grant_id=grant_id, details=["$: not JSON"]) from exc
        if not isinstance(body, dict):
            msg = f"Nylas answered {what} with JSON that is not an object ({type(body).__name__})"
            raise errors.ResponseShapeError(msg, grant_id=grant_id, details=["$: expected an object"])
        return body

    def _error_for(
        self, response: requests.Response, *, what: str, grant_id: str, endpoint: str, object_id: str | None
    ) -> errors.NylasHTTPError:
        status = response.status_code
        error_type, nylas_message, provider_error, request_id = _read_error_body(response)
        fields: dict[str, Any] = {
            "status": status,
            "request_id": request_id,
            "grant_id": grant_id,
            "object_id": object_id,
            "endpoint": endpoint,
            "error_type": error_type,
            "provider_error": provider_error,
        }
        said = f"({status} {error_type or 'no error type'}, request {request_id or '?'}): {nylas_message or '-'}"
        # Nylas error types come both as "api.not_found_error" and "not_found_error"; match on the suffix.
        kind = (error_type or "").rsplit(".", 1)[-1]
        if status == 429:
            delay_ms, given = parse_retry_after_ms(response.headers.get("Retry-After"))
            msg = f"Nylas rate-limited {what} {said}; retry after {delay_ms} ms"
            log.debug("Rate-limited on {} for grant {}; retry after {} ms", endpoint, grant_id, delay_ms)
            return errors.RateLimited(self._redact(msg), retry_after_ms=delay_ms, retry_after_given=given, **fields)
        if status == 404:
            msg = f"Nylas found no {what} {said}; it was deleted or moved: treat it as gone"
            return errors.NotFound(self._redact(msg), **fields)
        if kind == "unauthorized_access":
            msg = f"Nylas refused the API key on {what} {said}; check NYLAS_API_KEY"
            return errors.InvalidApiKey(self._redact(msg), **fields)
        if status == 401:
            msg = (
                f"Grant {grant_id!r} is expired or revoked: {what} was refused {said}; "
                "mark its inbox auth_expired, retrying will not help"
            )
            return errors.GrantExpired(self._redact(msg), **fields)
        if status in (400, 422):
            msg = f"Nylas rejected {what} as invalid {said}; fix the request, retrying it unchanged fails again"
            return errors.BadRequest(self._redact(msg), **fields)
        if status >= 500:
            msg = f"Nylas failed on {what} {said} after {self._max_retries} retries; retry later"
            return errors.ServerError(self._redact(msg), **fields)
        msg = f"Nylas answered {what} with an unexpected error {said}"
        return errors.NylasHTTPError(self._redact(msg), **fields)

    def _redact(self, text: str) -> str:
        # Belt and braces: nothing we build contains the key, but server text or exception text might echo it.
        # Keys too short to be real (tests) are not masked: masking "k" would garble every word with a k.
        return text.replace(self._api_key, "***") if len(self._api_key) >= MIN_REDACTED_KEY_CHARS else text


def _describe(endpoint: str, grant_id: str, object_id: str | None) -> str:
    kind = {"threads.get": "thread", "messages.get": "message", "messages.list": "messages of thread"}.get(endpoint)
    if kind and object_id is not None:
        return f"{kind} {object_id!r} of grant {grant_id!r}"
    return f"{endpoint} of grant {grant_id!r}"


def _read_error_body(response: requests.Response) -> tuple[str | None, str | None, object | None, str | None]:
    """(error.type, error.message, error.provider_error, request_id) from a Nylas error envelope, tolerating junk."""
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return None, response.text[:200] or None, None, request_id
    if not isinstance(body, dict):
        return None, None, None, request_id
    request_id = body.get("request_id") if isinstance(body.get("request_id"), str) else request_id
    error = body.get("error")
    if isinstance(error, dict):
        error_type = error.get("type")
        message = error.get("message")
        return (
            error_type if isinstance(error_type, str) else None,
            message if isinstance(message, str) else None,
            error.get("provider_error"),
            request_id,
        )
    if isinstance(error, str):  # OAuth-style bodies: {"error": "...", "error_description": "..."}
        return (
            error,
            body.get("error_description") if isinstance(body.get("error_description"), str) else None,
            None,
            request_id,
        )
    return None, None, None, request_id

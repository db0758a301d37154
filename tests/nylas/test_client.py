"""Unit tests of the Nylas client with `responses`: the requests we send and how we read what comes back."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from nova_email.nylas import (
    MAX_PAGE_LIMIT,
    MESSAGE_SELECT,
    THREAD_SELECT,
    ApiCallCounter,
    BadRequest,
    GrantExpired,
    InvalidApiKey,
    InvalidObjectId,
    NotFound,
    NylasClient,
    NylasConnectionError,
    NylasHTTPError,
    RateLimited,
    ResponseShapeError,
    ServerError,
    build_session,
    parse_retry_after_ms,
)
from nova_email.nylas.client import DEFAULT_RATE_LIMIT_DELAY_MS, DEFAULT_TIMEOUT_S

API = "https://api.test.nylas"
KEY = "nyk_v0_secret_api_key_1234567890"
GRANT = "grant-123"


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def counter() -> ApiCallCounter:
    return ApiCallCounter()


@pytest.fixture
def client(counter: ApiCallCounter) -> NylasClient:
    # No backoff sleeps in unit tests; the retry policy itself is urllib3's.
    session = build_session(max_retries=2, counter=counter, backoff_factor_s=0, backoff_jitter_s=0)
    return NylasClient(api_key=KEY, api_uri=API, max_retries=2, session=session, counter=counter)


def thread_json(thread_id: str, **extra: object) -> dict[str, object]:
    return {"object": "thread", "id": thread_id, "grant_id": GRANT, "latest_message_received_date": 1735776000, **extra}


def message_json(message_id: str, **extra: object) -> dict[str, object]:
    return {"object": "message", "id": message_id, "grant_id": GRANT, "thread_id": "thr_1", "date": 1735689600, **extra}


def query_of(call: responses.Call) -> dict[str, list[str]]:
    return parse_qs(urlsplit(str(call.request.url)).query)


# -- requests we send ------------------------------------------------------------------------------------------------


def test_every_call_carries_bearer_key_user_agent_and_timeout(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    mocked.get(f"{API}/v3/grants/{GRANT}/threads/thr_1", json={"request_id": "r1", "data": thread_json("thr_1")})

    client.get_thread(GRANT, "thr_1")

    request = mocked.calls[0].request
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert str(request.headers["User-Agent"]).startswith("nova-email/")
    assert request.headers["Accept"] == "application/json"
    assert request.req_kwargs["timeout"] == DEFAULT_TIMEOUT_S  # type: ignore[attr-defined]  # set by responses


def test_ids_are_escaped_in_the_path(mocked: responses.RequestsMock, client: NylasClient) -> None:
    mocked.get(f"{API}/v3/grants/a%2Fb/messages/m%3F1", json={"data": message_json("m?1")})

    message = client.get_message("a/b", "m?1")

    assert message.id == "m?1"


@pytest.mark.parametrize(("grant", "object_id"), [(GRANT, ".."), (GRANT, "."), ("..", "m1"), ("", "m1")])
def test_ids_that_url_normalisation_would_resolve_away_are_refused_before_any_request(
    mocked: responses.RequestsMock, client: NylasClient, grant: str, object_id: str
) -> None:
    # "/messages/.." would reach "/v3/grants/{grant}/" instead of a message; nothing may be sent
    with pytest.raises(InvalidObjectId, match="cannot be a Nylas id"):
        client.get_message(grant, object_id)

    assert len(mocked.calls) == 0


def test_thread_listing_asks_for_the_window_max_limit_and_stored_fields(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    mocked.get(f"{API}/v3/grants/{GRANT}/threads", json={"request_id": "r", "data": [thread_json("t1")]})
    after = datetime(2026, 1, 1, tzinfo=UTC)
    before = datetime(2026, 6, 1, tzinfo=UTC)

    pages = list(client.iter_threads(GRANT, latest_message_after=after, latest_message_before=before))

    query = query_of(mocked.calls[0])
    assert query["limit"] == [str(MAX_PAGE_LIMIT)]
    assert query["latest_message_after"] == [str(int(after.timestamp()))]
    assert query["latest_message_before"] == [str(int(before.timestamp()))]
    assert query["select"] == [",".join(THREAD_SELECT)]
    assert "page_token" not in query
    assert [t.id for t in pages[0].threads] == ["t1"]


def test_thread_window_is_capped_to_one_year_before_its_end(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    mocked.get(f"{API}/v3/grants/{GRANT}/threads", json={"data": []})
    before = datetime(2026, 6, 1, tzinfo=UTC)

    list(client.iter_threads(GRANT, latest_message_after=before - timedelta(days=900), latest_message_before=before))

    assert query_of(mocked.calls[0])["latest_message_after"] == [str(int((before - timedelta(days=365)).timestamp()))]


def test_naive_datetimes_are_refused(client: NylasClient) -> None:
    with pytest.raises(ValueError, match="naive"):
        next(client.iter_threads(GRANT, latest_message_after=datetime(2026, 1, 1)))


# -- pagination -------------------------------------------------------------------------------------------------------


def test_iter_threads_follows_next_cursor_and_each_page_carries_it(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    url = f"{API}/v3/grants/{GRANT}/threads"
    mocked.get(url, json={"data": [thread_json("t1"), thread_json("t2")], "next_cursor": "CUR/2+=="})
    mocked.get(url, json={"data": [thread_json("t3")], "next_cursor": "CUR-3"})
    mocked.get(url, json={"data": [], "next_cursor": None})

    pages = list(client.iter_threads(GRANT, latest_message_after=datetime.now(UTC) - timedelta(days=30)))

    assert [[t.id for t in p.threads] for p in pages] == [["t1", "t2"], ["t3"], []]
    assert [p.next_cursor for p in pages] == ["CUR/2+==", "CUR-3", None]
    assert [p.page_token for p in pages] == [None, "CUR/2+==", "CUR-3"]
    # Tokens are opaque: passed back verbatim.
    assert [query_of(c).get("page_token") for c in mocked.calls] == [None, ["CUR/2+=="], ["CUR-3"]]


def test_iter_threads_resumes_from_a_checkpointed_cursor(mocked: responses.RequestsMock, client: NylasClient) -> None:
    mocked.get(f"{API}/v3/grants/{GRANT}/threads", json={"data": [thread_json("t9")], "next_cursor": ""})

    pages = list(
        client.iter_threads(GRANT, latest_message_after=datetime.now(UTC) - timedelta(days=1), page_token="SAVED")
    )

    assert query_of(mocked.calls[0])["page_token"] == ["SAVED"]
    assert len(pages) == 1 and pages[0].next_cursor is None  # an empty cursor ends the listing


def test_list_envelope_with_items_object_is_accepted(mocked: responses.RequestsMock, client: NylasClient) -> None:
    body = {"data": {"items": [thread_json("t1")], "next_cursor": "N"}}
    mocked.get(f"{API}/v3/grants/{GRANT}/threads", json=body)

    page = client.list_threads(GRANT)

    assert [t.id for t in page.threads] == ["t1"] and page.next_cursor == "N"


def test_a_cursor_that_repeats_its_page_token_stops_the_loop(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    mocked.get(f"{API}/v3/grants/{GRANT}/threads", json={"data": [thread_json("t1")], "next_cursor": "SAME"})

    with pytest.raises(ResponseShapeError, match="next_cursor"):
        list(client.iter_threads(GRANT, latest_message_after=datetime.now(UTC), page_token="SAME"))


def test_iter_thread_messages_reads_every_page_of_a_long_thread(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    url = f"{API}/v3/grants/{GRANT}/messages"
    mocked.get(url, json={"data": [message_json(f"m{i}") for i in range(3)], "next_cursor": "P2"})
    mocked.get(url, json={"data": [message_json("m3")]})

    messages = list(client.iter_thread_messages(GRANT, "thr_1", limit=3))

    assert [m.id for m in messages] == ["m0", "m1", "m2", "m3"]
    first, second = (query_of(c) for c in mocked.calls)
    assert first["thread_id"] == ["thr_1"] and first["limit"] == ["3"]
    assert first["select"] == [",".join(MESSAGE_SELECT)]
    assert second["page_token"] == ["P2"] and second["thread_id"] == ["thr_1"]


# -- errors -----------------------------------------------------------------------------------------------------------


def error_body(error_type: str, message: str = "Something.", request_id: str = "req-err") -> dict[str, object]:
    return {"request_id": request_id, "error": {"type": error_type, "message": message}}


@pytest.mark.parametrize(
    ("status", "error_type", "expected"),
    [
        (404, "not_found_error", NotFound),
        (404, "api.not_found_error", NotFound),
        (401, "api.authentication_error", GrantExpired),
        (400, "invalid_request_error", BadRequest),
        (422, "api.invalid_request_payload", BadRequest),
        (400, "token.unauthorized_access", InvalidApiKey),
        (429, "nylas_rate_limit_exceeded", RateLimited),
        (500, "internal_error", ServerError),
        (504, "api.provider_error", ServerError),
        (423, "api.resource_blocked", NylasHTTPError),
    ],
    ids=lambda v: str(v) if not isinstance(v, type) else v.__name__,
)
def test_each_error_status_raises_its_typed_error_with_its_data(
    mocked: responses.RequestsMock,
    client: NylasClient,
    counter: ApiCallCounter,
    status: int,
    error_type: str,
    expected: type[NylasHTTPError],
) -> None:
    mocked.get(f"{API}/v3/grants/{GRANT}/messages/msg_9", status=status, json=error_body(error_type))

    with pytest.raises(expected) as caught:
        client.get_message(GRANT, "msg_9")

    error = caught.value
    assert type(error) is expected
    assert (error.status, error.request_id, error.grant_id, error.object_id) == (status, "req-err", GRANT, "msg_9")
    assert error.error_type == error_type and error.endpoint == "messages.get"
    assert GRANT in str(error) and "msg_9" in str(error) and "req-err" in str(error)
    assert KEY not in str(error)
    assert sum(counter.snapshot().values()) == len(mocked.calls)


def test_server_errors_are_retried_by_the_transport_and_every_attempt_is_counted(
    mocked: responses.RequestsMock, client: NylasClient, counter: ApiCallCounter
) -> None:
    url = f"{API}/v3/grants/{GRANT}/threads/thr_1"
    mocked.get(url, status=502, json=error_body("provider_error"))
    mocked.get(url, status=503, json=error_body("provider_error"))
    mocked.get(url, json={"data": thread_json("thr_1")})

    thread = client.get_thread(GRANT, "thr_1")

    assert thread.id == "thr_1"
    assert counter.snapshot() == {("threads.get", 502): 1, ("threads.get", 503): 1, ("threads.get", 200): 1}


def test_server_errors_beyond_the_retry_budget_raise_server_error(
    mocked: responses.RequestsMock, client: NylasClient, counter: ApiCallCounter
) -> None:
    mocked.get(f"{API}/v3/grants/{GRANT}/threads/thr_1", status=500, json=error_body("internal_error"))

    with pytest.raises(ServerError, match="after 2 retries"):
        client.get_thread(GRANT, "thr_1")

    assert len(mocked.calls) == 3  # the first attempt and two retries
    assert counter.snapshot() == {("threads.get", 500): 3}


def test_a_429_is_not_retried_in_the_call_and_carries_retry_after(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    url = f"{API}/v3/grants/{GRANT}/threads"
    mocked.get(url, status=429, headers={"Retry-After": "7"}, json=error_body("rate_limit_error"))
    mocked.get(url, json={"data": []})

    started = time.monotonic()
    with pytest.raises(RateLimited) as caught:
        client.list_threads(GRANT)

    assert time.monotonic() - started < 2  # urllib3 would have slept 7 s had it retried
    assert len(mocked.calls) == 1
    assert caught.value.retry_after_ms == 7000 and caught.value.retry_after_given


def test_a_429_with_an_http_date_retry_after_carries_the_delay_until_that_date(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    mocked.get(f"{API}/v3/grants/{GRANT}/threads", status=429, headers={"Retry-After": when}, json=error_body("x"))

    with pytest.raises(RateLimited) as caught:
        client.list_threads(GRANT)

    # Whole seconds in the header: 29-30 s from now, give or take the test's own time
    assert 28_000 <= caught.value.retry_after_ms <= 31_000 and caught.value.retry_after_given


def test_a_429_without_retry_after_carries_the_default_delay(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    mocked.get(f"{API}/v3/grants/{GRANT}/threads", status=429, json=error_body("nylas_rate_limit_exceeded"))

    with pytest.raises(RateLimited) as caught:
        client.list_threads(GRANT)

    assert caught.value.retry_after_ms == DEFAULT_RATE_LIMIT_DELAY_MS and not caught.value.retry_after_given


def test_retry_after_is_read_in_seconds_and_in_http_date_form() -> None:
    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)

    assert parse_retry_after_ms("12") == (12_000, True)
    assert parse_retry_after_ms(" 0 ") == (0, True)
    ms, given = parse_retry_after_ms(in_30_s)
    assert given and 28_000 <= ms <= 30_000
    assert parse_retry_after_ms(email.utils.formatdate(time.time() - 60, usegmt=True)) == (0, True)
    assert parse_retry_after_ms("soon") == (DEFAULT_RATE_LIMIT_DELAY_MS, False)
    assert parse_retry_after_ms(None) == (DEFAULT_RATE_LIMIT_DELAY_MS, False)
    assert parse_retry_after_ms("999999") == (3_600_000, True)  # capped at an hour


def test_error_bodies_that_are_not_the_documented_envelope_still_give_typed_errors(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    url = f"{API}/v3/grants/{GRANT}/threads/t"
    mocked.get(url, status=404, body="<html>gone</html>", headers={"x-request-id": "hdr-req"})

    with pytest.raises(NotFound) as caught:
        client.get_thread(GRANT, "t")

    assert caught.value.request_id == "hdr-req" and caught.value.error_type is None


def test_connection_failures_raise_a_connection_error_counted_without_status(
    mocked: responses.RequestsMock, client: NylasClient, counter: ApiCallCounter
) -> None:
    mocked.get(f"{API}/v3/grants/{GRANT}/threads/t", body=requests.ConnectionError("connection reset by peer"))

    with pytest.raises(NylasConnectionError, match="retry later") as caught:
        client.get_thread(GRANT, "t")

    assert caught.value.grant_id == GRANT and caught.value.endpoint == "threads.get"
    assert counter.snapshot() == {("threads.get", 0): 1}


def test_non_json_or_misshapen_answers_raise_response_shape_error_with_the_path(
    mocked: responses.RequestsMock, client: NylasClient
) -> None:
    url = f"{API}/v3/grants/{GRANT}/threads"
    mocked.get(url, body="not json")
    mocked.get(url, json={"data": [thread_json("t1"), {"id": "t2", "latest_message_received_date": "yesterday"}]})
    mocked.get(url, json={"data": "nope"})

    with pytest.raises(ResponseShapeError, match="not JSON"):
        client.list_threads(GRANT)
    with pytest.raises(ResponseShapeError) as caught:
        client.list_threads(GRANT)
    assert caught.value.details == [
        "invalid value for type, expected datetime.datetime | None @ $.data[1].latest_message_received_date"
    ]
    with pytest.raises(ResponseShapeError, match="expected a list"):
        client.list_threads(GRANT)


# -- redaction --------------------------------------------------------------------------------------------------------


def test_the_api_key_never_appears_in_errors_or_reprs(mocked: responses.RequestsMock, client: NylasClient) -> None:
    # Given a server that echoes the key back in its error text
    echo = error_body("invalid_request_error", message=f"bad header Bearer {KEY}")
    mocked.get(f"{API}/v3/grants/{GRANT}/threads", status=400, json=echo)
    mocked.get(f"{API}/v3/grants/{GRANT}/threads/t", body=requests.ConnectionError(f"boom {KEY}"))

    with pytest.raises(BadRequest) as bad:
        client.list_threads(GRANT)
    with pytest.raises(NylasConnectionError) as down:
        client.get_thread(GRANT, "t")

    for text in (str(bad.value), repr(bad.value), str(down.value), repr(client), repr(client._auth)):
        assert KEY not in text
    assert "***" in str(bad.value)

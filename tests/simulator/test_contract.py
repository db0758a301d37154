"""Contract tests: the simulator's JSON has the shapes and semantics docs/nylas-v3.md documents (b.2-b.6, d.1)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import requests

from nova_email.simulator import SimulatorHandle
from tests.nylas.test_models import DOC_MESSAGE, DOC_THREAD

THREAD_TYPES: dict[str, tuple[type, ...]] = {
    "object": (str,), "id": (str,), "grant_id": (str,), "subject": (str,), "snippet": (str,),
    "participants": (list,), "message_ids": (list,), "draft_ids": (list,), "folders": (list,), "unread": (bool,),
    "starred": (bool,), "has_attachments": (bool,), "has_drafts": (bool,), "earliest_message_date": (int,),
    "latest_message_received_date": (int, type(None)), "latest_message_sent_date": (int, type(None)),
    "latest_draft_or_message": (dict,),
}  # fmt: skip
MESSAGE_TYPES: dict[str, tuple[type, ...]] = {
    "object": (str,), "id": (str,), "grant_id": (str,), "thread_id": (str,), "subject": (str,), "from": (list,),
    "to": (list,), "cc": (list,), "bcc": (list,), "reply_to": (list,), "date": (int,), "created_at": (int,),
    "unread": (bool,), "starred": (bool,), "snippet": (str,), "body": (str,), "folders": (list,),
    "attachments": (list,), "metadata": (dict,),
}  # fmt: skip


def api(sim: SimulatorHandle, path: str) -> str:
    return f"{sim.base_url}/v3/grants/{path}"


def assert_participants(values: list[Any]) -> None:
    for p in values:
        assert isinstance(p["email"], str) and "@" in p["email"]
        assert set(p) <= {"name", "email"}


def assert_message_shape(message: dict[str, Any], *, body: bool = True) -> None:
    expected = MESSAGE_TYPES if body else {k: v for k, v in MESSAGE_TYPES.items() if k != "body"}
    assert set(DOC_MESSAGE) <= set(message) | ({"body"} - set(expected))
    for key, types in expected.items():
        assert isinstance(message[key], types), (key, message[key])
    assert message["object"] == "message"
    for key in ("from", "to", "cc", "bcc", "reply_to"):
        assert_participants(message[key])
    assert all(isinstance(f, str) for f in message["folders"])
    for a in message["attachments"]:
        assert {"id", "grant_id", "filename", "content_type", "size", "is_inline"} <= set(a)
        assert isinstance(a["size"], int) and isinstance(a["is_inline"], bool)


def assert_thread_shape(thread: dict[str, Any]) -> None:
    assert set(DOC_THREAD) <= set(thread)
    for key, types in THREAD_TYPES.items():
        assert isinstance(thread[key], types), (key, thread[key])
    assert thread["object"] == "thread"
    assert_participants(thread["participants"])
    assert_message_shape(thread["latest_draft_or_message"])


def assert_error(response: requests.Response, status: int, error_type: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert isinstance(body["request_id"], str) and body["request_id"]
    assert body["error"]["type"] == error_type and isinstance(body["error"]["message"], str)
    assert response.headers["x-request-id"] == body["request_id"]


def list_all(http: requests.Session, url: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    pages = 0
    token = None
    while True:
        body = http.get(url, params={**params, **({"page_token": token} if token else {})}).json()
        items.extend(body["data"])
        pages += 1
        token = body.get("next_cursor")
        if not token:
            return items, pages


def test_thread_list_and_get_use_the_documented_envelopes_and_shapes(
    sim: SimulatorHandle, http: requests.Session
) -> None:
    listed = http.get(api(sim, "grant-a/threads")).json()

    assert set(listed) == {"request_id", "data", "next_cursor"}
    assert len(listed["data"]) == 50  # the documented default limit
    for thread in listed["data"]:
        assert_thread_shape(thread)
    single = http.get(api(sim, f"grant-a/threads/{listed['data'][0]['id']}")).json()
    assert set(single) == {"request_id", "data"} and single["data"] == listed["data"][0]


def test_message_list_and_get_use_the_documented_envelopes_and_shapes(
    sim: SimulatorHandle, http: requests.Session
) -> None:
    listed = http.get(api(sim, "grant-a/messages"), params={"limit": 30}).json()

    assert len(listed["data"]) == 30 and listed["next_cursor"]
    for message in listed["data"]:
        assert_message_shape(message)
    dates = [m["date"] for m in listed["data"]]
    assert dates == sorted(dates, reverse=True)  # reverse-chronological
    single = http.get(api(sim, f"grant-a/messages/{listed['data'][0]['id']}")).json()
    assert single["data"] == listed["data"][0]


def test_thread_fields_are_derived_from_its_messages(sim: SimulatorHandle, http: requests.Session) -> None:
    threads, _ = list_all(http, api(sim, "grant-a/threads"), limit=200)

    for thread in threads[:25]:
        messages, _ = list_all(http, api(sim, "grant-a/messages"), thread_id=thread["id"])
        assert sorted(thread["message_ids"]) == sorted(m["id"] for m in messages)
        assert thread["unread"] == any(m["unread"] for m in messages)
        assert thread["starred"] == any(m["starred"] for m in messages)
        assert thread["has_attachments"] == any(m["attachments"] for m in messages)
        assert set(thread["folders"]) == {f for m in messages for f in m["folders"]}
        emails = {p["email"] for m in messages for k in ("from", "to", "cc") for p in m[k]}
        assert {p["email"] for p in thread["participants"]} == emails
        assert thread["earliest_message_date"] == min(m["date"] for m in messages)
        received = [m["date"] for m in messages if "SENT" not in m["folders"]]
        assert thread["latest_message_received_date"] == max(received)
        assert thread["latest_draft_or_message"]["id"] == max(messages, key=lambda m: (m["date"], m["id"]))["id"]


def test_pages_cover_every_thread_once_in_reverse_chronological_order(
    sim: SimulatorHandle, http: requests.Session
) -> None:
    threads, pages = list_all(http, api(sim, "grant-a/threads"), limit=7)

    assert pages == 9  # 60 threads, 7 per page
    assert len({t["id"] for t in threads}) == len(threads) == 60
    latest = [t["latest_message_received_date"] for t in threads]
    assert latest == sorted(latest, reverse=True)


def test_latest_message_window_filters_threads_inclusively(sim: SimulatorHandle, http: requests.Session) -> None:
    everything, _ = list_all(http, api(sim, "grant-a/threads"), limit=200)
    dates = sorted(t["latest_message_received_date"] for t in everything)
    after, before = dates[10], dates[40]

    windowed, _ = list_all(
        http, api(sim, "grant-a/threads"), latest_message_after=after, latest_message_before=before, limit=200
    )

    assert sorted(t["latest_message_received_date"] for t in windowed) == [d for d in dates if after <= d <= before]


def test_received_window_and_thread_id_filter_messages(sim: SimulatorHandle, http: requests.Session) -> None:
    everything, _ = list_all(http, api(sim, "grant-a/messages"), limit=200)
    dates = sorted(m["date"] for m in everything)
    after, before = dates[20], dates[100]
    thread_id = everything[0]["thread_id"]

    windowed, _ = list_all(http, api(sim, "grant-a/messages"), received_after=after, received_before=before, limit=200)
    of_thread, _ = list_all(http, api(sim, "grant-a/messages"), thread_id=thread_id)

    assert sorted(m["date"] for m in windowed) == [d for d in dates if after <= d <= before]
    assert {m["thread_id"] for m in of_thread} == {thread_id}
    assert len(of_thread) == sum(1 for m in everything if m["thread_id"] == thread_id)


def test_select_returns_only_the_selected_fields_and_the_id(sim: SimulatorHandle, http: requests.Session) -> None:
    threads = http.get(api(sim, "grant-a/threads"), params={"select": "subject,unread"}).json()["data"]
    messages = http.get(api(sim, "grant-a/messages"), params={"select": "thread_id,date"}).json()["data"]

    assert all(set(t) == {"id", "subject", "unread"} for t in threads)
    assert all(set(m) == {"id", "thread_id", "date"} for m in messages)


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        base64.urlsafe_b64encode(b"0123456789abcdef:50").decode(),  # well-formed, but from another query
    ],
    ids=["garbage", "foreign"],
)
def test_a_page_token_from_elsewhere_is_refused(sim: SimulatorHandle, http: requests.Session, token: str) -> None:
    response = http.get(api(sim, "grant-a/threads"), params={"page_token": token})

    assert_error(response, 400, "invalid_request_error")


def test_a_cursor_is_bound_to_its_grant_and_filters(sim: SimulatorHandle, http: requests.Session) -> None:
    cursor = http.get(api(sim, "grant-a/threads"), params={"limit": 5}).json()["next_cursor"]

    assert http.get(api(sim, "grant-a/threads"), params={"limit": 9, "page_token": cursor}).status_code == 200
    assert_error(http.get(api(sim, "grant-b/threads"), params={"page_token": cursor}), 400, "invalid_request_error")
    assert_error(
        http.get(api(sim, "grant-a/threads"), params={"page_token": cursor, "unread": "true"}),
        400,
        "invalid_request_error",
    )


def test_a_limit_above_200_is_refused(sim: SimulatorHandle, http: requests.Session) -> None:
    assert_error(http.get(api(sim, "grant-a/messages"), params={"limit": 201}), 400, "invalid_request_error")
    assert http.get(api(sim, "grant-a/messages"), params={"limit": 200}).status_code == 200


def test_errors_use_the_documented_envelope(sim: SimulatorHandle, http: requests.Session) -> None:
    assert_error(http.get(api(sim, "grant-a/threads/thr_missing")), 404, "not_found_error")
    assert_error(http.get(api(sim, "grant-a/messages/msg_missing")), 404, "not_found_error")
    assert_error(http.get(api(sim, "grant-zzz/threads")), 404, "not_found_error")
    assert_error(requests.get(api(sim, "grant-a/threads")), 400, "token.unauthorized_access")
    sim.simulator.expire_grant("grant-b")
    assert_error(http.get(api(sim, "grant-b/threads")), 401, "authentication_error")


def test_large_answers_are_gzipped_when_asked(sim: SimulatorHandle, http: requests.Session) -> None:
    response = http.get(api(sim, "grant-a/messages"), headers={"Accept-Encoding": "gzip"})

    assert response.headers["Content-Encoding"] == "gzip"
    assert len(response.json()["data"]) == 50  # requests decompresses transparently


def test_include_headers_adds_threading_headers(sim: SimulatorHandle, http: requests.Session) -> None:
    thread = max(sim.simulator.grants["grant-a"].threads.values(), key=lambda t: len(t.messages))
    second = thread.messages[1]

    data = http.get(api(sim, f"grant-a/messages/{second.id}"), params={"fields": "include_headers"}).json()["data"]

    names = {h["name"]: h["value"] for h in data["headers"]}
    assert names["In-Reply-To"] == f"<{thread.messages[0].id}@sim.example>"

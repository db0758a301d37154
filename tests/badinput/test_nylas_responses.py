"""Nylas answers that break the documented shapes end in a ``NylasError`` that says what was wrong, never in a
``KeyError`` or ``TypeError`` from deep inside; a thread sync over them fails with that error and stores nothing."""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nova_email import thread_sync
from nova_email.jobs import ThreadSyncJob
from nova_email.nylas.client import NylasClient
from nova_email.nylas.errors import NylasError
from tests.badinput.strategies import hostile_text, json_value

#: Bodies tried across the module's examples.
TRIED = [0]


class _BrokenNylas(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's current `body` (bytes) and `status`."""

    server: _BrokenServer

    def do_GET(self) -> None:
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class _BrokenServer(http.server.ThreadingHTTPServer):
    body = b"{}"
    status = 200


@pytest.fixture(scope="module")
def broken() -> Iterator[_BrokenServer]:
    server = _BrokenServer(("127.0.0.1", 0), _BrokenNylas)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _thread_like() -> st.SearchStrategy[dict[str, Any]]:
    fields = ["id", "grant_id", "subject", "participants", "message_ids", "folders", "latest_message_received_date"]
    fields += ["earliest_message_date", "unread", "starred", "snippet", "has_attachments"]
    return st.fixed_dictionaries({}, optional={f: json_value for f in fields})


def _message_like() -> st.SearchStrategy[dict[str, Any]]:
    fields = ["id", "grant_id", "thread_id", "subject", "from", "to", "cc", "date", "body", "folders", "unread"]
    fields += ["attachments", "reply_to", "starred"]
    return st.fixed_dictionaries({}, optional={f: json_value for f in fields})


def bodies() -> st.SearchStrategy[bytes]:
    """Response bodies: documented envelopes with junk inside, junk envelopes, and text that is not JSON at all."""
    item = st.one_of(_thread_like(), _message_like(), json_value)
    envelope = st.fixed_dictionaries(
        {"request_id": hostile_text},
        optional={
            "data": st.one_of(item, st.lists(item, max_size=3), json_value),
            "next_cursor": st.one_of(hostile_text, json_value),
        },
    )
    return st.one_of(
        envelope.map(lambda e: json.dumps(e).encode()),
        json_value.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=100),
        st.sampled_from([b"", b"<html>502 Bad Gateway</html>", b'{"data": ' + b"[" * 5000 + b"]" * 5000 + b"}"]),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies(), status=st.sampled_from([200, 200, 200, 404, 401, 400, 429, 503]))
def test_every_client_call_over_a_broken_answer_returns_a_model_or_raises_a_nylas_error(
    broken: _BrokenServer, body: bytes, status: int
) -> None:
    broken.body, broken.status = body, status
    TRIED[0] += 1
    client = NylasClient(api_key="k", api_uri=f"http://127.0.0.1:{broken.server_address[1]}", max_retries=0)
    calls: list[Callable[[], object]] = [
        lambda: client.get_thread("g", "t"),
        lambda: client.get_message("g", "m"),
        lambda: client.list_threads("g"),
        lambda: list(client.iter_thread_messages("g", "t")),
    ]
    try:
        for call in calls:
            try:
                call()
            except NylasError as exc:
                assert str(exc), "a NylasError without a message"
    finally:
        client.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies())
def test_a_thread_sync_over_a_broken_answer_fails_with_a_nylas_error_and_stores_nothing(
    broken: _BrokenServer, conn: psycopg.Connection[Any], body: bytes
) -> None:
    broken.body, broken.status = body, 200
    TRIED[0] += 1
    inbox = conn.execute(
        "insert into flux_inboxes (nylas_grant_id) values (%s) returning id", [f"g-{uuid.uuid4()}"]
    ).fetchone()
    assert inbox is not None
    client = NylasClient(api_key="k", api_uri=f"http://127.0.0.1:{broken.server_address[1]}", max_retries=0)
    job = ThreadSyncJob(thread_id="t", inbox_id=inbox[0], grant_id="g")
    try:
        thread_sync.sync_thread(conn, client, job)
    except NylasError:
        stored = conn.execute("select count(*) from flux_email_threads where inbox_id = %s", [inbox[0]]).fetchone()
        assert stored == (0,)
    finally:
        client.close()


def test_report_inputs_tried() -> None:
    print(f"\n[badinput] Nylas response bodies tried: {TRIED[0]}")

"""Mutations change what the API serves and emit the matching Nylas webhooks, through every emitter."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
import requests

from nova_email.simulator import (
    HttpIntakeEmitter,
    RecordingEmitter,
    Simulator,
    SimulatorHandle,
    SqlIntakeEmitter,
    WebhookDeliveryError,
)
from tests.simulator.conftest import ANCHOR

ENVELOPE_KEYS = {"specversion", "type", "source", "id", "time", "webhook_delivery_attempt", "data"}


def api_get(sim: SimulatorHandle, http: requests.Session, path: str) -> requests.Response:
    return http.get(f"{sim.base_url}/v3/grants/{path}")


def assert_envelope(payload: dict[str, Any], type_: str, source_prefix: str) -> dict[str, Any]:
    assert set(payload) == ENVELOPE_KEYS
    assert payload["specversion"] == "1.0" and payload["type"] == type_
    assert payload["source"].startswith(source_prefix) and payload["id"].startswith("ntf_")
    assert isinstance(payload["time"], int) and payload["webhook_delivery_attempt"] == 1
    assert payload["data"]["application_id"]
    obj: dict[str, Any] = payload["data"]["object"]
    return obj


def test_a_new_message_is_served_and_announced_with_message_created(
    sim: SimulatorHandle, http: requests.Session, recorder: RecordingEmitter
) -> None:
    thread_id = next(iter(sim.simulator.grants["grant-a"].threads))

    added = sim.simulator.add_message("grant-a", thread_id=thread_id, subject="Ça marche 👍", unread=True)

    served = api_get(sim, http, f"grant-a/messages/{added['id']}").json()["data"]
    thread = api_get(sim, http, f"grant-a/threads/{thread_id}").json()["data"]
    assert served == added and served["unread"] and "UNREAD" in served["folders"]
    assert thread["message_ids"][-1] == added["id"] and thread["latest_draft_or_message"]["id"] == added["id"]
    assert thread["latest_message_received_date"] == added["date"] and thread["unread"]
    note = recorder.notifications[0]
    obj = assert_envelope(note.payload, "message.created", "/google/emails/realtime")
    assert obj == added and note.grant_id == "grant-a" and note.type == "message.created"


def test_a_message_in_a_new_thread_creates_the_thread(sim: SimulatorHandle, http: requests.Session) -> None:
    added = sim.simulator.add_message("grant-a", subject="Brand new")

    thread = api_get(sim, http, f"grant-a/threads/{added['thread_id']}").json()["data"]

    assert thread["message_ids"] == [added["id"]] and thread["subject"] == "Brand new"


def test_marking_read_is_served_and_announced_with_message_updated(
    sim: SimulatorHandle, http: requests.Session, recorder: RecordingEmitter
) -> None:
    unread = next(m for m in sim.simulator.grants["grant-a"].messages.values() if m.unread)

    sim.simulator.mark_read("grant-a", unread.id)

    served = api_get(sim, http, f"grant-a/messages/{unread.id}").json()["data"]
    assert not served["unread"] and "UNREAD" not in served["folders"]
    obj = assert_envelope(recorder.notifications[-1].payload, "message.updated", "/google/emails/realtime")
    assert obj["id"] == unread.id and obj["unread"] is False


def test_a_reply_to_the_owners_message_also_emits_thread_replied(
    sim: SimulatorHandle, recorder: RecordingEmitter
) -> None:
    grant = sim.simulator.grants["grant-a"]
    thread = next(t for t in grant.threads.values() if any(m.sent for m in t.messages))

    reply = sim.simulator.add_message("grant-a", thread_id=thread.id)

    assert recorder.types() == ["message.created", "thread.replied"]
    obj = assert_envelope(recorder.notifications[1].payload, "thread.replied", "/com/nylas/tracking")
    assert obj["object"] == "thread" and obj["thread_id"] == thread.id and obj["message_id"] == reply["id"]
    assert obj["root_message_id"] in {m.id for m in thread.messages if m.sent}
    assert recorder.notifications[1].payload["data"]["grant_id"] == "grant-a"


def test_expiring_a_grant_emits_grant_expired_and_the_api_answers_401(
    sim: SimulatorHandle, http: requests.Session, recorder: RecordingEmitter
) -> None:
    sim.simulator.expire_grant("grant-b")

    obj = assert_envelope(recorder.notifications[0].payload, "grant.expired", "/nylas/system")
    assert obj["code"] == 25009 and obj["grant_id"] == "grant-b" and obj["email"]
    assert api_get(sim, http, "grant-b/threads").status_code == 401
    sim.simulator.restore_grant("grant-b")
    assert api_get(sim, http, "grant-b/threads").status_code == 200


def test_a_message_over_a_megabyte_is_announced_truncated_without_its_body(
    sim: SimulatorHandle, recorder: RecordingEmitter
) -> None:
    sim.simulator.add_message("grant-a", body="<p>" + "x" * 1_100_000 + "</p>")

    note = recorder.notifications[0]
    assert note.type == "message.created.truncated"
    assert "body" not in note.payload["data"]["object"] and note.payload["data"]["object"]["id"]


def test_deleting_a_message_makes_it_404_and_emits_message_deleted(
    sim: SimulatorHandle, http: requests.Session, recorder: RecordingEmitter
) -> None:
    message = next(iter(sim.simulator.grants["grant-a"].messages.values()))

    sim.simulator.delete_message("grant-a", message.id)

    assert api_get(sim, http, f"grant-a/messages/{message.id}").status_code == 404
    assert recorder.types() == ["message.deleted"]


def test_a_thread_of_drafts_only_has_no_messages_and_is_served_with_its_draft(
    sim: SimulatorHandle, http: requests.Session, recorder: RecordingEmitter
) -> None:
    draft = sim.simulator.add_draft("grant-a", subject="Unsent thoughts")
    thread_id = draft["thread_id"]

    thread = api_get(sim, http, f"grant-a/threads/{thread_id}").json()["data"]
    messages = api_get(sim, http, f"grant-a/messages?thread_id={thread_id}").json()["data"]

    assert draft["object"] == "draft" and draft["folders"] == ["DRAFT"]
    assert thread["message_ids"] == [] and messages == []
    assert thread["draft_ids"] == [draft["id"]] and thread["has_drafts"] is True
    assert thread["latest_draft_or_message"]["object"] == "draft" and thread["subject"] == "Unsent thoughts"
    assert thread["earliest_message_date"] is None and thread["latest_message_received_date"] is None
    assert api_get(sim, http, f"grant-a/messages/{draft['id']}").status_code == 404
    assert recorder.types() == []


def test_deleting_the_last_message_keeps_a_thread_that_still_has_a_draft(
    sim: SimulatorHandle, http: requests.Session
) -> None:
    added = sim.simulator.add_message("grant-a", subject="Soon a draft only", emit=False)
    sim.simulator.add_draft("grant-a", thread_id=added["thread_id"])

    sim.simulator.delete_message("grant-a", added["id"], emit=False)

    thread = api_get(sim, http, f"grant-a/threads/{added['thread_id']}").json()["data"]
    assert thread["message_ids"] == [] and len(thread["draft_ids"]) == 1


def test_duplicate_delivery_repeats_the_envelope_id_with_the_next_attempt(
    sim: SimulatorHandle, recorder: RecordingEmitter
) -> None:
    sim.faults.duplicate_webhook_rate = 1.0

    sim.simulator.add_message("grant-a")

    first, second = recorder.notifications
    assert first.id == second.id and first.payload["id"] == second.payload["id"]
    assert second.payload["webhook_delivery_attempt"] == 2


def test_out_of_order_delivery_sends_a_webhook_after_the_next_one(
    sim: SimulatorHandle, recorder: RecordingEmitter
) -> None:
    sim.faults.out_of_order_webhook_rate = 1.0

    first = sim.simulator.add_message("grant-a", subject="first")
    assert recorder.notifications == []  # held back
    second = sim.simulator.add_message("grant-a", subject="second")
    third = sim.simulator.add_message("grant-a", subject="third")
    requests.post(f"{sim.base_url}/_sim/webhooks/flush")

    delivered = [n.payload["data"]["object"]["id"] for n in recorder.notifications]
    assert delivered == [second["id"], first["id"], third["id"]]


def test_the_control_api_mutates_over_http(sim: SimulatorHandle, recorder: RecordingEmitter) -> None:
    base = f"{sim.base_url}/_sim"
    threads = sim.simulator.grants["grant-a"].threads.values()
    thread_id = next(t.id for t in threads if not any(m.sent for m in t.messages))

    created = requests.post(f"{base}/grants/grant-a/messages", json={"thread_id": thread_id, "unread": False})
    updated = requests.post(f"{base}/grants/grant-a/messages/{created.json()['id']}", json={"starred": True})
    refused = requests.post(f"{base}/grants/grant-a/messages", json={"colour": "red"})
    missing = requests.post(f"{base}/grants/nope/messages", json={})
    expired = requests.post(f"{base}/grants/grant-b/expire")
    faults = requests.post(f"{base}/faults", json={"latency_ms": 1})
    grants = requests.get(f"{base}/grants").json()

    assert created.status_code == 201 and created.json()["thread_id"] == thread_id
    assert updated.status_code == 200 and updated.json()["starred"] is True
    assert refused.status_code == 400 and "colour" in refused.json()["error"]
    assert missing.status_code == 404
    assert expired.json() == {"grant_id": "grant-b", "status": "expired"}
    assert faults.json()["latency_ms"] == 1 and sim.faults.latency_ms == 1
    assert requests.post(f"{base}/faults", data=b"{not json").status_code == 400
    assert [g["status"] for g in grants] == ["valid", "expired"]
    assert recorder.types() == ["message.created", "message.updated", "grant.expired"]


# -- emitters ---------------------------------------------------------------------------------------------------------


class _Intake(BaseHTTPRequestHandler):
    received: list[tuple[bytes, str]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((body, self.headers["X-Nylas-Signature"]))  # type: ignore[attr-defined]
        self.send_response(200 if b"message" in body else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def intake() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Intake)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_http_emitter_signs_the_exact_body_with_the_webhook_secret(intake: ThreadingHTTPServer) -> None:
    secret = "a" * 64
    url = f"http://127.0.0.1:{intake.server_address[1]}/webhooks/nylas"
    simulator = Simulator(seed=1, grants=["g"], threads_per_grant=3, anchor=ANCHOR, emitter=None)
    emitter = HttpIntakeEmitter(url, secret=secret)
    simulator.emitter = emitter

    added = simulator.add_message("g", subject="Signé ✓")

    ((body, signature),) = intake.received  # type: ignore[attr-defined]
    assert signature == hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert json.loads(body)["data"]["object"]["id"] == added["id"]
    # An intake that refuses is a delivery error for the emitter (Nylas would retry)...
    note = simulator.emitted[0]
    with pytest.raises(WebhookDeliveryError, match="500"):
        emitter.emit(type(note)(id="x", type="grant.expired", grant_id="g", payload={"no": "msg"}))


def test_the_sql_emitter_records_and_queues_through_the_service_intake(db_url: str) -> None:
    simulator = Simulator(seed=1, grants=["g"], threads_per_grant=3, anchor=ANCHOR, emitter=SqlIntakeEmitter(db_url))
    simulator.faults.duplicate_webhook_rate = 1.0  # delivered twice: the intake must keep one

    added = simulator.add_message("g")

    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select webhook_id, notification_type, grant_id, payload -> 'data' -> 'object' ->> 'id', msg_id"
            " from flux_webhook_notifications"
        ).fetchall()
        queued = conn.execute("select count(*) from pgmq.q_nylas_webhook_notifications").fetchone()
    assert rows == [(simulator.emitted[0].id, "message.created", "g", added["id"], rows[0][4])]
    assert queued == (1,)


def test_a_failed_delivery_does_not_undo_the_mutation() -> None:
    emitter = SqlIntakeEmitter("postgresql://postgres@127.0.0.1:1/none")
    simulator = Simulator(seed=1, grants=["g"], threads_per_grant=3, anchor=ANCHOR, emitter=emitter)

    added = simulator.add_message("g")

    assert added["id"] in simulator.grants["g"].messages
    assert simulator.emitted[0].type == "message.created"

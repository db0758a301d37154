"""A concurrent burst against the real server: every event stored and queued exactly once."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import requests

from nova_email.intake import RunningIntake

from .conftest import envelope, post_signed

CLIENTS = 20
UNIQUE_EVENTS = 1_500
REDELIVERIES = 500


def test_a_burst_of_2000_deliveries_from_20_clients_stores_every_event_exactly_once(
    server: RunningIntake, conn: psycopg.Connection[Any]
) -> None:
    # Given 1,500 events, 500 of which Nylas delivers twice, in an order where both copies may be in flight at once
    ids = [f"ntf_burst_{index:05d}" for index in range(UNIQUE_EVENTS)]
    deliveries = ids + random.Random(8).sample(ids, REDELIVERIES)
    random.Random(9).shuffle(deliveries)
    slices = [deliveries[client::CLIENTS] for client in range(CLIENTS)]

    # When 20 clients, each on its own keep-alive connection, deliver them all at once
    def deliver(webhook_ids: list[str]) -> list[tuple[int, str]]:
        with requests.Session() as session:
            answers = [post_signed(session, server, envelope(webhook_id)) for webhook_id in webhook_ids]
        return [(answer.status_code, answer.json()["status"]) for answer in answers]

    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = [outcome for answers in pool.map(deliver, slices) for outcome in answers]

    # Then every delivery got 200, exactly one per event was new, and the rest were recognised as redeliveries
    assert len(outcomes) == UNIQUE_EVENTS + REDELIVERIES
    assert {status for status, _ in outcomes} == {200}
    assert sum(kind == "accepted" for _, kind in outcomes) == UNIQUE_EVENTS
    assert sum(kind == "duplicate" for _, kind in outcomes) == REDELIVERIES
    # And each event has one pending audit row and one queue message, which point at each other
    rows = conn.execute(
        "select webhook_id, id::text, msg_id, status from flux_webhook_notifications order by webhook_id"
    ).fetchall()
    assert [row[0] for row in rows] == sorted(ids)
    assert {row[3] for row in rows} == {"pending"}
    messages = conn.execute(
        "select message->>'webhook_id', message->>'notification_id', msg_id from pgmq.q_nylas_webhook_notifications"
        " order by 1"
    ).fetchall()
    assert [(webhook_id, notification_id, msg_id) for webhook_id, notification_id, msg_id, _ in rows] == messages

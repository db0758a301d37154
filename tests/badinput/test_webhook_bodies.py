"""Any webhook body, as the intake hands it over after its signature check, ends in a terminal audit row with a
reason, once per envelope id, and the webhook queue keeps moving.

Bodies: bytes that are not UTF-8, text that is not JSON, JSON that is not an object, envelopes with missing or
wrong-typed fields, unknown types, unknown grants, objects deleted at Nylas, SQL-looking and control-character
strings, deep nesting, and each of them delivered twice.
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nova_email.intake.receiver import Receipt, receive
from tests.badinput.conftest import GRANT, Target
from tests.badinput.strategies import WEBHOOK_TYPES, hostile_text, json_value
from tests.chaos.scenario import queue_depths
from tests.processes import wait_for

TERMINAL = {"processed", "ignored", "error", "rejected"}
#: Bodies sent across the module's examples.
SENT = [0]


def wait_for_status(conn: psycopg.Connection[Any], receipt: Receipt, status: str, *, what: str) -> None:
    """Wait until the audit row of `receipt` has `status`."""
    wait_for(
        lambda: (
            conn.execute(
                "select status from flux_webhook_notifications where id = %s", [receipt.notification_id]
            ).fetchone()
            == (status,)
        ),
        timeout_s=20,
        what=what,
    )


def envelopes(target: Target) -> st.SearchStrategy[dict[str, Any]]:
    """CloudEvents envelopes whose parts range from right to hostile."""
    object_id = st.one_of(
        st.sampled_from(target.message_ids), st.just("msg-deleted-at-nylas"), hostile_text, json_value
    )
    grant = st.one_of(st.just(GRANT), st.just("grant-unknown"), hostile_text, json_value)
    data_object = st.fixed_dictionaries(
        {},
        optional={
            "id": object_id,
            "grant_id": grant,
            "thread_id": st.one_of(st.sampled_from(target.thread_ids), hostile_text, json_value),
            "object": st.sampled_from(["message", "thread"]) | hostile_text,
        },
    )
    return st.fixed_dictionaries(
        {
            "id": st.uuids().map(str) | hostile_text.filter(bool),
            "type": st.sampled_from(WEBHOOK_TYPES) | hostile_text,
        },
        optional={
            "data": st.one_of(
                st.fixed_dictionaries({}, optional={"object": data_object, "grant_id": grant}), json_value
            ),
            "time": st.integers() | hostile_text,
            "specversion": json_value,
        },
    )


def bodies(target: Target) -> st.SearchStrategy[bytes]:
    return st.one_of(
        envelopes(target).map(lambda e: json.dumps(e).encode()),
        json_value.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        hostile_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from(
            [b"\xff\xfe{", b'{"id": "\\ud800", "type": "message.created"}', b'{"id": "x\\u0000", "type": "a"}']
        ),
        st.integers(min_value=1, max_value=3000).map(
            lambda d: b'{"id": "deep", "type": "x", "data": ' + b"[" * d + b"]" * d + b"}"
        ),
    )


@pytest.mark.slow
@pytest.mark.processes
def test_any_webhook_body_ends_in_a_terminal_audit_row_with_a_reason(
    conn: psycopg.Connection[Any], target: Target, inbox: uuid.UUID
) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(bodies(target), min_size=1, max_size=10))
    def check(batch: list[bytes]) -> None:
        for body in batch:
            receive(conn, body)
            receive(conn, body)  # every delivery comes twice: Nylas retries
        SENT[0] += 2 * len(batch)

        def settled() -> bool:
            row = conn.execute(
                "select count(*) from flux_webhook_notifications where status in ('pending', 'processing')"
            ).fetchone()
            return row == (0,) and queue_depths(conn)["nylas_webhook_notifications"] == 0

        try:
            wait_for(settled, timeout_s=40, interval_s=0.1, what="every webhook to reach a terminal state")
        except AssertionError as exc:
            stuck = conn.execute(
                "select status, attempts, notification_type, grant_id, left(payload::text, 300), error_message"
                " from flux_webhook_notifications where status in ('pending', 'processing')"
            ).fetchall()
            dead = conn.execute(
                "select reason, error_type, left(error_message, 300) from pgmq_broker.dead_letters"
            ).fetchall()
            msg = f"{exc}: stuck {stuck}, queue {queue_depths(conn)}, dead letters {dead}"
            raise AssertionError(msg) from exc
        rows = conn.execute("select status, error_message, webhook_id from flux_webhook_notifications").fetchall()
        for status, error, _ in rows:
            assert status in TERMINAL
            assert status == "processed" or error, (status, error)
        ids = [webhook_id for _, _, webhook_id in rows if webhook_id is not None]
        assert len(ids) == len(set(ids)), "a redelivered envelope was stored twice"
        assert target.workers.process.poll() is None, target.workers.log()[-3000:]

    check()
    # And a good event after all of that is still applied
    message_id = target.message_ids[0]
    good = {
        "id": f"good-{uuid.uuid4()}",
        "type": "message.updated",
        "data": {"object": {"id": message_id, "grant_id": GRANT}},
    }
    receipt = receive(conn, json.dumps(good).encode())
    assert isinstance(receipt, Receipt)
    wait_for_status(conn, receipt, "processed", what="the good webhook after the bad ones")
    print(f"\n[badinput] webhook bodies delivered: {SENT[0]}")


@pytest.mark.processes
def test_a_webhook_whose_grant_id_is_6_kb_is_queued_and_ends_with_the_reason_of_an_unknown_grant(
    conn: psycopg.Connection[Any], target: Target, inbox: uuid.UUID
) -> None:
    # 6 kB that do not compress, more than a btree index row may hold: the webhook queue keys it by its digest, and
    # the body is queued as any other whose grant is unknown.
    body = {
        "id": f"big-{uuid.uuid4()}",
        "type": "message.created",
        "data": {"object": {"grant_id": secrets.token_hex(3000)}},
    }

    receipt = receive(conn, json.dumps(body).encode())

    assert isinstance(receipt, Receipt)
    wait_for_status(conn, receipt, "ignored", what="the webhook of a 6 kB grant id to end")
    [error] = conn.execute(
        "select error_message from flux_webhook_notifications where id = %s", [receipt.notification_id]
    ).fetchone()
    assert "no inbox has grant" in error

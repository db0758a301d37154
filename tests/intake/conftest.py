"""Fixtures for the webhook intake: a real gunicorn server on loopback, signed bodies, and readers of what
was stored (audit rows and queue messages)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from psycopg.rows import dict_row

from nova_email.config import Settings
from nova_email.intake import RunningIntake, serve_in_background, sign

#: The webhook secret the test servers are started with.
SECRET = "e2b9d1f7" * 8

#: A small body limit, so the 413 tests move kilobytes, not megabytes.
MAX_BODY_BYTES = 64 * 1024


def envelope(webhook_id: str, notification_type: str = "message.created", grant_id: str = "grant-123") -> bytes:
    """A Nylas CloudEvents envelope like the ones in docs/nylas-v3.md, as the bytes Nylas would send."""
    document = {
        "specversion": "1.0",
        "type": notification_type,
        "source": "/google/emails/realtime",
        "id": webhook_id,
        "time": 1735776005,
        "webhook_delivery_attempt": 1,
        "data": {
            "application_id": "app-9",
            "object": {"object": "message", "id": f"msg-{webhook_id}", "grant_id": grant_id, "thread_id": "thr-1"},
        },
    }
    return json.dumps(document).encode()


def post_signed(
    session: requests.Session, server: RunningIntake, body: bytes, *, secret: str = SECRET, **headers: str
) -> requests.Response:
    """POST `body` the way Nylas does: raw bytes with their X-Nylas-Signature."""
    all_headers = {"Content-Type": "application/json", "X-Nylas-Signature": sign(secret, body), **headers}
    return session.post(server.webhook_url, data=body, headers=all_headers, timeout=10)


def audit_rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every row of flux_webhook_notifications, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("select * from flux_webhook_notifications order by received_at, id").fetchall()


def queued_jobs(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every message on the nylas_webhook_notifications queue, in send order."""
    rows = conn.execute("select message from pgmq.q_nylas_webhook_notifications order by msg_id").fetchall()
    return [row[0] for row in rows]


def _settings(db_url: str, data_dir: Path, secret: str) -> Settings:
    return Settings(database_url=db_url, nylas_webhook_secret=secret, data_dir=data_dir, log_level="warning")


@pytest.fixture(scope="session")
def intake_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningIntake]:
    """The intake as production runs it (gunicorn, 2 workers x 8 threads), shared by the session's tests."""
    settings = _settings(db_url, tmp_path_factory.mktemp("intake"), SECRET)
    with serve_in_background(settings, workers=2, threads=8, max_body_bytes=MAX_BODY_BYTES, metrics_port=0) as server:
        yield server


@pytest.fixture
def server(intake_server: RunningIntake, conn: psycopg.Connection[Any]) -> RunningIntake:
    """The shared server, for a test whose stored rows are emptied afterwards (it depends on `conn`)."""
    return intake_server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """A keep-alive HTTP session, as Nylas's delivery client would use."""
    with requests.Session() as session:
        yield session

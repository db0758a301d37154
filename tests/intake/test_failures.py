"""The server when something around it is missing: no signing secret, no database, an unmigrated database.
Each case starts its own server (about a second each)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests

from nova_email.config import Settings
from nova_email.db import with_database
from nova_email.intake import serve_in_background
from tests.conftest import server_url

from .conftest import SECRET, envelope, post_signed


def test_without_a_secret_the_challenge_is_answered_and_deliveries_get_503(db_url: str, tmp_path: Path) -> None:
    # Nylas issues the secret only after the challenge succeeds, so the server must start without one.
    settings = Settings(database_url=db_url, nylas_webhook_secret="", data_dir=tmp_path, log_level="error")
    with serve_in_background(settings) as server, requests.Session() as http:
        challenge = http.get(server.webhook_url, params={"challenge": "first-contact"}, timeout=5)
        delivery = post_signed(http, server, envelope("ntf_early"))
        ready = http.get(f"{server.url}/readyz", timeout=5)

    assert (challenge.status_code, challenge.text) == (200, "first-contact")
    assert delivery.status_code == 503
    assert "NYLAS_WEBHOOK_SECRET" in delivery.json()["detail"]
    assert (ready.status_code, ready.json()["signing_secret"]) == (200, False)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("select count(*) from flux_webhook_notifications").fetchone() == (0,)


def test_without_a_database_deliveries_get_503_with_retry_after_and_the_server_stays_up(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Port 1 on loopback refuses connections at once: an outage, not a slow network.
    password = "pw-" + uuid.uuid4().hex
    settings = Settings(
        database_url=f"postgresql://nova_intake:{password}@127.0.0.1:1/nowhere",
        nylas_webhook_secret=SECRET,
        data_dir=tmp_path,
        log_level="error",
    )
    with serve_in_background(settings, pool_timeout_s=0.3) as server, requests.Session() as http:
        ready = http.get(f"{server.url}/readyz", timeout=10)
        deliveries = [post_signed(http, server, envelope(f"ntf_outage_{index}")) for index in range(3)]
        health = http.get(f"{server.url}/healthz", timeout=5)
    log = capfd.readouterr().err  # the server's stderr: it inherits the test's file descriptors

    assert [answer.status_code for answer in deliveries] == [503, 503, 503]
    assert deliveries[0].headers["Retry-After"] == "5"
    assert health.status_code == 200
    # Any caller may ask /readyz: it says where to look, not where the database is or who logs in
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "not_ready",
        "database": False,
        "detail": "database unavailable; see the intake's log",
    }
    for leak in ("127.0.0.1", "nova_intake", password, "nowhere"):
        assert leak not in ready.text
    # The log has the outage once, for /readyz and the deliveries together, and no password
    assert log.count("Database unavailable") == 1, log
    assert password not in log


@pytest.fixture
def unmigrated_db_url() -> Iterator[str]:
    """An empty database on the test server, dropped afterwards."""
    name = f"h7_unmigrated_{id(object())}"
    with psycopg.connect(server_url(), autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    yield with_database(server_url(), name)
    with psycopg.connect(server_url(), autocommit=True) as admin:
        admin.execute(f'drop database if exists "{name}" with (force)')


def test_on_an_unmigrated_database_the_server_says_to_run_migrate(unmigrated_db_url: str, tmp_path: Path) -> None:
    settings = Settings(
        database_url=unmigrated_db_url, nylas_webhook_secret=SECRET, data_dir=tmp_path, log_level="critical"
    )
    with serve_in_background(settings) as server, requests.Session() as http:
        delivery = post_signed(http, server, envelope("ntf_too_soon"))
        ready = http.get(f"{server.url}/readyz", timeout=5)

    assert delivery.status_code == 503
    assert "nova-email migrate" in delivery.json()["detail"]
    assert ready.status_code == 503
    assert ready.json()["functions"] is False
    assert "nova-email migrate" in ready.json()["detail"]

"""Secrets (the database password, the Nylas API key, the webhook secret) never show in logs, errors or reprs.

The worker tests break things for real so that the error paths run: a database URL whose role does not exist or
whose server is down, a Nylas API key the simulator refuses, a grant that expires mid-backfill. Their logs (at
debug level, the most talkative) and every error the database recorded are then searched for the secrets.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from loguru import logger

from nova_email import db
from nova_email.config import Settings, load_settings, redact_url
from nova_email.errors import ConfigError
from nova_email.nylas.client import NylasClient
from nova_email.nylas.errors import NylasError
from nova_email.simulator.server import start_in_thread
from tests.chaos.scenario import backfill_status, queue_backfill, worker_env
from tests.processes import Workers, running_workers, wait_for

ROOT = Path(__file__).resolve().parents[2]
NOVA_EMAIL = str(Path(sys.executable).parent / "nova-email")
DB_PASSWORD = "pw-" + uuid.uuid4().hex
API_KEY = "nyk_v0_" + uuid.uuid4().hex
WEBHOOK_SECRET = "whsec-" + uuid.uuid4().hex


def recorded_errors(db_url: str) -> str:
    """Every error text the service and the broker stored, as one string."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select coalesce(string_agg(t, E'\\n'), '') from ("
            " select backfill_progress::text as t from flux_inbox_configurations"
            " union all select error_message from queued_threads"
            " union all select error_message from flux_webhook_notifications"
            " union all select concat_ws(' ', error_type, error_message, traceback, message::text)"
            " from pgmq_broker.dead_letters) errors"
        ).fetchone()
    return str(rows[0]) if rows else ""


# -- reprs and configuration errors ----------------------------------------------------------------------------------


def test_settings_repr_hides_every_secret() -> None:
    settings = Settings(
        database_url=f"postgresql://nova:{DB_PASSWORD}@db:5432/nova",
        nylas_api_key=API_KEY,
        nylas_webhook_secret=WEBHOOK_SECRET,
    )
    for text in (repr(settings), str(settings), str(settings.database_url_redacted)):
        assert DB_PASSWORD not in text and API_KEY not in text and WEBHOOK_SECRET not in text


@pytest.mark.parametrize(
    "url",
    [f"mysql://nova:{DB_PASSWORD}@db/nova", f"nova:{DB_PASSWORD}@db/nova", f"http://nova:{DB_PASSWORD}@db:5432/nova"],
    ids=["wrong-scheme", "no-scheme", "http"],
)
def test_a_malformed_database_url_is_reported_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATABASE_URL": url, "NYLAS_API_KEY": API_KEY}, env_file=None)
    assert "DATABASE_URL" in str(caught.value)
    assert DB_PASSWORD not in str(caught.value) and API_KEY not in str(caught.value)


@pytest.mark.parametrize(
    "conninfo",
    [
        f"host=db password={DB_PASSWORD} user=svc",
        f"host=db user=svc password = '{DB_PASSWORD} with spaces'",
        f"host=db password='{DB_PASSWORD}",
        f"postgres:{DB_PASSWORD}@db password={DB_PASSWORD}",
    ],
    ids=["plain", "quoted", "unterminated-quote", "userinfo-too"],
)
def test_a_key_value_database_url_is_refused_without_echoing_it(conninfo: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATABASE_URL": conninfo}, env_file=None)
    message = str(caught.value)
    assert "DATABASE_URL" in message and "key=value" in message and "postgresql://" in message
    assert DB_PASSWORD not in message and DB_PASSWORD not in repr(caught.value)
    # redact_url, shared by every log line that shows a URL, hides it too
    assert DB_PASSWORD not in redact_url(conninfo)


@pytest.mark.parametrize(
    "query",
    [
        f"?password={DB_PASSWORD}",
        f"?sslmode=require&password={DB_PASSWORD}&connect_timeout=5",
        f"?pass%77ord={DB_PASSWORD}",
    ],
    ids=["only", "among-others", "percent-encoded-name"],
)
def test_a_password_in_the_query_string_stays_out_of_the_log_and_the_redacted_url(query: str) -> None:
    # Given a DATABASE_URL carrying its password as a query parameter (libpq accepts that)
    url = f"postgresql://nova@db.invalid:5432/nova-{uuid.uuid4().hex}{query}"
    settings = load_settings({"DATABASE_URL": url}, env_file=None)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), format="{message}", level="DEBUG")
    try:
        # When the service announces which database it uses
        assert db.database_url(settings) == url
    finally:
        logger.remove(sink)
    # Then neither that line nor the redacted URL shows the password, but both still say where the database is
    assert any("db.invalid" in line for line in lines), lines
    for text in [*lines, str(settings.database_url_redacted), repr(settings)]:
        assert DB_PASSWORD not in text
    assert "password=***" in str(settings.database_url_redacted).replace("pass%77ord", "password")


@pytest.mark.parametrize(
    "password",
    [DB_PASSWORD + "?x=1", DB_PASSWORD + "#frag", "a:" + DB_PASSWORD],
    ids=["question-mark", "hash", "colon"],
)
def test_a_password_with_url_delimiters_is_redacted_whole(password: str) -> None:
    # libpq ends the userinfo at the first @, so ? # : may sit in a password that urlsplit would cut short.
    redacted = redact_url(f"postgresql://nova:{password}@db:5432/nova")
    assert redacted == "postgresql://nova:***@db:5432/nova"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (
            "postgresql://nova:pw@db.example:5432/nova?application_name=a@b",
            "postgresql://nova:***@db.example:5432/nova?application_name=a@b",
        ),
        ("postgresql://nova:p%40ss@db.example/nova?options=x@y", "postgresql://nova:***@db.example/nova?options=x@y"),
        ("postgresql://nova:p@ss@db.example/nova?options=x@y", "postgresql://nova:***@db.example/nova?options=x@y"),
    ],
    ids=["at-in-query", "encoded-at-in-password", "raw-at-in-password"],
)
def test_an_at_sign_in_the_query_string_leaves_the_host_visible(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_the_nylas_client_repr_hides_the_api_key() -> None:
    client = NylasClient(api_key=API_KEY, api_uri="http://127.0.0.1:1")
    try:
        assert API_KEY not in repr(client)
    finally:
        client.close()


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """A hostile or broken upstream that echoes the Authorization header in its error body."""

    def do_GET(self) -> None:
        echoed = self.headers.get("Authorization")
        body = json.dumps(
            {"request_id": "r1", "error": {"type": "api_error", "message": f"bad header {echoed}"}, "echo": echoed}
        )
        self.send_response(int(self.path.rsplit("/", 1)[-1]) if self.path[-3:].isdigit() else 500)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def echo_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", ["400", "401", "404", "422", "429", "418"])
def test_an_error_body_that_echoes_the_api_key_does_not_carry_it_into_the_error(echo_server: str, status: str) -> None:
    client = NylasClient(api_key=API_KEY, api_uri=echo_server, max_retries=0)
    try:
        with pytest.raises(NylasError) as caught:
            client.get_thread("grant-1", status)
    finally:
        client.close()
    assert API_KEY not in str(caught.value)
    assert API_KEY not in repr(caught.value)


# -- worker processes failing for real -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://nova_no_such_role:{DB_PASSWORD}@127.0.0.1:5432/postgres",
        f"postgresql://nova:{DB_PASSWORD}@127.0.0.1:1/nova",
    ],
    ids=["unknown-role", "server-down"],
)
def test_workers_that_cannot_reach_the_database_never_log_its_password(tmp_path: Path, url: str) -> None:
    # Given workers whose DATABASE_URL cannot be used, at debug level
    env = {"DATABASE_URL": url, "NYLAS_API_KEY": API_KEY, "NYLAS_WEBHOOK_SECRET": WEBHOOK_SECRET, "LOG_LEVEL": "debug"}
    workers = Workers(env, tmp_path / "workers.log", ["--processes", "1", "--threads", "2"])
    try:
        # When they try to connect and report it (or give up)
        wait_for(
            lambda: workers.process.poll() is not None or "database" in workers.log().lower(),
            timeout_s=30,
            what="the workers to report the unreachable database",
        )
        wait_for(lambda: len(workers.log()) > 0, timeout_s=5, what="log output")
    finally:
        workers.stop()
    log = workers.log()
    # Then the log names the problem but none of the secrets
    assert "127.0.0.1" in log, log[-2000:]
    for secret in (DB_PASSWORD, API_KEY, WEBHOOK_SECRET):
        assert secret not in log


@pytest.mark.slow
@pytest.mark.processes
def test_a_refused_api_key_and_an_expired_grant_are_logged_and_recorded_without_secrets(
    db_url: str, tmp_path: Path
) -> None:
    # Given a simulator that wants another key than the workers have, for one grant, and a second grant whose
    # key is right but which expires mid-backfill
    nylas = start_in_thread(seed=4, grants=["grant-refused", "grant-expiring"], threads_per_grant=120, api_key=API_KEY)
    try:
        refused = queue_backfill(db_url, nylas, "grant-refused")
        env = worker_env(db_url, nylas, NYLAS_API_KEY="wrong-" + API_KEY[6:], LOG_LEVEL="debug")
        with running_workers(env, tmp_path / "refused.log", processes=1, threads=4) as workers:
            # When the backfill is refused (the simulator answers 400 token.unauthorized_access)
            wait_for(
                lambda: backfill_status(db_url, refused.config_id) == "failed",
                timeout_s=60,
                what="the backfill with a refused key to fail",
            )
            refused_log = workers.log()
        expiring = queue_backfill(db_url, nylas, "grant-expiring")
        env = worker_env(db_url, nylas, NYLAS_API_KEY=API_KEY, LOG_LEVEL="debug", NYLAS_WEBHOOK_SECRET=WEBHOOK_SECRET)
        with running_workers(env, tmp_path / "expiring.log", processes=1, threads=4) as workers:
            wait_for(
                lambda: _threads_synced(db_url, expiring.config_id) >= 10,
                timeout_s=60,
                what="the second backfill to start syncing threads",
            )
            nylas.simulator.expire_grant("grant-expiring", emit=False)
            wait_for(
                lambda: (
                    _inbox_status(db_url, expiring.inbox_id) == "auth_expired"
                    or backfill_status(db_url, expiring.config_id) in ("failed", "completed")
                ),
                timeout_s=60,
                what="the expired grant to stop its inbox",
            )
            expiring_log = workers.log()
        errors = recorded_errors(db_url)
    finally:
        nylas.stop()
    # Then the failures are visible (logged and recorded) but no secret is in any of it
    assert "check NYLAS_API_KEY" in refused_log + errors
    for secret in (API_KEY, WEBHOOK_SECRET):
        assert secret not in refused_log
        assert secret not in expiring_log
        assert secret not in errors


def _threads_synced(db_url: str, config_id: uuid.UUID) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select count(*) from queued_threads where config_id = %s and status = 'completed'", [config_id]
        ).fetchone()
    return int(row[0]) if row else 0


def _inbox_status(db_url: str, inbox_id: uuid.UUID) -> str:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select status from flux_inboxes where id = %s", [inbox_id]).fetchone()
    return str(row[0]) if row else ""


def _with_password(url: str, password: str) -> str:
    """`url` with `password`, unless it has one of its own (a server that checks passwords needs that one)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{parts.password or password}@{host}"))


@pytest.mark.processes
def test_the_db_url_command_hides_the_password_unless_asked() -> None:
    # Given a DATABASE_URL with a password in its userinfo and in its query string (db-url does not connect)
    url = f"postgresql://nova:{DB_PASSWORD}@db.invalid:5432/nova?sslmode=require&password={DB_PASSWORD}"
    env = {**os.environ, "DATABASE_URL": url, "NYLAS_API_KEY": API_KEY}

    def db_url(*flags: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [NOVA_EMAIL, "db-url", *flags], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    # When it is printed plainly, and for a script that needs the password
    plain, revealed = db_url(), db_url("--show-password")
    # Then only the flag shows the password, and the log lines never do
    assert plain.stdout.strip() == "postgresql://nova:***@db.invalid:5432/nova?sslmode=require&password=***"
    assert DB_PASSWORD not in plain.stderr
    assert revealed.stdout.strip() == url
    assert DB_PASSWORD not in revealed.stderr


@pytest.mark.processes
def test_the_status_command_never_shows_a_secret(db_url: str, conn: psycopg.Connection[Any]) -> None:
    # Given a failed backfill and a dead letter to report, and settings full of secrets (trust auth ignores the
    # password, so the command really connects)
    inbox = conn.execute("insert into flux_inboxes (nylas_grant_id) values ('grant-status') returning id").fetchone()
    assert inbox is not None
    config = conn.execute("select config_id from queue_inbox_backfill(%s)", [inbox[0]]).fetchone()
    assert config is not None
    conn.execute("select record_backfill_failure(%s, 'Nylas refused the API key; check NYLAS_API_KEY')", [config[0]])
    env = {
        **os.environ,
        "DATABASE_URL": _with_password(db_url, DB_PASSWORD),
        "NYLAS_API_KEY": API_KEY,
        "NYLAS_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    outputs = []
    for args in (["status"], ["status", "--json"], ["status", "--failures", "50"]):
        done = subprocess.run([NOVA_EMAIL, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout + done.stderr)
    # And the same command against a database it cannot reach
    env["DATABASE_URL"] = f"postgresql://nova:{DB_PASSWORD}@127.0.0.1:1/nova"
    done = subprocess.run([NOVA_EMAIL, "status"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0
    outputs.append(done.stdout + done.stderr)
    # Then the reports (failures included) show none of the secrets
    assert "check NYLAS_API_KEY" in outputs[0] + outputs[1]
    own_password = urlsplit(db_url).password
    for output in outputs:
        for secret in (DB_PASSWORD, API_KEY, WEBHOOK_SECRET, *([own_password] if own_password else [])):
            assert secret not in output

"""Secrets in every error path: DATABASE_URL is read by libpq's parser at start-up, every command turns a database
error into one line, and every log line has the configured secrets masked. The end-to-end test runs every
command with secrets set, against a working and an unreachable database, and searches all of its output."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest
from loguru import logger

import nova_email.config
from nova_email.config import Settings, load_settings, redact_url
from nova_email.embedded import embedded_password_file
from nova_email.errors import ConfigError
from nova_email.log import setup_logging
from nova_email.masking import MASK, secret_values

NOVA_EMAIL = str(Path(sys.executable).parent / "nova-email")
#: Holds the characters that trip URL handling: @ and % (percent-encoded in the URL).
DB_PASSWORD = f"S3cr@t%P-{uuid.uuid4().hex}"
SSL_PASSWORD = f"ssl-{uuid.uuid4().hex}"
API_KEY = f"nyk_v0_{uuid.uuid4().hex}"
WEBHOOK_SECRET = f"whsec-{uuid.uuid4().hex}"
SECRETS = (DB_PASSWORD, quote(DB_PASSWORD, safe=""), SSL_PASSWORD, API_KEY, WEBHOOK_SECRET)


def _with_secrets(url: str) -> str:
    """`url` with DB_PASSWORD (unless it has a password of its own, which a server that checks it needs) and
    SSL_PASSWORD (libpq sends it only with a client certificate)."""
    parts = urlsplit(url)
    password = parts.password or quote(DB_PASSWORD, safe="")
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.netloc.rsplit('@', 1)[-1]}"
    query = "&".join(part for part in (parts.query, f"sslpassword={SSL_PASSWORD}") if part)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _leaks(text: str, url: str = "") -> list[str]:
    password = unquote(urlsplit(url).password or "")
    secrets = (*SECRETS, password, quote(password, safe="")) if password else SECRETS
    return [secret for secret in secrets if secret in text]


# -- configuration and redaction -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "password_parts"),
    [
        ("postgresql://postgres:S3cr%t!Pass@host/db", ("S3cr", "Pass")),
        # libpq reads host "postgres", port "pa", no password, and a database named after the rest
        ("postgresql://postgres:pa/sslongsecret@127.0.0.1:5432/postgres", ("pa/", "sslongsecret")),
        ("postgresql://postgres:5432/sslongsecret@127.0.0.1:5432/postgres", ("5432/", "sslongsecret")),
        # libpq reads password "Secret" and host "Part2@127.0.0.1"
        ("postgresql://postgres:Secret@Part2@127.0.0.1:5432/postgres", ("Secret", "Part2")),
    ],
    ids=["bad-percent-encoding", "slash-in-password", "slash-after-digits", "at-sign-in-password"],
)
def test_a_url_libpq_cannot_read_is_a_configuration_error_that_names_the_variable_not_the_value(
    url: str, password_parts: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATABASE_URL": url}, env_file=None)
    message = str(caught.value)
    assert "DATABASE_URL" in message and "percent-encode" in message and "\n" not in message
    assert [part for part in password_parts if part in message] == [] and caught.value.__cause__ is None


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:S3cr%40t%2FPass@127.0.0.1:5432/postgres",
        "postgresql://postgres@/postgres?host=/var/run/postgresql",
        "postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/postgres",
        "postgresql://postgres@db1:5432,db2:5433/postgres",
        "postgresql://postgres@[::1]:5432/postgres",
    ],
    ids=["encoded-password", "socket-in-query", "encoded-socket", "two-hosts", "ipv6"],
)
def test_a_url_libpq_reads_as_written_is_accepted(url: str) -> None:
    assert load_settings({"DATABASE_URL": url}, env_file=None).database_url == url


@pytest.mark.parametrize("url", ["mysql://nova@db/nova", "host=db password=x"], ids=["scheme", "key-value"])
def test_a_malformed_url_suggests_the_embedded_server_only_where_there_is_one(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as in_checkout:
        load_settings({"DATABASE_URL": url}, env_file=None)
    monkeypatch.setattr(nova_email.config, "embedded_server_is_default", lambda: False)
    with pytest.raises(ConfigError) as installed:
        load_settings({"DATABASE_URL": url}, env_file=None)
    assert "embedded" in str(in_checkout.value)
    assert "embedded" not in str(installed.value) and "DATABASE_URL" in str(installed.value)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (f"postgresql://nova@db/nova?sslpassword={SSL_PASSWORD}", "postgresql://nova@db/nova?sslpassword=***"),
        (f"postgresql://nova:{DB_PASSWORD}@db/nova", "postgresql://nova:***@db/nova"),
        (f"host=db sslpassword={SSL_PASSWORD} password={DB_PASSWORD}", "host=db sslpassword=*** password=***"),
    ],
    ids=["sslpassword", "at-sign-in-password", "key-value"],
)
def test_redaction_covers_every_password_parameter_and_passwords_with_an_at_sign(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_every_log_line_has_the_configured_secrets_masked(capfd: pytest.CaptureFixture[str]) -> None:
    # Given logging set up with secrets configured, at the most talkative level
    settings = Settings(
        database_url=_with_secrets("postgresql://postgres@127.0.0.1:1/nova"),
        nylas_api_key=API_KEY,
        nylas_webhook_secret=WEBHOOK_SECRET,
        log_level="debug",
    )
    setup_logging(settings)
    capfd.readouterr()
    # When our code, a library's stdlib logger (a pool retry) and a traceback carry them
    logger.debug("url {} key {}", settings.database_url, API_KEY)
    logging.getLogger("psycopg.pool").error("error connecting: password %s secret %s", DB_PASSWORD, WEBHOOK_SECRET)
    try:
        raise RuntimeError(SSL_PASSWORD)
    except RuntimeError:
        logger.exception("failed")
    err = capfd.readouterr().err
    # Then none of them is written, and the lines are still there
    assert err.count(MASK) >= 5, err
    assert _leaks(err) == []


def test_the_masked_values_include_each_database_password_as_configured_and_as_encoded() -> None:
    settings = Settings(database_url=_with_secrets("postgresql://postgres@db/nova"), nylas_api_key=API_KEY)
    values = secret_values(settings)
    assert {DB_PASSWORD, quote(DB_PASSWORD, safe=""), SSL_PASSWORD, API_KEY} <= set(values)


# -- every command, end to end ---------------------------------------------------------------------------------------

#: Each command with its arguments, whether it runs until stopped (it is then stopped after a while), and variables
#: of its own.
COMMANDS: list[tuple[list[str], bool, dict[str, str]]] = [
    (["migrate"], False, {}),
    (["migrate", "--check"], False, {}),
    (["migrate", "--dry-run"], False, {}),
    (["healthcheck"], False, {}),
    (["db-url"], False, {}),
    (["db-stop"], False, {}),
    (["status"], False, {}),
    (["status", "--json"], False, {}),
    (["backfill", "start", "grant-masking"], False, {}),
    (["dead-letters", "list"], False, {}),
    (["dead-letters", "show", "1"], False, {}),
    (["dead-letters", "replay", "--all"], False, {}),
    (["backfill", "progress", "--timeout", "2", "00000000-0000-0000-0000-000000000000"], False, {}),
    (["backfill", "retry", "00000000-0000-0000-0000-000000000000"], False, {}),
    (["fake-nylas", "--help"], False, {}),
    (["serve-webhooks", "--port", "0"], True, {}),
    # Fails to start, as any command does: a secret put in the wrong variable (PORT) is not a port
    (["serve-webhooks"], False, {"PORT": WEBHOOK_SECRET}),
    (["migrate"], False, {"PORT": WEBHOOK_SECRET}),
    (["run", "webhooks", "--processes", "1", "--threads", "1"], True, {}),
]
RUNS_FOR_S = 12.0
#: The start of the one line a command fails with, where it is not "nova-email: ".
FAILURE_PREFIXES = {"serve-webhooks": "nova-email serve-webhooks: ", "healthcheck": "unhealthy: "}
#: A log record in the text format (LOG_LEVEL=debug adds these around the command's own output).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \| [A-Z]+ +\| ")


def _run(args: list[str], long_running: bool, env: dict[str, str], cwd: Path) -> tuple[int | None, str]:
    process = subprocess.Popen(
        [NOVA_EMAIL, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=RUNS_FOR_S if long_running else 120)
    except subprocess.TimeoutExpired:
        if not long_running:
            raise
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
        return None, output
    return process.returncode, output


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize("database", ["working", "unreachable"])
def test_no_command_shows_a_secret_with_a_working_or_an_unreachable_database(
    db_url: str, tmp_path: Path, database: str
) -> None:
    # Given every secret set (a server that trusts local connections gets DB_PASSWORD, which it does not need; one
    # that checks passwords, such as the embedded server, keeps its own, which is then searched for)
    url = _with_secrets(db_url if database == "working" else "postgresql://postgres@127.0.0.1:1/nova")
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "NYLAS_API_KEY": API_KEY,
        "NYLAS_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "LOG_LEVEL": "debug",
        "NOVA_DATA_DIR": str(tmp_path / "data"),
    }
    failures: dict[str, str] = {}
    for args, long_running, own_env in COMMANDS:
        # When each command runs (or runs for a while and is stopped)
        status, output = _run(args, long_running, {**env, **own_env}, tmp_path)
        name = " ".join([*(f"{k}=..." for k in own_env), *args])
        assert _leaks(output, url) == [], f"{name} showed a secret:\n{output[-3000:]}"
        # Then against an unreachable database each short command fails with one line and a non-zero status
        if database == "unreachable" and not long_running and args[0] not in {"db-url", "db-stop", "fake-nylas"}:
            lines = [line for line in output.splitlines() if line.strip() and not LOG_LINE.match(line)]
            if (
                status == 0
                or len(lines) != 1
                or not lines[0].startswith(FAILURE_PREFIXES.get(args[0], "nova-email: "))
                or "Traceback" in output
            ):
                failures[name] = f"status {status}:\n{output[-2000:]}"
    assert failures == {}


def test_without_database_url_the_embedded_servers_password_is_masked(tmp_path: Path) -> None:
    embedded_password_file(tmp_path).write_text(DB_PASSWORD + "\n")

    assert DB_PASSWORD in secret_values(Settings(data_dir=tmp_path))

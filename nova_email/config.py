"""Settings, read once from the environment (and an optional ``.env`` file).

An existing deployment's environment works unchanged: each variable it sets is read under the same name, and an
unset one means the same as before, except the fixed delays (THREAD_DELAY_MS, MESSAGE_DELAY_MS, API_DELAY_MS),
which default to 0 because pacing limits the Nylas calls instead. A malformed value stops the service at start-up
with one line that names the variable, the problem and the expected form.
Secrets (the Nylas API key, the webhook secret, the password in DATABASE_URL) are kept out of
reprs and logs; use `Settings.database_url_redacted` when a URL must be shown.
"""

from __future__ import annotations

import os
import re
import shlex
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import attrs
import psycopg
from dotenv import dotenv_values
from psycopg.conninfo import conninfo_to_dict

from .embedded import embedded_server_is_default
from .errors import ConfigError

__all__ = ["VARIABLES", "Settings", "configured_variables", "current_settings", "load_settings", "redact_url"]

T = TypeVar("T")

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}
_LOG_LEVELS = {"trace", "debug", "info", "success", "warning", "error", "critical"}
#: Spellings of other ecosystems (Node's ``warn``, Python's ``fatal``) -> loguru's level name.
_LOG_LEVEL_ALIASES = {"warn": "warning", "fatal": "critical"}


#: ``scheme://user:password@``, up to the last ``@``: a password may hold ``?`` or ``#`` (which `urllib.parse.urlsplit`
#: would take for the query or the fragment) and, unencoded, ``@`` or ``/`` (which libpq would misread, but a log
#: line must still not show any of it).
_URL_USER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^@/:]*:")
#: What ends the host part that follows a userinfo.
_HOST_END = re.compile(r"[/?#]")
#: A ``name=value`` parameter of a URL's query string (libpq takes ``?password=`` and ``?sslpassword=`` there too).
_QUERY_PARAMETER = re.compile(r"(?P<head>[?&](?P<name>[^&=]*)=)[^&]*")
#: ``*password=value`` in a key=value connection string: unquoted up to whitespace, or single-quoted with ``\'``.
_CONNINFO_PASSWORD = re.compile(r"(?P<head>(?:^|\s)\w*password\s*=\s*)(?:'(?:[^'\\]|\\.)*(?:'|$)|\S*)", re.IGNORECASE)


def _redact_query_parameter(match: re.Match[str]) -> str:
    if unquote(match["name"]).strip().lower().endswith("password"):
        return f"{match['head']}***"
    return match[0]


def redact_url(url: str) -> str:
    """`url` with every password replaced by ``***`` (for logs and errors).

    Covers the userinfo (``postgresql://user:***@host``), every ``*password=`` query parameter (``password``,
    ``sslpassword``) and, for a libpq key=value connection string, its ``*password=`` pairs. Anything else is left
    as it was.
    """
    if "://" not in url:
        redacted = _CONNINFO_PASSWORD.sub(lambda m: f"{m['head']}***", url)
        # Userinfo without a scheme (user:password@host) may still hold a password: hide all of it.
        return "***@" + redacted.rsplit("@", 1)[1] if "@" in redacted else redacted
    return _QUERY_PARAMETER.sub(_redact_query_parameter, _redact_userinfo_password(url))


def _host_end(url: str, start: int) -> int:
    end = _HOST_END.search(url, start)
    return len(url) if end is None else end.start()


def _redact_userinfo_password(url: str) -> str:
    # The password runs from the user's colon to an @ that the host follows: the @ after which libpq's parsed
    # password ends (it may be percent-encoded or hold raw delimiters), else the first @ followed by a host that holds
    # no @ (an @ later in the query string is not one), else the last @.
    head = _URL_USER.match(url)
    if head is None:
        return url
    try:
        parsed: str | None = str(conninfo_to_dict(url).get("password") or "")
    except psycopg.Error:
        parsed = None
    if parsed == "":
        return url  # libpq reads no password: the colon was the port's
    ats = [index for index in range(head.end(), len(url)) if url[index] == "@"]
    if not ats:
        return url
    followed_by_a_host = [at for at in ats if "@" not in url[at + 1 : _host_end(url, at + 1)]]
    exact = [at for at in followed_by_a_host if unquote(url[head.end() : at]) == parsed]
    at = exact[0] if exact else followed_by_a_host[0] if followed_by_a_host else ats[-1]
    return f"{url[: head.end()]}***{url[at:]}"


@attrs.frozen(kw_only=True)
class Settings:
    """The service's configuration. Build it with `load_settings`; tests may build it directly."""

    poll_interval_ms: int = 5000
    visibility_timeout_s: int = 300
    completion_check_interval_ms: int = 5000
    enable_auto_recovery: bool = True
    recovery_check_interval_ms: int = 60000
    #: Fixed delays: a pause after each thread job, a pause per message written, a minimum spacing of one grant's
    #: calls. 0 unless set: pacing limits the calls, and turning pacing off must not slow every sync down.
    thread_delay_ms: int = 0
    message_delay_ms: int = 0
    api_delay_ms: int = 0
    nylas_grant_rate: float = 10.0
    nylas_grant_burst: int = 10
    nylas_app_rate: float = 0.0
    #: Shortest time from a job's first attempt to its last, per processor: a Nylas incident that short fails no job.
    webhook_retry_window_ms: int = 120_000
    backfill_retry_window_ms: int = 120_000
    thread_retry_window_ms: int = 120_000
    testing_mode: bool = False
    log_level: str = "info"
    log_format: str = "text"
    #: NO_COLOR set to anything (https://no-color.org): text logs are never coloured, even on a terminal.
    no_color: bool = False
    database_url: str | None = attrs.field(default=None, repr=False)
    #: DATABASE_URL goes through a transaction-mode pooler (Supabase's port 6543, PgBouncer in transaction mode):
    #: no LISTEN/NOTIFY wake-ups (polling only) and no prepared statements.
    database_transaction_pooler: bool = False
    #: Connections in a worker process's one pool, shared by the broker, the processors, the pacer and the scheduler
    #: (plus one LISTEN connection, unless behind a transaction pooler). Jobs borrow a connection per statement or
    #: transaction, never while they wait for Nylas, so a few serve any number of worker threads.
    database_pool_size: int = 3
    nylas_api_key: str = attrs.field(default="", repr=False)
    nylas_api_uri: str = "https://api.us.nylas.com"
    nylas_webhook_secret: str = attrs.field(default="", repr=False)
    #: Connect and read timeout of each Nylas HTTP attempt, in seconds.
    nylas_timeout_s: float = 30.0
    data_dir: Path = Path(".nova")
    #: Port of the workers' Prometheus endpoint; None: no metrics endpoint.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    #: The webhook receiver's port when ``--port`` is not given (PORT, gunicorn's and hosting platforms' name); set,
    #: the receiver listens on every interface unless ``--host`` says otherwise, as gunicorn does.
    port: int | None = None
    #: The receiver's worker processes when ``--workers`` is not given (WEB_CONCURRENCY, as for gunicorn).
    web_concurrency: int | None = None
    #: gunicorn options of the receiver (GUNICORN_CMD_ARGS), under those of its command line.
    gunicorn_cmd_args: tuple[str, ...] = ()
    #: Where the receiver's workers keep their metric counts (PROMETHEUS_MULTIPROC_DIR, prometheus-client's name);
    #: None: a temporary folder of its own, removed when it stops.
    prometheus_multiproc_dir: Path | None = None

    @property
    def pacing_enabled(self) -> bool:
        """Whether Nylas calls are paced by the shared token buckets (NYLAS_GRANT_RATE or NYLAS_APP_RATE > 0)."""
        return self.nylas_grant_rate > 0 or self.nylas_app_rate > 0

    @property
    def database_url_redacted(self) -> str | None:
        """DATABASE_URL without its password, or None when the embedded server is used."""
        return None if self.database_url is None else redact_url(self.database_url)


def _parse_int(name: str, raw: str, *, minimum: int, unit: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        msg = f"{name}={raw!r} is not a whole number of {unit} >= {minimum}; expected e.g. {name}={max(minimum, 1) * 5}"
        raise ConfigError(msg)
    return value


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    msg = f"{name}={raw!r} is not a boolean; expected one of true/false, 1/0, yes/no"
    raise ConfigError(msg)


def _parse_choice(name: str, raw: str, choices: set[str]) -> str:
    lowered = raw.strip().lower()
    if lowered not in choices:
        msg = f"{name}={raw!r} is not one of {', '.join(sorted(choices))}"
        raise ConfigError(msg)
    return lowered


def _parse_log_level(name: str, raw: str) -> str:
    level = _parse_choice(name, raw, _LOG_LEVELS | set(_LOG_LEVEL_ALIASES))
    return _LOG_LEVEL_ALIASES.get(level, level)


def _parse_http_url(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        msg = f"{name}={raw!r} is not an http(s) URL; set it to your region's API host, e.g. https://api.us.nylas.com"
        raise ConfigError(msg)
    return value


#: How to write a password (or user name) that libpq reads as written.
_PERCENT_ENCODE_HINT = (
    "percent-encode special characters in the user name and password "
    "(% as %25, @ as %40, / as %2F, : as %3A, # as %23, ? as %3F)"
)

#: A URL's authority (user, password, hosts and ports) and its path, as libpq splits them: the path starts at the
#: first / and ends at the query.
_URL_PATH = re.compile(r"^[^/?]*(?P<path>/[^?]*)?")


def _unset_for_embedded() -> str:
    """The end of a hint about DATABASE_URL: leaving it unset, where that starts the embedded server."""
    return ", or leave it unset to use the embedded server" if embedded_server_is_default() else ""


def _read_otherwise(url: str, params: Mapping[str, Any]) -> bool:
    """Whether libpq reads `url` otherwise than its author meant: an unencoded / in the password ends the
    authority early (the password becomes a port, the rest a database name holding an @), an unencoded @ in it
    puts part of it in the host name."""
    match = _URL_PATH.match(url.split("://", 1)[1])
    path = (match.group("path") if match else None) or ""
    hosts = str(params.get("host") or "").split(",")
    ports = str(params.get("port") or "").split(",")
    return (
        "@" in path
        or any(port and not port.isdigit() for port in ports)
        or any("@" in host or ("/" in host and not host.startswith("/")) for host in hosts)
    )


def _parse_database_url(name: str, raw: str) -> str:
    value = raw.strip()
    if "://" not in value and "=" in value:
        # Not echoed, even redacted: a quoting mistake could leave part of the password outside `redact_url`'s reach.
        msg = (
            f"{name} looks like a key=value connection string (not shown: it may hold a password); write it as a URL, "
            f"postgresql://user:password@host:5432/db (percent-encode special characters in the password)"
            f"{_unset_for_embedded()}"
        )
        raise ConfigError(msg)
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in {"postgres", "postgresql"}:
        msg = (
            f"{name}={redact_url(value)!r} is not a PostgreSQL URL; expected postgresql://user:password@host:5432/db"
            f"{_unset_for_embedded()}"
        )
        raise ConfigError(msg)
    try:
        params = conninfo_to_dict(value)  # libpq's own parser, so that what passes here is what libpq will accept
    except psycopg.Error:
        # libpq's message quotes the offending part, which may be the password: neither it nor the URL is shown.
        msg = f"{name} is not a URL libpq can read (not shown: it holds a password); {_PERCENT_ENCODE_HINT}"
        raise ConfigError(msg) from None
    if _read_otherwise(value, params):
        # Neither the URL nor what libpq made of it is shown: the password is in the host, port or database name.
        msg = (
            f"{name} is not read by libpq as written (not shown: it holds a password; an @ or / in it would end up in "
            f"the host, port or database name); {_PERCENT_ENCODE_HINT}"
        )
        raise ConfigError(msg)
    return value


def _parse_rate(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        msg = f"{name}={raw!r} is not a rate in calls per second >= 0; expected e.g. {name}=10 (0 turns it off)"
        raise ConfigError(msg)
    return value


def _parse_timeout(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = 0.0
    if not 0 < value <= 600:
        msg = f"{name}={raw!r} is not a timeout in seconds between 0 and 600; expected e.g. {name}=30"
        raise ConfigError(msg)
    return value


def _parse_port(name: str, raw: str) -> int:
    port = _parse_int(name, raw, minimum=1, unit="a TCP port")
    if port > 65535:
        msg = f"{name}={raw!r} is not a TCP port (1-65535); expected e.g. {name}=9191"
        raise ConfigError(msg)
    return port


def _parse_command_arguments(name: str, raw: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        msg = f'{name}={raw!r} cannot be split into options ({exc}); expected e.g. {name}="--backlog 2048"'
        raise ConfigError(msg) from None


def _ms(minimum: int = 0) -> Callable[[str, str], int]:
    return lambda name, raw: _parse_int(name, raw, minimum=minimum, unit="milliseconds")


#: Environment variable -> (Settings field, parser).
_VARIABLES: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "POLL_INTERVAL_MS": ("poll_interval_ms", _ms(10)),
    "VISIBILITY_TIMEOUT": ("visibility_timeout_s", lambda n, r: _parse_int(n, r, minimum=1, unit="seconds")),
    "COMPLETION_CHECK_INTERVAL_MS": ("completion_check_interval_ms", _ms(100)),
    "ENABLE_AUTO_RECOVERY": ("enable_auto_recovery", _parse_bool),
    "RECOVERY_CHECK_INTERVAL_MS": ("recovery_check_interval_ms", _ms(100)),
    "THREAD_DELAY_MS": ("thread_delay_ms", _ms()),
    "MESSAGE_DELAY_MS": ("message_delay_ms", _ms()),
    "API_DELAY_MS": ("api_delay_ms", _ms()),
    "WEBHOOK_RETRY_WINDOW_MS": ("webhook_retry_window_ms", _ms(1)),
    "BACKFILL_RETRY_WINDOW_MS": ("backfill_retry_window_ms", _ms(1)),
    "THREAD_RETRY_WINDOW_MS": ("thread_retry_window_ms", _ms(1)),
    "TESTING_MODE": ("testing_mode", _parse_bool),
    "LOG_LEVEL": ("log_level", _parse_log_level),
    "LOG_FORMAT": ("log_format", lambda n, r: _parse_choice(n, r, {"text", "json"})),
    "NO_COLOR": ("no_color", lambda n, r: True),
    "DATABASE_URL": ("database_url", _parse_database_url),
    "DATABASE_TRANSACTION_POOLER": ("database_transaction_pooler", _parse_bool),
    "DATABASE_POOL_SIZE": ("database_pool_size", lambda n, r: _parse_int(n, r, minimum=1, unit="connections")),
    "NYLAS_API_KEY": ("nylas_api_key", lambda n, r: r.strip()),
    "NYLAS_API_URI": ("nylas_api_uri", _parse_http_url),
    "NYLAS_WEBHOOK_SECRET": ("nylas_webhook_secret", lambda n, r: r.strip()),
    "NYLAS_TIMEOUT_S": ("nylas_timeout_s", _parse_timeout),
    "NYLAS_GRANT_RATE": ("nylas_grant_rate", _parse_rate),
    "NYLAS_GRANT_BURST": ("nylas_grant_burst", lambda n, r: _parse_int(n, r, minimum=1, unit="calls")),
    "NYLAS_APP_RATE": ("nylas_app_rate", _parse_rate),
    "METRICS_PORT": ("metrics_port", _parse_port),
    "METRICS_HOST": ("metrics_host", lambda n, r: r.strip()),
    "NOVA_DATA_DIR": ("data_dir", lambda n, r: Path(r.strip())),
    "PORT": ("port", _parse_port),
    "WEB_CONCURRENCY": ("web_concurrency", lambda n, r: _parse_int(n, r, minimum=1, unit="processes")),
    "GUNICORN_CMD_ARGS": ("gunicorn_cmd_args", _parse_command_arguments),
    "PROMETHEUS_MULTIPROC_DIR": ("prometheus_multiproc_dir", lambda n, r: Path(r.strip())),
}


#: Every environment variable the service reads (.env.example lists them all).
VARIABLES: tuple[str, ...] = tuple(_VARIABLES)


def configured_variables(
    environ: Mapping[str, str] | None = None, *, env_file: Path | None = Path(".env")
) -> dict[str, str]:
    """The variables as given, unparsed: `environ` (default: the process environment) over an optional ``.env``."""
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return merged


def load_settings(environ: Mapping[str, str] | None = None, *, env_file: Path | None = Path(".env")) -> Settings:
    """Read the settings from `environ` (default: the process environment) over an optional ``.env`` file.

    Variables set in the environment win over the file. Empty values count as unset.

    Raises:
        ConfigError: the first malformed variable, named with its problem and expected form.
    """
    merged = configured_variables(environ, env_file=env_file)
    values: dict[str, Any] = {}
    for variable, (field, parse) in _VARIABLES.items():
        raw = merged.get(variable)
        if raw is not None and raw.strip() != "":
            values[field] = parse(variable, raw)
    return Settings(**values)


_current_lock = threading.Lock()
_current: Settings | None = None


def current_settings() -> Settings:
    """This process's settings, read (environment and ``.env``) on the first call and kept.

    What the actors and the worker use, so that importing `nova_email.actors` reads nothing: the first send, consume
    or worker boot does. Entry points that read their settings themselves pass them on instead.

    Raises:
        ConfigError: as `load_settings`.
    """
    global _current
    with _current_lock:
        if _current is None:
            _current = load_settings()
        return _current

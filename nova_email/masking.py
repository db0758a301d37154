"""The last line of defence for secrets: every log line is searched for the configured secret values before it is
written, whatever its sink, level or origin (our code, Dramatiq, gunicorn, psycopg's pool retries, a traceback).

The values are the Nylas API key, the webhook secret and every password in DATABASE_URL (``password``,
``sslpassword``, ...) or, without DATABASE_URL, the embedded server's password, each as configured and as it appears
percent-encoded in a URL. Code still keeps secrets out of its messages; this catches what slips through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .config import configured_variables
from .embedded import embedded_password_file

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "MASK",
    "MaskingStream",
    "command_error",
    "database_passwords",
    "given_secret_values",
    "mask",
    "secret_values",
]

#: What a secret value is replaced with.
MASK = "***"

#: Shorter values are not masked: they would turn ordinary words of every line into ``***``.
_MIN_SECRET_CHARS = 4


def database_passwords(url: str) -> list[str]:
    """Every ``*password`` parameter of a connection URL, as libpq reads it ([] if libpq cannot read the URL)."""
    try:
        parameters = conninfo_to_dict(url)
    except psycopg.Error:
        return []
    return [str(value) for key, value in parameters.items() if key.endswith("password") and value]


def secret_values(settings: Settings) -> list[str]:
    """The configured secrets, each also percent-encoded as it may appear inside a URL; longest first."""
    values = {settings.nylas_api_key, settings.nylas_webhook_secret}
    if settings.database_url is not None:
        values.update(database_passwords(settings.database_url))
    else:
        with contextlib.suppress(OSError):  # no embedded server yet: it gets its password after this set-up
            values.add(embedded_password_file(settings.data_dir).read_text().strip())
    return _with_encodings(values)


def given_secret_values() -> list[str]:
    """The secrets as the environment and ``.env`` give them, for an error raised before the settings were read (a
    malformed setting's message quotes its value, which may be a secret put in the wrong variable)."""
    given = configured_variables()
    values = {given.get("NYLAS_API_KEY", "").strip(), given.get("NYLAS_WEBHOOK_SECRET", "").strip()}
    values.update(database_passwords(given.get("DATABASE_URL", "").strip()))
    return _with_encodings(values)


def _with_encodings(values: set[str]) -> list[str]:
    """`values`, each also percent-encoded as it may appear inside a URL; longest first, short ones left out."""
    values |= {quote(value, safe="") for value in values} | {quote(value) for value in values}
    return sorted((value for value in values if len(value) >= _MIN_SECRET_CHARS), key=len, reverse=True)


def command_error(program: str, exc: Exception, settings: Settings | None) -> str:
    """The one line a command prints when it fails with `exc` (a `NovaError` or a `psycopg.Error`), secrets masked.

    Of a database error only the first line is kept: it says what failed (connection refused, authentication, a
    missing table); the rest of libpq's text is hints and context.
    """
    text = str(exc).strip()
    if isinstance(exc, psycopg.Error):
        text = f"database error ({type(exc).__name__}): {text.splitlines()[0] if text else type(exc).__name__}"
    return f"{program}: {mask(text, secret_values(settings) if settings else given_secret_values())}"


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by `MASK`."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class MaskingStream:
    """A text stream that masks `secrets` in everything written to `stream` (a loguru sink, e.g. sys.stderr).

    It answers ``isatty`` for the stream it wraps, so colours are chosen as they would be without it.
    """

    def __init__(self, stream: TextIO, secrets: Iterable[str]) -> None:
        self._stream = stream
        self._secrets = tuple(secrets)

    def write(self, text: str) -> None:
        self._stream.write(mask(text, self._secrets))

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

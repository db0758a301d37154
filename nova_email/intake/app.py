"""The webhook intake as a WSGI application (Falcon): Nylas's challenge, signed deliveries and health checks.

Routes:
    GET  /webhooks/nylas?challenge=X   200 with the bare value X (Nylas's endpoint verification)
    POST /webhooks/nylas               200 queued (or already queued); 401 bad or missing signature, nothing
                                       stored; 413 body over the limit, nothing stored; 400 signed but not a
                                       usable envelope, audited as rejected; 503 no secret set or no database
    GET  /healthz                      200 while the process serves requests (liveness)
    GET  /readyz                       200 when the database answers and the webhook functions exist

Metrics are not served here, on the port that faces the internet: the server exposes them on a port of their own
(``nova-email serve-webhooks --metrics-port``).

The order on POST is fixed: size, then signature, then parsing. Nothing from an unsigned body is parsed or
stored, so a stranger cannot fill the audit table; a signed body that is not an envelope is kept for audit. Work
done before the signature checks out is bounded by the bytes received: one HMAC over them, and for a gzip body
at most `PREAUTH_INFLATION_RATIO` times as many inflated bytes. Refusals (401, 413) are logged as one warning a
minute at most, with a count, so that a flood of them cannot flood the log (`nova_email.intake.refusals`).
"""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import falcon
import psycopg
from loguru import logger
from psycopg_pool import ConnectionPool

from . import queries
from .errors import InvalidWebhookBody
from .metrics import IntakeMetrics
from .receiver import Receipt, Rejection, receive, record_rejected
from .refusals import RefusalLog
from .signature import SIGNATURE_HEADER, signature_matches

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_POOL_TIMEOUT_S",
    "MAX_CHALLENGE_CHARS",
    "PREAUTH_INFLATION_RATIO",
    "UNNAMED_OUTCOME",
    "WEBHOOK_PATH",
    "create_app",
]

log = logger.bind(component="Intake")

#: Largest body accepted (after gzip inflation too). Nylas truncates objects over ~1 MB (``*.truncated``
#: types), so a real delivery fits; anything larger is answered 413 and not stored.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024

#: Nylas signs the body exactly as sent, i.e. compressed for a gzip delivery. Should a sender sign the inflated
#: JSON instead, it is accepted only if it inflates to at most this many times the bytes received (JSON compresses
#: 3-10x): checking the signature of an unsigned body must not cost much more than receiving it.
PREAUTH_INFLATION_RATIO = 10

#: Longest challenge answered. Nylas's are a few dozen URL-safe characters; the answer echoes them verbatim.
MAX_CHALLENGE_CHARS = 256
_CHALLENGE = re.compile(rf"[A-Za-z0-9._~+/=-]{{1,{MAX_CHALLENGE_CHARS}}}")

#: Headers on every answer: the challenge echoes a caller's text, which no browser may take for a page.
_SAFE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'"}

#: How long a request waits for a pooled connection before answering 503. Nylas gives up after 10 s.
DEFAULT_POOL_TIMEOUT_S = 5.0

#: Longest wait for a connection on /readyz: a probe must answer before its own timeout (often 1-3 s).
_READINESS_TIMEOUT_S = 1.0

#: Where Nylas delivers: configure the webhook destination as ``https://<host>/webhooks/nylas``.
WEBHOOK_PATH = "/webhooks/nylas"

#: The ``outcome`` label of an answer the app named none for (the router's 404 and 405); its ``code`` says which.
UNNAMED_OUTCOME = "other"


Outcome = Receipt | Rejection


class _BodyTooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _Unsigned(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _SignedButInvalid(Exception):
    def __init__(self, raw: bytes, error: InvalidWebhookBody) -> None:
        super().__init__(error.reason)
        self.raw = raw
        self.error = error


def _json(resp: falcon.Response, status: int, document: dict[str, Any]) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(document)


def _inflate(raw: bytes, limit: int) -> bytes:
    """Gunzip `raw`, stopping as soon as the output passes `limit` (so a gzip bomb costs `limit` bytes)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        msg = f"body says Content-Encoding: gzip but is not gzip data ({exc})"
        raise InvalidWebhookBody(msg) from exc
    if len(inflated) > limit:
        raise _BodyTooLarge(len(inflated))
    if not inflater.eof:
        msg = "body says Content-Encoding: gzip but the gzip stream is truncated"
        raise InvalidWebhookBody(msg)
    return inflated


class _DatabaseState:
    """Logs an outage once and the recovery once, however many requests hit it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down = False

    def failed(self, exc: psycopg.Error) -> None:
        with self._lock:
            first, self._down = not self._down, True
        if first:
            log.bind(event="database_down").error("Database unavailable, answering 503 until it is back: {}", exc)

    def succeeded(self) -> None:
        if not self._down:
            return
        with self._lock:
            recovered, self._down = self._down, False
        if recovered:
            log.bind(event="database_up").info("Database reachable again")


class _Instrumentation:
    """Falcon middleware: times every request and counts it under its route and outcome."""

    def __init__(self, metrics: IntakeMetrics) -> None:
        self._metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        resp.set_headers(_SAFE_HEADERS)
        outcome = getattr(req.context, "outcome", None) or UNNAMED_OUTCOME
        elapsed = time.perf_counter() - getattr(req.context, "started", time.perf_counter())
        self._metrics.observe(req.uri_template or "unmatched", outcome, resp.status_code, elapsed)


class _WebhookResource:
    def __init__(
        self,
        *,
        pool: ConnectionPool,
        secret: str,
        max_body_bytes: int,
        pool_timeout_s: float,
        db: _DatabaseState,
        refusals: RefusalLog,
    ) -> None:
        self._pool = pool
        self._secret = secret
        self._max_body_bytes = max_body_bytes
        self._pool_timeout_s = pool_timeout_s
        self._db = db
        self._refusals = refusals

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        challenge = req.get_param("challenge")
        if not challenge:
            req.context.outcome = "bad_request"
            _json(resp, 400, {"error": "missing_challenge", "detail": "GET expects ?challenge=<value> from Nylas"})
            return
        if not _CHALLENGE.fullmatch(challenge):
            req.context.outcome = "bad_request"
            detail = f"a challenge is 1-{MAX_CHALLENGE_CHARS} characters of A-Z a-z 0-9 . _ ~ + / = -"
            _json(resp, 400, {"error": "invalid_challenge", "detail": detail})
            return
        # Nylas activates the destination only if the body is exactly the value: no quotes, no JSON.
        req.context.outcome = "challenge"
        resp.status = 200
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = challenge

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._secret:
            req.context.outcome = "unconfigured"
            _json(resp, 503, {"error": "unconfigured", "detail": "NYLAS_WEBHOOK_SECRET is not set on this server"})
            return
        try:
            body = self._authenticated_body(req)
        except _BodyTooLarge as exc:
            req.context.outcome = "too_large"
            self._refusals.refused(
                req.remote_addr, f"a body of {exc.size} bytes or more (limit {self._max_body_bytes})"
            )
            detail = f"body is {exc.size} bytes or more; the limit is {self._max_body_bytes}"
            _json(resp, 413, {"error": "too_large", "detail": detail})
            return
        except _Unsigned as exc:
            req.context.outcome = "unauthorized"
            self._refusals.refused(req.remote_addr, exc.reason)
            _json(resp, 401, {"error": "unauthorized", "detail": exc.reason})
            return
        except _SignedButInvalid as exc:
            raw, error = exc.raw, exc.error
            self._store(
                req,
                resp,
                lambda conn: Rejection(
                    notification_id=record_rejected(conn, raw, error.reason), reason=error.reason, summary=error.summary
                ),
            )
            return
        self._store(req, resp, lambda conn: receive(conn, body))

    def _authenticated_body(self, req: falcon.Request) -> bytes:
        length = req.content_length
        if length is not None and length > self._max_body_bytes:
            raise _BodyTooLarge(length)
        # req.stream (not bounded_stream) so that chunked bodies, which carry no Content-Length, are read too.
        raw: bytes = req.stream.read(self._max_body_bytes + 1)
        if len(raw) > self._max_body_bytes:
            raise _BodyTooLarge(len(raw))
        signature = req.get_header(SIGNATURE_HEADER)
        if not signature:
            msg = f"no {SIGNATURE_HEADER} header"
            raise _Unsigned(msg)
        gzipped = (req.get_header("Content-Encoding") or "").strip().lower() == "gzip"
        if signature_matches(self._secret, raw, signature):
            if not gzipped:
                return raw
            try:
                return _inflate(raw, self._max_body_bytes)
            except InvalidWebhookBody as exc:
                raise _SignedButInvalid(raw, exc) from exc
        # Nylas signs what it sends; a signature over the inflated JSON is accepted too, inflating only as far as
        # PREAUTH_INFLATION_RATIO allows (this work is done for anyone who sends a body).
        if gzipped:
            try:
                inflated = _inflate(raw, min(self._max_body_bytes, PREAUTH_INFLATION_RATIO * len(raw)))
            except (InvalidWebhookBody, _BodyTooLarge):
                inflated = None
            if inflated is not None and signature_matches(self._secret, inflated, signature):
                return inflated
        msg = f"{SIGNATURE_HEADER} does not match the body"
        raise _Unsigned(msg)

    def _store(
        self, req: falcon.Request, resp: falcon.Response, work: Callable[[psycopg.Connection[Any]], Outcome]
    ) -> None:
        try:
            with self._pool.connection(timeout=self._pool_timeout_s) as conn:
                result = work(conn)
        except (psycopg.OperationalError, psycopg.errors.UndefinedFunction) as exc:
            self._unavailable(req, resp, exc)
            return
        self._db.succeeded()
        if isinstance(result, Receipt):
            req.context.outcome = "duplicate" if result.duplicate else "accepted"
            if result.duplicate:
                log.debug("Webhook already received as {}; nothing queued again", result.notification_id)
            _json(resp, 200, {"status": req.context.outcome, "notification_id": str(result.notification_id)})
            return
        req.context.outcome = "rejected"
        # The summary, not the reason: the reason may quote the body, which may hold email content.
        log.warning("Rejected a signed body as {}: {}", result.notification_id, result.summary)
        document = {"error": "invalid_body", "detail": result.reason, "notification_id": str(result.notification_id)}
        _json(resp, 400, document)

    def _unavailable(self, req: falcon.Request, resp: falcon.Response, exc: psycopg.Error) -> None:
        self._db.failed(exc)
        req.context.outcome = "unavailable"
        # Nylas retries failed deliveries, so a 503 during an outage or before `migrate` loses nothing.
        resp.append_header("Retry-After", "5")
        detail = (
            "the webhook SQL functions are missing; run `nova-email migrate`"
            if isinstance(exc, psycopg.errors.UndefinedFunction)
            else "the database is unavailable; retry later"
        )
        _json(resp, 503, {"error": "unavailable", "detail": detail})


class _HealthResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.outcome = "ok"
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "ok"


class _ReadyResource:
    def __init__(self, *, pool: ConnectionPool, secret: str, timeout_s: float, db: _DatabaseState) -> None:
        self._pool = pool
        self._secret = secret
        self._timeout_s = timeout_s
        self._db = db

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            with self._pool.connection(timeout=self._timeout_s) as conn:
                row = conn.execute(queries.READINESS).fetchone()
        except psycopg.Error as exc:
            # A database error can name the host, port and user: log it (once per outage), never answer with it.
            self._db.failed(exc)
            req.context.outcome = "not_ready"
            detail = "database unavailable; see the intake's log"
            _json(resp, 503, {"status": "not_ready", "database": False, "detail": detail})
            return
        self._db.succeeded()
        functions = bool(row and row[0] and row[1])
        document: dict[str, Any] = {
            "status": "ready" if functions else "not_ready",
            "database": True,
            "functions": functions,
            # Reported, not required: the challenge must be answerable before Nylas issues the secret.
            "signing_secret": bool(self._secret),
        }
        if not functions:
            document["detail"] = "the webhook SQL functions are missing; run `nova-email migrate`"
        req.context.outcome = document["status"]
        _json(resp, 200 if functions else 503, document)


def _log_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict[str, Any]) -> None:
    req.context.outcome = "error"
    log.opt(exception=exc).critical("Unexpected error on {} {}", req.method, req.path)
    _json(resp, 500, {"error": "internal", "detail": "unexpected server error; see the intake's log"})


def create_app(
    *,
    pool: ConnectionPool,
    secret: str,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
    metrics: IntakeMetrics | None = None,
    refusals: RefusalLog | None = None,
) -> falcon.App[falcon.Request, falcon.Response]:
    """Build the intake's WSGI application over `pool` (autocommit connections, as `nova_email.db` makes).

    An empty `secret` is allowed so the challenge can be answered before Nylas issues the secret; POSTs then
    get 503 until NYLAS_WEBHOOK_SECRET is set. `refusals` logs the refused requests; the server passes the one
    its worker logs malformed requests to, so that both share one rate limit.
    """
    if max_body_bytes < 1:
        msg = f"max_body_bytes={max_body_bytes!r} must be a positive number of bytes, e.g. {DEFAULT_MAX_BODY_BYTES}"
        raise ValueError(msg)
    metrics = metrics or IntakeMetrics()
    db = _DatabaseState()
    app = falcon.App(middleware=[_Instrumentation(metrics)])
    app.add_route(
        WEBHOOK_PATH,
        _WebhookResource(
            pool=pool,
            secret=secret,
            max_body_bytes=max_body_bytes,
            pool_timeout_s=pool_timeout_s,
            db=db,
            refusals=refusals or RefusalLog(),
        ),
    )
    app.add_route("/healthz", _HealthResource())
    readiness_timeout_s = min(pool_timeout_s, _READINESS_TIMEOUT_S)
    app.add_route("/readyz", _ReadyResource(pool=pool, secret=secret, timeout_s=readiness_timeout_s, db=db))
    app.add_error_handler(Exception, _log_unexpected)
    return app

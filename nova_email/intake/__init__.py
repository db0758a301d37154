"""Nylas webhook intake over HTTP: verifies each delivery's signature and queues it once, in milliseconds.

Run it with ``nova-email serve-webhooks`` (`nova_email.serve_webhooks`, which calls `server.main`); build the WSGI app
alone with `create_app`.
"""

from __future__ import annotations

# Application
from .app import DEFAULT_MAX_BODY_BYTES, MAX_CHALLENGE_CHARS, PREAUTH_INFLATION_RATIO, WEBHOOK_PATH, create_app

# Errors
from .errors import MAX_REASON_CHARS, IntakeError, InvalidWebhookBody

# Metrics
from .metrics import IntakeMetrics

# Receiving
from .receiver import Envelope, Receipt, Rejection, parse_envelope, receive

# Serving
from .server import REQUEST_READ_TIMEOUT_S, DeadlineWorker, RunningIntake, main, serve_in_background

# Signatures
from .signature import SIGNATURE_HEADER, sign, signature_matches

__all__ = [
    # Application
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_CHALLENGE_CHARS",
    "PREAUTH_INFLATION_RATIO",
    "WEBHOOK_PATH",
    "create_app",
    # Errors
    "MAX_REASON_CHARS",
    "IntakeError",
    "InvalidWebhookBody",
    # Metrics
    "IntakeMetrics",
    # Receiving
    "Envelope",
    "Receipt",
    "Rejection",
    "parse_envelope",
    "receive",
    # Serving
    "REQUEST_READ_TIMEOUT_S",
    "DeadlineWorker",
    "RunningIntake",
    "main",
    "serve_in_background",
    # Signatures
    "SIGNATURE_HEADER",
    "sign",
    "signature_matches",
]

"""Errors of the webhook intake.

    NovaError (nova_email.errors)
     └── IntakeError               base of the intake's own errors
          └── InvalidWebhookBody   a signed body that is not a Nylas envelope (answered 400, audited as rejected)

A missing signing secret at start-up is a `nova_email.errors.ConfigError` naming NYLAS_WEBHOOK_SECRET.
"""

from __future__ import annotations

from ..errors import NovaError

__all__ = ["MAX_REASON_CHARS", "IntakeError", "InvalidWebhookBody"]

#: Longest reason kept: it is stored on the audit row, returned to the sender and logged, and it may quote the body.
MAX_REASON_CHARS = 500


class IntakeError(NovaError):
    """Base class of the webhook intake's errors."""


class InvalidWebhookBody(IntakeError, ValueError):
    """A correctly signed body that cannot be queued: not UTF-8, not JSON, not an object, or no usable id/type.

    `reason` is the text stored in the audit row's ``error_message`` and returned to the sender, cut to
    `MAX_REASON_CHARS` (a value quoted from a hostile body may be megabytes long). `summary` is what is logged: it
    names the field and the kind of problem but quotes nothing from the body, which may hold email content; it
    defaults to `reason`, for reasons that quote nothing.
    """

    def __init__(self, reason: str, *, summary: str | None = None) -> None:
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 1] + "…"
        super().__init__(reason)
        self.reason = reason
        self.summary = reason if summary is None else summary

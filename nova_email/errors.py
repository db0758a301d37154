"""Errors raised by the Nova Email service.

    NovaError
     ├── ConfigError          a setting is missing or malformed (raised at start-up)
     ├── DatabaseError        no database could be reached or started
     └── InvalidJob           a queue payload cannot be turned into a job (dead-lettered, never retried)

The Nylas client has its own hierarchy under `nova_email.nylas.errors.NylasError`.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DatabaseError", "InvalidJob", "NovaError"]


class NovaError(Exception):
    """Base class of the service's own errors."""


class ConfigError(NovaError, ValueError):
    """A setting is missing or malformed; the message names the variable and the expected form."""


class DatabaseError(NovaError):
    """The database could not be reached or started; the message says what to check."""


class InvalidJob(NovaError, ValueError):
    """A queue payload is not a valid job; the message carries the validation details."""

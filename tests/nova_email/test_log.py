"""Logging: the [Component] message form, JSON lines on request, stdlib loggers routed in."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from loguru import logger

from nova_email.config import Settings
from nova_email.log import setup_logging


@pytest.fixture(autouse=True)
def _restore_loguru() -> Iterator[None]:
    yield
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


def test_json_lines_are_one_object_each(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings(log_format="json"))
    logger.bind(component="Monitor").warning("Config {} stuck", "1234")
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["record"]["extra"]["component"] == "Monitor"
    assert record["record"]["message"] == "Config 1234 stuck"
    assert record["record"]["level"]["name"] == "WARNING"


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

"""The broker's errors survive pickling, keyword-only attributes included (``queue_name``, ``max_size``)."""

from __future__ import annotations

import pytest

from brokers import errors
from tests.pickling import assert_unpickles_unchanged

#: One instance of each error of `brokers.errors`, with every keyword-only argument its class takes.
INSTANCES = [
    errors.PGMQBrokerError("The broker failed"),
    errors.MigrationError("Migration brokers/001_broker failed: syntax error"),
    errors.InvalidQueueName("Queue name 'Emails' cannot be a PGMQ queue", queue_name="Emails"),
    errors.DatabaseUnavailable("The database is unavailable (OperationalError: refused)"),
    errors.DatabaseBusy("All 2 connections stayed in use", max_size=2, timeout_s=0.5),
]


def test_every_error_of_the_module_is_checked() -> None:
    assert sorted(type(exc).__name__ for exc in INSTANCES) == sorted(errors.__all__)


@pytest.mark.parametrize("exc", INSTANCES, ids=lambda exc: type(exc).__name__)
def test_an_error_unpickles_with_its_message_and_attributes(exc: errors.PGMQBrokerError) -> None:
    assert_unpickles_unchanged(exc)
